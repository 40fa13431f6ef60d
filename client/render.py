"""Human output of lepton-ctl: rich tables and key/value views, plus the JSON printer.

Pure functions from typed results to renderables/strings, so tests can check them without
a terminal. JSON output is `json.dumps(obj, indent=2, sort_keys=True)` of the `to_dict()`
shapes documented in docs/cli.md.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .tables import FitTable
from .types import ClusterStatusInfo, NodeEvent, NodeInfo, TaskInfo

__all__ = [
    "age",
    "ago",
    "cluster_status_view",
    "command_text",
    "duration",
    "dump_json",
    "dump_yaml",
    "emit",
    "human_bytes",
    "make_console",
    "node_detail",
    "node_event_line",
    "nodes_table",
    "short_id",
    "sort_nodes",
    "task_detail",
    "tasks_table",
    "truncate",
    "when",
]

SHORT_ID_LEN = 12
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def make_console(file: TextIO | None = None) -> Console:
    """A console for `file` (stdout). Piped output gets no colour and is never re-wrapped."""
    file = file or sys.stdout
    console = Console(file=file, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        # rich assumes 80 columns off a terminal and would squeeze tables for `| grep`.
        console = Console(file=file, highlight=False, width=1000, soft_wrap=True)
    return console


def emit(renderable: Any, file: TextIO | None = None) -> None:
    """Print a table or view to `file` (stdout). Off a terminal, without rich's padding
    spaces at line ends, so the output diffs and greps cleanly."""
    console = make_console(file)
    if console.is_terminal:
        console.print(renderable, crop=False)  # a FitTable may be wider than the terminal
        return
    with console.capture() as cap:
        console.print(renderable)
    console.file.write("".join(line.rstrip() + "\n" for line in cap.get().splitlines()))


def dump_json(obj: Any) -> str:
    """The one JSON format of lepton-ctl."""
    return json.dumps(obj, indent=2, sort_keys=True)


def dump_yaml(obj: Any) -> str:
    """`-o yaml`: the JSON document as YAML (block style, keys sorted; loads back equal)."""
    import yaml  # only for -o yaml

    return yaml.safe_dump(obj, sort_keys=True, default_flow_style=False, allow_unicode=True)


def human_bytes(n: int) -> str:
    """1024-based, one decimal: `16777216000` → `15.6 GiB`; below 1 KiB, whole bytes."""
    value = float(n)
    if value < 1024:
        return f"{int(value)} B"
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def short_id(node_id: str) -> str:
    return node_id[:SHORT_ID_LEN]


def duration(seconds: float) -> str:
    """`42s`, `5m`, `2h`, `4d` (rounded down to the largest unit)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def age(ms: int, now_ms: int | None = None) -> str:
    """Time since `ms`: `3s`, `5m`, `2h`, `4d`; `-` for 0 (never)."""
    if ms <= 0:
        return "-"
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    # Clock skew between us and the leader: clamp.
    return duration(max(0, now_ms - ms) / 1000)


def ago(ms: int, now_ms: int | None = None) -> str:
    """`3s ago`, `5m ago`, `2h ago`, `4d ago`; `-` for 0 (never)."""
    if ms <= 0:
        return "-"
    return f"{age(ms, now_ms)} ago"


def when(ms: int, now_ms: int | None = None) -> str:
    """Local wall time and age: `2025-01-02 15:04:05 (3m ago)`; `-` for 0."""
    if ms <= 0:
        return "-"
    stamp = datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({ago(ms, now_ms)})"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


def sort_nodes(nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    """The order lepton-ctl shows nodes in, in every output format: by name, then id."""
    return sorted(nodes, key=lambda n: (n.name, n.id))


def _table(*headers: str, keep: Sequence[str] = ("ID",), optional: Sequence[str] = (),
           wide: bool = False, header: bool = True) -> FitTable:
    """A table that fits the terminal and never cuts its `keep` columns (`tables.FitTable`);
    cells are plain text (Text), never rich markup: names and labels are data."""
    return FitTable(headers, keep=keep, optional=optional, wide=wide, header=header)


def _row(table: FitTable, *cells: str) -> None:
    table.add_row(*cells)


# Columns `nodes list` leaves out first when the terminal is narrow; -o wide adds the last 3.
_NODE_OPTIONAL = ("MEM%", "CPU%", "MEMORY", "CPU", "VOTER", "GPUS", "LAST SEEN")
_NODE_WIDE = ("DISK", "VERSION", "LABELS")


def nodes_table(nodes: Sequence[NodeInfo], now_ms: int | None = None, *, wide: bool = False) -> FitTable:
    """`nodes list`: one row per node; full ids and addresses at any width."""
    headers = ["ID", "NAME", "ADDRESS", "STATE", "VOTER", "CPU", "MEMORY", "GPUS", "CPU%",
               "MEM%", "LAST SEEN"]
    table = _table(*headers, *(_NODE_WIDE if wide else ()), keep=("ID", "ADDRESS"),
                   optional=_NODE_OPTIONAL, wide=wide)
    for n in nodes:
        cap, usage = n.capacity, n.usage
        cells = [
            n.id,
            n.name,
            n.address,
            n.display_state,
            "yes" if n.voter else "no",
            str(cap.cpu_logical),
            human_bytes(cap.memory_bytes),
            str(len(cap.gpus)),
            f"{usage.cpu_percent:.0f}%" if usage else "-",
            _pct(usage.memory_used_bytes, cap.memory_bytes) if usage else "-",
            ago(n.last_heartbeat_ms, now_ms),
        ]
        if wide:
            labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"
            cells += [human_bytes(cap.disk_bytes), n.version or "-", labels]
        _row(table, *cells)
    return table


def _kv(rows: Sequence[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in rows:
        grid.add_row(Text(key), Text(value))
    return grid


def node_detail(n: NodeInfo, now_ms: int | None = None) -> Group:
    """`nodes show`: every field of one node."""
    cap = n.capacity
    state = n.display_state + (f": {n.state_reason}" if n.state_reason else "")
    cpu = f"{cap.cpu_logical} logical, {cap.cpu_physical} physical"
    if cap.cpu_model:
        cpu += f" ({cap.cpu_model})"
    rows = [
        ("ID", n.id),
        ("Name", n.name),
        ("Address", n.address),
        ("State", state),
        ("State changed", when(n.state_changed_at, now_ms)),
        ("Voter", "yes" if n.voter else "no"),
        ("Labels", ", ".join(f"{k}={v}" for k, v in n.labels.items()) or "<none>"),
        ("Version", n.version or "-"),
        ("Registered", when(n.registered_at, now_ms)),
        ("Last heartbeat", when(n.last_heartbeat_ms, now_ms)),
        ("CPU", cpu),
        ("Memory", human_bytes(cap.memory_bytes)),
        ("Disk", human_bytes(cap.disk_bytes)),
        ("GPUs", str(len(cap.gpus)) if cap.gpus else "none"),
    ]
    for g in cap.gpus:
        rows.append(
            (f"  GPU {g.index}", f"{g.name}, {human_bytes(g.memory_total_bytes)}, {g.uuid}")
        )
    u = n.usage
    if u is None:
        rows.append(("Usage", "unknown (no recent heartbeat on the leader)"))
    else:
        mem = f"{human_bytes(u.memory_used_bytes)} of {human_bytes(cap.memory_bytes)}"
        rows += [
            ("CPU usage", f"{u.cpu_percent:.1f}% (load1 {u.load1:.2f})"),
            ("Memory usage", f"{mem} ({_pct(u.memory_used_bytes, cap.memory_bytes)})"),
            ("Disk free", human_bytes(u.disk_free_bytes)),
        ]
        for g in u.gpus:
            used = f"{human_bytes(g.memory_used_bytes)} of {human_bytes(g.memory_total_bytes)}"
            rows.append((f"  GPU {g.index} usage", f"{g.utilization_percent:.0f}% util, {used}"))
    return Group(_kv(rows))


def _state_backend(s: ClusterStatusInfo) -> str:
    if s.state_backend == "etcd":
        return f"etcd at {','.join(s.etcd_endpoints)}, prefix {s.etcd_prefix}"
    return {"raft": "built-in Raft", "single": "one voter, local log"}.get(s.state_backend, s.state_backend or "-")


def cluster_status_view(s: ClusterStatusInfo) -> Group:
    """`cluster status`: leader and log progress, node counts, then the voters."""
    leader = f"{s.leader_id} at {s.leader}" if s.leader_id else "none (no leader elected)"
    by_state = ", ".join(f"{k} {v}" for k, v in s.nodes_by_state.items() if v)
    rows = [
        ("State", _state_backend(s)),
        ("Leader", leader),
        ("Term", str(s.term) + (" (the leader key's creation revision)" if s.state_backend == "etcd" else "")),
        ("Log", f"commit {s.commit_index}, applied {s.applied_index}"),
        ("Nodes", f"{s.node_count}" + (f" ({by_state})" if by_state else "")),
        ("Version", s.version or "-"),
    ]
    first = "ETCD MEMBER" if s.state_backend == "etcd" else "VOTER"  # etcd's members vote there
    voters = _table(first, "ADDRESS", "ROLE", "MATCH", "LAG", keep=(first, "ADDRESS"))
    for v in s.voters:
        _row(voters, v.id, v.address, v.role, str(v.match_index), str(v.lag))
    return Group(_kv(rows), Text(""), voters)


def node_event_line(e: NodeEvent) -> str:
    """`nodes watch` (table): one line per event."""
    stamp = datetime.fromtimestamp(e.at_ms / 1000).strftime("%H:%M:%S") if e.at_ms else "-"
    n = e.node
    return f"{stamp}  {e.kind:<13}  {n.name} ({n.id})  {n.display_state}"


# -- tasks ------------------------------------------------------------------------------

REASON_WIDTH = 60


def truncate(text: str, width: int) -> str:
    """`text` on one line, cut to `width` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def command_text(t: TaskInfo) -> str:
    """The task's command as one would type it: argv shell-quoted, or the shell string."""
    return t.command if isinstance(t.command, str) else shlex.join(t.command)


def _node_ref(node_id: str, names: Mapping[str, str]) -> str:
    return names.get(node_id) or node_id if node_id else "-"


def _exit(code: int | None) -> str:
    return "-" if code is None else str(code)


# Columns `tasks list` leaves out first when the terminal is narrow; -o wide adds the last 3.
_TASK_OPTIONAL = ("PRIO", "ATTEMPT", "EXIT", "AGE", "NODE")
_TASK_WIDE = ("OWNER", "RESOURCES", "COMMAND")


def tasks_table(
    tasks: Sequence[TaskInfo],
    names: Mapping[str, str] | None = None,
    now_ms: int | None = None,
    *,
    wide: bool = False,
    header: bool = True,
    job_column: bool = True,
) -> FitTable:
    """`tasks list`: one row per task, full ids at any width. `names`: node id → node
    name, where known. `header=False` for the rows `tasks list -w` adds. JOB names the job
    a task is a member of (its rank ends the task id), as sacct shows a step's job: always
    there, so rows `-w` adds later line up, and never cut, as ids are not; `job_column=False`
    where every row is of one job (`jobs show`)."""
    names = names or {}
    headers = ["ID", "NAME", "STATE", "PRIO", "NODE", "ATTEMPT", "EXIT", "AGE",
               *(["JOB"] if job_column else []), "REASON"]
    table = _table(*headers, *(_TASK_WIDE if wide else ()), keep=("ID", "JOB"), optional=_TASK_OPTIONAL,
                   wide=wide, header=header)
    for t in tasks:
        cells = [
            t.id,
            t.name or "-",
            t.state,
            str(t.priority),
            _node_ref(t.node_id, names),
            str(t.attempt),
            _exit(t.exit_code),
            age(t.created_at_ms, now_ms),
            *([t.job_id or "-"] if job_column else []),
            (t.reason if wide else truncate(t.reason, REASON_WIDTH)) if t.reason else "",
        ]
        if wide:
            cells += [t.owner or "-", _resources(t), command_text(t)]
        _row(table, *cells)
    return table


def _resources(t: TaskInfo) -> str:
    r = t.resources
    parts = [f"cpu {r.cpu:g}" if r.cpu else "cpu any"]
    parts.append(f"memory {human_bytes(r.memory_bytes)}" if r.memory_bytes else "memory any")
    if r.gpus:
        each = f" (at least {human_bytes(r.gpu_memory_bytes)} each)" if r.gpu_memory_bytes else ""
        parts.append(f"{r.gpus} gpu{'s' if r.gpus > 1 else ''}{each}")
    return ", ".join(parts)


def task_detail(
    t: TaskInfo, names: Mapping[str, str] | None = None, now_ms: int | None = None
) -> Group:
    """`tasks show`: every field of one task, then its finished attempts."""
    names = names or {}
    state = t.state + (f": {t.reason}" if t.reason and t.reason != t.state else "")
    node = "-"
    if t.node_id:
        node = f"{_node_ref(t.node_id, names)} ({t.node_id})"
        if t.node_address:
            node += f" at {t.node_address}"
    retries = f"{t.max_retries} ({t.failures} failed attempt{'s' if t.failures != 1 else ''})"
    rows = [
        ("ID", t.id),
        ("Name", t.name or "-"),
        ("State", state),
        *([("Job", f"{t.job_id} (rank {t.gang_rank})")] if t.job_id else []),
        ("Owner", t.owner or "-"),
        ("Priority", str(t.priority)),
        ("Command", ("sh -c: " if t.shell else "") + command_text(t)),
        ("Resources", _resources(t)),
        ("Constraints", ", ".join(f"{k}={v}" for k, v in t.constraints.items()) or "<none>"),
        ("Env", ", ".join(f"{k}={v}" for k, v in t.env.items()) or "<none>"),
        ("Workdir", t.workdir or "-"),
        ("Code", t.code_digest[:12] if t.code_digest else "-"),
        ("Timeout", f"{t.timeout_s:g}s" if t.timeout_s else "none"),
        ("Grace", f"{t.grace_s:g}s" if t.grace_s else "default"),
        ("Retries", retries),
        ("Attempt", str(t.attempt)),
        ("Node", node),
        ("GPUs", ", ".join(map(str, t.gpu_indices)) or "-"),
        ("Exit code", _exit(t.exit_code)),
        ("Created", when(t.created_at_ms, now_ms)),
        ("Assigned", when(t.assigned_at_ms, now_ms)),
        ("Started", when(t.started_at_ms, now_ms)),
        ("Finished", when(t.finished_at_ms, now_ms)),
    ]
    if not t.history:
        return Group(_kv(rows))
    history = _table("ATTEMPT", "NODE", "STATE", "EXIT", "STARTED", "RAN", "REASON")
    for h in t.history:
        ran = "-"
        if h.started_at_ms and h.finished_at_ms:
            ran = duration((h.finished_at_ms - h.started_at_ms) / 1000)
        _row(
            history,
            str(h.attempt),
            _node_ref(h.node_id, names),
            h.state,
            _exit(h.exit_code),
            ago(h.started_at_ms, now_ms),
            ran,
            truncate(h.reason, REASON_WIDTH) if h.reason else "",
        )
    return Group(_kv(rows), Text(""), history)
