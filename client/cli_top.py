"""`lepton-ctl top`: a live view of the nodes and their load, refreshed every --interval.

Built from two ordinary calls per frame (`ListNodes`, and `ListTasks` for running and
assigned tasks), so it needs nothing the other commands do not. Usage is each node's last
heartbeat as the leader holds it: `-` right after a failover, until the next beat.
`--once` prints one frame (with `-o json`, its data) and exits, for scripts and tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from datetime import datetime
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lepton.common.errors import LeptonError
from lepton.common.states import TaskState

from ._cli_common import UsageError, _client, _positive_float, command, print_result, wants_json
from .client import Client
from .render import emit, human_bytes, make_console, sort_nodes

log = logging.getLogger(__name__)

__all__ = ["collect", "register", "top_view"]

# Below this a refresh costs the leader more than a person can read.
MIN_INTERVAL_S = 0.2
ACTIVE_STATES = [TaskState.RUNNING.value, TaskState.ASSIGNED.value]


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `top` to lepton-ctl's subcommands `top`; `common` holds the global options."""
    p = command(top, "top", cmd_top, "live view of nodes and their load (CPU, memory, GPUs, tasks); Ctrl-C stops",
                [common])
    p.add_argument(
        "--interval", metavar="SECONDS", type=_positive_float, default=1.0,
        help="seconds between refreshes (default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--once", action="store_true", help="print one frame and exit (-o json: its data)"
    )


def _pct(part: float, whole: float) -> float | None:
    return round(100 * part / whole, 1) if whole > 0 else None


def collect(client: Client) -> dict[str, Any]:
    """One frame's data: every node with its load and task counts, plus totals.
    This is also the `-o json` shape."""
    nodes = sort_nodes(client.nodes())
    tasks = client.tasks(states=ACTIVE_STATES)
    per_node: dict[str, Counter[str]] = {}
    for t in tasks:
        per_node.setdefault(t.node_id, Counter())[t.state] += 1
    rows = []
    for n in nodes:
        cap, u = n.capacity, n.usage
        counts = per_node.get(n.id, Counter())
        used = {g.index: g for g in u.gpus} if u else {}
        gpus = []
        for g in cap.gpus:
            now = used.get(g.index)
            gpus.append({
                "index": g.index,
                "name": g.name,
                "utilization_percent": now.utilization_percent if now else None,
                "memory_used_bytes": now.memory_used_bytes if now else None,
                "memory_total_bytes": g.memory_total_bytes,
            })  # fmt: skip
        rows.append({
            "id": n.id,
            "name": n.name,
            "address": n.address,
            "state": n.state,
            "draining": n.draining,
            "voter": n.voter,
            "cpus": cap.cpu_logical,
            "cpu_percent": u.cpu_percent if u else None,
            "load1": u.load1 if u else None,
            "memory_bytes": cap.memory_bytes,
            "memory_used_bytes": u.memory_used_bytes if u else None,
            "memory_percent": _pct(u.memory_used_bytes, cap.memory_bytes) if u else None,
            "gpus": gpus,
            "tasks_running": counts["running"],
            "tasks_assigned": counts["assigned"],
            "last_heartbeat_ms": n.last_heartbeat_ms,
        })  # fmt: skip
    by_state = Counter(n.state for n in nodes)
    return {
        "at_ms": int(time.time() * 1000),
        "nodes": rows,
        "nodes_by_state": dict(sorted(by_state.items())),
        "tasks": {s: sum(1 for t in tasks if t.state == s) for s in ACTIVE_STATES},
    }


def _load_style(pct: float | None) -> str:
    if pct is None:
        return "dim"
    return "red" if pct >= 90 else "yellow" if pct >= 70 else ""


def _cell(pct: float | None) -> Text:
    if pct is None:
        return Text("-", style="dim")
    return Text(f"{pct:.0f}%", style=_load_style(pct))


def _gpu_cell(gpus: list[dict[str, Any]]) -> Text:
    """`-` without GPUs; each GPU's utilisation up to 8 of them, else count and average."""
    if not gpus:
        return Text("-", style="dim")
    util = [g["utilization_percent"] for g in gpus]
    if any(u is None for u in util):
        return Text(f"{len(gpus)} × ?", style="dim")
    if len(gpus) > 8:
        avg = sum(util) / len(util)
        return Text(f"{len(gpus)} × avg {avg:.0f}%", style=_load_style(avg))
    text = Text()
    for i, u in enumerate(util):
        if i:
            text.append(" ")
        text.append(f"{u:.0f}%", style=_load_style(u))
    return text


def _state_style(state: str) -> str:
    return {"ready": "green", "suspect": "yellow", "down": "red", "left": "dim"}.get(state, "")


def top_view(frame: dict[str, Any], *, interval: float | None = None, note: str = "") -> Group:
    """The rendered frame: a summary line, then one row per node."""
    stamp = datetime.fromtimestamp(frame["at_ms"] / 1000).strftime("%H:%M:%S")
    states = ", ".join(f"{k} {v}" for k, v in frame["nodes_by_state"].items())
    tasks = frame["tasks"]
    head = Text(
        f"{stamp}  {len(frame['nodes'])} nodes ({states or 'none'})  "
        f"tasks: {tasks['running']} running, {tasks['assigned']} assigned"
    )
    if interval is not None:
        head.append(f"  every {interval:g}s, Ctrl-C stops", style="dim")
    parts: list[Any] = [head]
    if note:
        parts.append(Text(note, style="yellow"))
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in ("ID", "NAME", "STATE", "CPU%", "LOAD1", "MEMORY", "MEM%", "GPU%", "TASKS"):
        table.add_column(
            h, no_wrap=True, justify="right" if h in ("CPU%", "LOAD1", "MEM%", "TASKS") else "left"
        )
    for n in frame["nodes"]:
        state = n["state"] + (" (draining)" if n["draining"] else "")
        mem = "-"
        if n["memory_used_bytes"] is not None:
            mem = f"{human_bytes(n['memory_used_bytes'])} / {human_bytes(n['memory_bytes'])}"
        tasks_cell = str(n["tasks_running"]) + (
            f" (+{n['tasks_assigned']})" if n["tasks_assigned"] else ""
        )
        table.add_row(
            Text(n["id"]),  # whole, as in every table
            Text(n["name"]),  # data, never rich markup
            Text(state, style=_state_style(n["state"])),
            _cell(n["cpu_percent"]),
            Text("-" if n["load1"] is None else f"{n['load1']:.2f}"),
            Text(mem),
            _cell(n["memory_percent"]),
            _gpu_cell(n["gpus"]),
            Text(tasks_cell),
        )
    parts += [Text(""), table]
    return Group(*parts)


def cmd_top(args: argparse.Namespace) -> int:
    if wants_json(args) and not args.once:
        raise UsageError("-o json, -o yaml and -q need --once (a live view has no such form)")
    interval = max(args.interval, MIN_INTERVAL_S)
    with _client(args) as c:
        frame = collect(c)  # the first call fails fast with the usual one-line error
        if args.once:
            return print_result(args, frame, lambda: top_view(frame))
        try:
            _live(c, frame, interval)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how one leaves top: exit 0, quietly
    return 0


def _live(c: Client, frame: dict[str, Any], interval: float) -> None:
    console = make_console()
    if not console.is_terminal:
        # Piped: Live would print nothing until the end; print each frame in turn instead.
        while True:
            emit(top_view(frame))
            sys.stdout.write("\n")
            sys.stdout.flush()
            time.sleep(interval)
            frame = collect(c)
    with Live(top_view(frame, interval=interval), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            note = ""
            try:
                frame = collect(c)
            except LeptonError as err:
                # A failover or a blip: keep the last frame and say why it is stale.
                note = f"refresh failed, showing the last frame: {err.message}"
                log.debug("top: refresh failed: %s", err)
            live.update(top_view(frame, interval=interval, note=note), refresh=True)
