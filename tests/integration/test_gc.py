"""Garbage collection and paginated lists on a real agent: thousands of finished tasks leave
the state by `cluster gc`, the snapshot shrinks and still round-trips, limited lists stay
exact, and a collected task is reported as collected. (200,000 tasks: benchmarks/gc.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from lepton.client import Client
from tests.integration.cluster import run_ctl, wait_until

TASKS = 2_000
ACTIVE = ["pending", "assigned", "running"]


def ctl_json(server: str, *args: str) -> dict:
    return json.loads(run_ctl("-o", "json", *args, server=server, check=True).stdout)


@pytest.mark.timeout(900)  # thousands of real processes on a shared machine
def test_gc_after_thousands_of_tasks(agents, tmp_path):
    # The loop waits an hour: only `cluster gc` collects here, at a known moment. 40 run at
    # once (2 cpus / 0.05): a node's assignment set holds every attempt placed there, so an
    # unbounded burst would cost the agent more than the tasks.
    voter = agents("voter", "--cpus", "2", "--gc-keep-finished", "100", "--gc-history", "500",
                   "--gc-interval", "3600")
    srv = voter.address
    with Client(srv, timeout=120) as c:  # a generous budget per call on a loaded machine
        submitted = c.submit_many([{"argv": ["true"], "cpu": 0.05} for _ in range(TASKS)])
        assert len(submitted) == TASKS
        wait_until(lambda: not c.tasks(states=ACTIVE, limit=1), timeout=600, interval=1.0,
                   what=f"{TASKS} tasks to finish")
        everything = c.tasks()
        assert len(everything) == TASKS  # paged through: more than one page
        assert [t.id for t in c.tasks(limit=10)] == [t.id for t in everything[-10:]]
    # Collected oldest finished first (ties by id); the history keeps the last 500 of them.
    by_finish = sorted(everything, key=lambda t: (t.finished_at_ms, t.id))

    before = ctl_json(srv, "snapshot", "save", str(tmp_path / "before.lbk"))
    done = ctl_json(srv, "cluster", "gc")
    assert done["tasks_collected"] == TASKS - 100 and done["finished_kept"] == 100
    assert done["history_size"] == 500
    listed = run_ctl("-o", "json", "tasks", "list", "--limit", "10", server=srv, check=True)
    assert len(json.loads(listed.stdout)) == 10
    with Client(srv) as c:
        kept = c.tasks()
        assert len(kept) == 100 and {t.state for t in kept} == {"succeeded"}

    # The oldest collected fell out of the bounded history; a recent one is remembered.
    gone, remembered = by_finish[0].id, by_finish[TASKS - 101].id
    shown = run_ctl("tasks", "show", remembered, server=srv)
    assert shown.returncode != 0 and "garbage-collected" in shown.stderr and "succeeded" in shown.stderr
    assert len(shown.stderr.strip().splitlines()) == 1
    forgotten = run_ctl("tasks", "show", gone, server=srv)
    assert forgotten.returncode != 0 and "not found" in forgotten.stderr

    after = ctl_json(srv, "snapshot", "save", str(tmp_path / "after.lbk"))
    assert after["bytes"] * 5 < before["bytes"], (before, after)

    # The small snapshot restores into a wiped voter and serves the same tasks.
    assert voter.terminate() == 0
    node_id = (voter.data_dir / "node_id").read_text()
    voter.wait_fence_gone()
    shutil.rmtree(voter.data_dir)
    voter.data_dir.mkdir()
    (voter.data_dir / "node_id").write_text(node_id)
    run_ctl("snapshot", "restore", after["file"], "--data-dir", str(voter.data_dir), server=srv, check=True)
    voter.start()
    with Client(srv) as c:
        assert sorted(t.id for t in wait_until(c.tasks, what="the restored tasks")) == sorted(t.id for t in kept)
    shown = run_ctl("tasks", "show", remembered, server=srv)
    assert "garbage-collected" in shown.stderr  # the history came back too


def test_the_leader_loop_collects_by_age(agents):
    voter = agents("voter", "--cpus", "4", "--gc-max-age", "1", "--gc-interval", "0.5")
    srv = voter.address
    with Client(srv) as c:
        task = c.submit(["true"], cpu=0)
        c.wait(task.id)
        wait_until(lambda: not c.tasks(), timeout=60, what="the loop to collect the finished task")
    refused = run_ctl("cluster", "gc", "--keep", "-1", server=srv)
    assert refused.returncode == 2 and "--keep" in refused.stderr
