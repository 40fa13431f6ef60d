"""SIGTERM and SIGHUP to a real `lepton-ctl run` / `logs -f` act as Ctrl-C (issue 16):
`run` cancels its task (or, with --detach, leaves it running and says so); `logs -f` stops."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.client import Client
from tests.integration.cluster import wait_until

pytestmark = pytest.mark.integration

TASK = ["--", "sh", "-c", "echo started; sleep 120"]


def start_ctl(server: str, where: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """The real lepton-ctl with its output in files under `where` (read while it runs)."""
    where.mkdir(exist_ok=True)
    out, err = where / "ctl.out", where / "ctl.err"
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, *args]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e)
    return proc, out, err


def only_task(c: Client):
    tasks = c.tasks()
    assert len(tasks) == 1, tasks
    return tasks[0]


def test_sigterm_to_run_cancels_its_task(agents, tmp_path):
    node = agents("solo")
    proc, out, err = start_ctl(node.address, tmp_path, "run", *TASK)
    try:
        # The task's first line came back through `run`: it runs and `run` follows it.
        wait_until(lambda: "started" in out.read_text(), timeout=60, what="the task to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
        proc.wait()
    with Client(node.address) as c:
        task = only_task(c)
        message = err.read_text()
        assert f"terminated (SIGTERM): cancelled task {task.id}" in message
        assert message.count("\n") == 1
        wait_until(lambda: c.get(task.id).state == "cancelled", timeout=60, what="cancelled")


def test_sighup_to_run_detach_leaves_the_task_running_and_logs_f_stops(agents, tmp_path):
    node = agents("solo")
    proc, out, err = start_ctl(node.address, tmp_path, "run", "--detach", *TASK)
    try:
        wait_until(lambda: "started" in out.read_text(), timeout=60, what="the task to start")
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 130
    finally:
        proc.kill()
        proc.wait()
    with Client(node.address) as c:
        task = only_task(c)
        assert f"detached: task {task.id} keeps running" in err.read_text()
        assert c.get(task.id).state == "running"
        follow, fout, _ = start_ctl(node.address, tmp_path / "logs", "logs", "-f", task.id)
        try:
            wait_until(lambda: "started" in fout.read_text(), timeout=60, what="logs -f output")
            follow.send_signal(signal.SIGTERM)
            assert follow.wait(60) == 130
        finally:
            follow.kill()
            follow.wait()
        assert c.get(task.id).state == "running"  # following stopped; the task did not
        c.cancel(task.id)
