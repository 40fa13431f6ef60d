"""TaskRunner at process speed (issue 15): claims recorded once per batch, exits learnt from
the fence or pidfds (no polling), large batches spawned in the background with cancels and fencing
holding. Real subprocesses; outcomes asserted, never durations."""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal

from lepton.agent.tasks import exit_watch
from lepton.agent.tasks import runner as runner_mod
from lepton.agent.tasks import spawn as spawn_mod
from lepton.agent.tasks.claims import CLAIMS_DIR, ClaimLog
from lepton.agent.tasks.exit_watch import ExitWatch
from lepton.agent.tasks.runner import RunSpec, TaskEventKind
from tests.unit import test_runner as base
from tests.unit.test_runner import gone, kill_fence, sh, wait_until

node = base.node  # the fixture: one data dir, its runners, and what a test leaves running killed


def true(task_id: str, attempt: int = 1, term: int = 1) -> RunSpec:
    return RunSpec(task_id=task_id, attempt=attempt, term=term, argv=("true",))


async def test_a_batch_is_claimed_in_one_file_and_settled_into_the_folders(node):
    r = await node.runner()
    assert r.reconcile([true(f"t{i}", term=3) for i in range(5)], term=3).startswith("started 5")
    claims = ClaimLog(node.data_dir / "tasks")
    for i in range(5):
        await node.exited(f"t{i}")
    assert len(list((node.data_dir / CLAIMS_DIR).iterdir())) == 1  # one file (one fsync) for the batch
    assert claims.pending() == {(f"t{i}", 1): 3 for i in range(5)}  # settled every SETTLE_S only
    assert claims.settle() == 1
    assert claims.pending() == {} and list((node.data_dir / CLAIMS_DIR).iterdir()) == []


async def test_a_claimed_attempt_whose_folder_a_power_cut_took_is_lost_not_run_again(node):
    r1 = await node.runner()
    r1.launch(sh("t", "sleep 1000", attempt=2))
    await r1.stop()
    r1_pid = node.of("t", 2, TaskEventKind.STARTED)[0].pid
    # As after a power cut: the task is gone, and so is its folder (never fsync'd), but not the claim.
    os.killpg(r1_pid, signal.SIGKILL)
    await wait_until(lambda: (node.data_dir / "tasks/t/2/exit.json").exists() and gone(r1_pid), "the fence's record")
    shutil.rmtree(node.data_dir / "tasks" / "t")
    r2 = await node.runner()
    [ev] = node.of("t", 2, TaskEventKind.EXITED)
    assert (ev.reason, ev.term) == ("lost", 1)
    # The leader may still send it: it already ran here, so it does not run again.
    assert "1 already ran" in r2.reconcile([sh("t", "sleep 1000", attempt=2)], term=1)
    assert r2.running() == [] and len(node.of("t", 2, TaskEventKind.STARTED)) == 1


async def test_exits_wake_the_runner_without_polling(node, monkeypatch):
    monkeypatch.setattr(runner_mod, "SCAN_S", 3600.0)  # no backstop scan, no poll: pidfds alone
    monkeypatch.setattr(runner_mod, "POLL_S", 3600.0)
    r = await node.runner()
    r.launch(sh("t", "exit 3"))
    assert not r._attempts.polled  # watched by its pidfd
    assert (await node.exited("t")).exit_code == 3
    r.launch(RunSpec(task_id="d", attempt=1, term=1, argv=("sleep", "1000"), timeout_s=0.2))
    assert (await node.exited("d")).reason == "timeout"  # a timer, not a poll


async def test_a_large_batch_starts_in_the_background_each_attempt_once(node):
    r = await node.runner()
    n = spawn_mod.SPAWN_CHUNK + 5  # more than one background chunk
    specs = [true(f"t{i:03d}") for i in range(n)]
    assert r.reconcile(specs, term=1) == f"started {n}, stopped 0, {n} running"
    assert len(r.running()) == n  # those being spawned count as running
    assert r.reconcile(specs, term=1).startswith("started 0")  # level-triggered: no second start
    for s in specs:
        assert (await node.exited(s.task_id)).exit_code == 0
    for s in specs:
        assert len(node.of(s.task_id, kind=TaskEventKind.STARTED)) == 1
        assert len(node.of(s.task_id, kind=TaskEventKind.EXITED)) == 1
    await wait_until(lambda: not r.running(), "every attempt to be over")


async def test_a_newer_set_stops_a_background_batch_and_none_runs_twice(node):
    r = await node.runner()
    n = 2 * spawn_mod.SPAWN_CHUNK
    specs = [sh(f"s{i:03d}", "sleep 1000") for i in range(n)]
    r.reconcile(specs, term=1)
    for _ in range(3):
        await asyncio.sleep(0)  # the first chunk goes to the spawning threads; the rest wait
    assert r.reconcile([], term=2) == f"started 0, stopped {n}, 0 running"  # before most have started
    for s in specs:
        ev = await node.exited(s.task_id)
        assert ev.reason == "cancelled"
    await wait_until(lambda: not r.running(), "every attempt to be over")
    started = sum(len(node.of(s.task_id, kind=TaskEventKind.STARTED)) for s in specs)
    assert started < n  # the ones still waiting never started...
    for s in specs:  # ...and each one ended exactly once
        assert len(node.of(s.task_id, kind=TaskEventKind.EXITED)) == 1
    assert r.reconcile(specs, term=1).startswith("ignored")  # the stale term stays fenced


async def test_a_watched_pid_now_held_by_another_process_counts_as_ended():
    fired = []
    watch = ExitWatch(fired.append)
    assert watch.watch("k", os.getpid(), -1.0)  # alive, but not the process that started then
    await wait_until(lambda: fired, "the watch to fire")
    assert fired == ["k"] and not watch.polled
    watch.close()


async def test_past_its_descriptor_budget_an_attempt_is_polled_and_still_seen_to_end(node, monkeypatch):
    r1 = await node.runner()
    r1.launch(sh("a", "sleep 1000"))
    r1.launch(sh("b", "while [ ! -f go ]; do sleep 0.02; done; exit 5"))
    await r1.stop()
    await kill_fence(node.data_dir)  # orphans now: pidfds watch them, not the fence
    # As if half the open-file limit were in use: one pidfd left.
    monkeypatch.setattr(exit_watch, "FDS_KEPT", resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 - 1)
    r = await node.runner()
    assert ("b", 1) in r._attempts.polled and ("a", 1) not in r._attempts.polled
    (node.data_dir / "tasks/b/1/go").touch()
    ev = await node.exited("b")  # by the 0.1 s poll; no fence recorded its status
    assert (ev.exit_code, ev.reason) == (None, "lost")
