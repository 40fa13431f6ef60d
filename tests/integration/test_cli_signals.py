"""SIGTERM and SIGHUP to a real `lepton-ctl run` / `logs -f` act as Ctrl-C (issue 16):
`run` cancels its task (or, with --detach, leaves it running and says so); `logs -f` stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.client import Client
from lepton.client.cli_tasks import HOLD_AFTER_SUBMIT_ENV
from tests.integration.cluster import wait_until

pytestmark = pytest.mark.integration

TASK = ["--", "sh", "-c", "echo started; sleep 120"]


def start_ctl(server: str, where: Path, *args: str, env: dict[str, str] | None = None,
              ) -> tuple[subprocess.Popen, Path, Path]:
    """The real lepton-ctl with its output in files under `where` (read while it runs)."""
    where.mkdir(exist_ok=True)
    out, err = where / "ctl.out", where / "ctl.err"
    cmd = [sys.executable, "-m", "lepton.client.cli", "--server", server, *args]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, env={**os.environ, **(env or {})})
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
        # The last line says so (a `pending` note may come before it on a loaded machine).
        lines = err.read_text().splitlines()
        assert lines[-1] == f"lepton-ctl: terminated (SIGTERM): cancelled task {task.id}", lines
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


# `run` holds after its submission returned, inside the window where a signal is handled
# as if the answer had not come back: the stored task is found by its request id.
HOLD = {HOLD_AFTER_SUBMIT_ENV: "300"}


@pytest.mark.parametrize("job", [False, True], ids=["task", "job"])
def test_sigterm_during_submission_cancels_what_was_stored(agents, tmp_path, job):
    node = agents("solo")
    nodes = ["--nodes", "1"] if job else []
    proc, _, err = start_ctl(node.address, tmp_path, "run", *nodes, *TASK, env=HOLD)
    with Client(node.address) as c:
        try:
            wait_until(lambda: c.tasks(), timeout=60, what="the submission to be stored")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 130
        finally:
            proc.kill()
            proc.wait()
        task = only_task(c)  # looked up, not submitted twice
        shown = f"job {task.job_id}" if job else f"task {task.id}"
        lines = err.read_text().splitlines()
        assert lines == [f"lepton-ctl: terminated (SIGTERM): cancelled {shown}"], lines
        wait_until(lambda: c.get(task.id).state == "cancelled", timeout=60, what="cancelled")


def test_sigterm_during_submission_with_detach_leaves_it_and_names_it(agents, tmp_path):
    node = agents("solo")
    proc, _, err = start_ctl(node.address, tmp_path, "run", "--detach", *TASK, env=HOLD)
    with Client(node.address) as c:
        try:
            wait_until(lambda: c.tasks(), timeout=60, what="the submission to be stored")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 130
        finally:
            proc.kill()
            proc.wait()
        task = only_task(c)
        assert f"detached: task {task.id} keeps running" in err.read_text()
        # Left to run: it starts (a cancelled one would not).
        wait_until(lambda: c.get(task.id).state == "running", timeout=60, what="running")
        c.cancel(task.id)
