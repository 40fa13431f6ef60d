"""Garbage collection and limited lists at scale (issue 14): N tasks (default 200,000)
submitted with `submit_many` to a real one-voter agent, finished, then collected with
`cluster gc`, in waves of `--wave` (each submitted, then finished, before the next; no
GC until the end). `--finish run`: the agent runs each (`true`). `--finish cancel`: they carry a
constraint no node has, stay pending and are cancelled (CANCELLED is finished): the same
state to collect, without the hours 200,000 process starts take on a small machine.

Measures: time to submit, to finish, to collect; the time of `tasks list --limit 10` (the
client's `tasks(limit=10)`) and of a first page before and after; snapshot bytes (the
`snapshot save` answer) before and after; then the small snapshot is restored into a fresh
data dir and served again (round-trip). `--cpu` sets each task's cpu request: with the
agent's `--cpus`, it bounds how many run at once (each node's assignment set holds every
running attempt, so an unbounded burst costs the agent more than the tasks do).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit  # noqa: E402

from lepton.client import Client  # noqa: E402
from lepton.common.errors import FailedPrecondition  # noqa: E402

ACTIVE = ["pending", "assigned", "running"]


def timed(fn):
    start = time.monotonic()
    value = fn()
    return value, round(time.monotonic() - start, 3)


def cancel(c: Client, task_id: str) -> None:
    try:
        c.cancel(task_id)
    except FailedPrecondition:
        pass  # a retry after a lost reply: already cancelled


def ctl(server: str, *args: str) -> dict:
    """`lepton-ctl -o json ARGS` (snapshot save and restore as an operator runs them)."""
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, "--timeout", "600", "-o", "json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"lepton-ctl {' '.join(args)} failed: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=200_000)
    p.add_argument("--cpus", type=float, default=8.0, help="the agent's --cpus")
    p.add_argument("--cpu", type=float, default=0.125, help="each task's cpu request")
    p.add_argument("--keep", type=int, default=1_000, help="--gc-keep-finished")
    p.add_argument("--history", type=int, default=20_000, help="--gc-history")
    p.add_argument("--finish", choices=("run", "cancel"), default="run")
    p.add_argument("--wave", type=int, default=10_000,
                   help="submitted, then finished, this many at a time: the scheduler looks at every "
                        "pending task on each pass, so 200,000 pending at once would measure it, not GC")
    p.add_argument("--threads", type=int, default=16, help="concurrent cancels (--finish cancel)")
    p.add_argument("--deadline", type=float, default=6 * 3600.0, help="give up waiting after this")
    args = p.parse_args()

    root = tempfile.mkdtemp(prefix="lepton-bench-")
    os.chmod(root, 0o711)  # a --task-user (nobody, for an agent run as root) must pass through
    agent = Agent("--cpus", str(args.cpus), "--gc-keep-finished", str(args.keep),
                  "--gc-history", str(args.history), "--gc-interval", "86400", root=root)
    out: dict = {"tasks": args.tasks, "finish": args.finish, "wave": args.wave, "agent_cpus": args.cpus, "task_cpu": args.cpu,
                 "keep_finished": args.keep, "history": args.history}
    try:
        with Client(agent.address, timeout=600) as c:
            nowhere = {"constraints": {"bench": "nowhere"}} if args.finish == "cancel" else {}
            spec = {"argv": ["true"], "cpu": args.cpu, "name": "gc-bench", **nowhere}
            deadline = time.monotonic() + args.deadline

            def finish(wave: list) -> None:
                if args.finish == "cancel":
                    with ThreadPoolExecutor(args.threads) as pool:
                        list(pool.map(lambda t: cancel(c, t.id), wave))
                while c.tasks(states=ACTIVE, limit=1):
                    if time.monotonic() > deadline:
                        raise SystemExit("tasks did not finish before --deadline")
                    time.sleep(1.0)

            out["submit_s"] = out["finish_s"] = 0.0
            for lo in range(0, args.tasks, args.wave):
                wave, took = timed(partial(c.submit_many, [spec] * min(args.wave, args.tasks - lo)))
                out["submit_s"] += took
                out["finish_s"] += timed(partial(finish, wave))[1]
            out["submit_s"], out["finish_s"] = round(out["submit_s"], 1), round(out["finish_s"], 1)
            listed, out["list_limit10_before_s"] = timed(lambda: c.tasks(limit=10))
            assert len(listed) == 10
            _, out["list_all_before_s"] = timed(lambda: c.tasks())
            before, out["snapshot_before_s"] = timed(
                lambda: ctl(agent.address, "snapshot", "save", f"{agent.root}/before.lbk"))
            out["snapshot_bytes_before"] = before["bytes"]
            done, out["gc_s"] = timed(lambda: c.collect_garbage())
            out.update({f"gc_{k}": v for k, v in done.items()})
            listed, out["list_limit10_after_s"] = timed(lambda: c.tasks(limit=10))
            assert len(listed) == 10
            after, out["snapshot_after_s"] = timed(
                lambda: ctl(agent.address, "snapshot", "save", f"{agent.root}/after.lbk"))
            out["snapshot_bytes_after"] = after["bytes"]
            kept = sorted(t.id for t in c.tasks())
        out["restore_round_trip"] = round_trip(agent, after, kept)
    finally:
        agent.stop()
        emit(out)  # what was measured, even when a later step failed


def round_trip(agent: Agent, saved: dict, kept: list[str]) -> bool:
    """`snapshot restore` of the collected snapshot into a fresh data dir; the agent started
    on it serves the same tasks."""
    agent.stop()
    restored_dir = Path(agent.root) / "restored"
    restored_dir.mkdir()
    ctl(agent.address, "snapshot", "restore", saved["file"], "--data-dir", str(restored_dir))
    restored = Agent("--gc-interval", "86400", name="restored", root=agent.root)
    try:
        with Client(restored.address, timeout=120) as c:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    return sorted(t.id for t in c.tasks()) == kept
                except Exception:  # noqa: BLE001 - still electing itself
                    time.sleep(0.5)
            return False
    finally:
        restored.stop()


if __name__ == "__main__":
    main()
