"""Garbage collection of finished work in the state machine (coordinator/state/retention.py)."""

from __future__ import annotations

import pytest

from lepton.common.errors import NotFound
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, state_pb2, tasks_pb2

STARTED, EXITED = tasks_pb2.TaskEvent.KIND_STARTED, tasks_pb2.TaskEvent.KIND_EXITED


class World:
    """A state machine fed commands stamped with an explicit clock (`at`)."""

    def __init__(self):
        self.sm = ClusterStateMachine()
        self.index = 0
        self.at = 1_000
        for n in ("a", "b"):
            self.apply(register_node=state_pb2.RegisterNodeCmd(
                node_id=n, name=n, address=f"10.0.0.{len(n)}:7070",
                capacity=common_pb2.Capacity(cpu_logical=64, memory_bytes=1 << 40)))

    def apply(self, **op):
        self.index += 1
        return self.sm.apply(self.index, state_pb2.Command(at_ms=self.at, **op).SerializeToString())

    def submit(self, task_id, rid=""):
        spec = tasks_pb2.TaskSpec(name=f"name-{task_id}", argv=["true"], owner="alice", request_id=rid)
        return self.apply(submit_task=state_pb2.SubmitTaskCmd(task_id=task_id, spec=spec))

    def run(self, task_id, code=0, node="a"):
        """Place, start and end the task's attempt on `node`."""
        t = self.sm.tasks.tasks[task_id]
        self.apply(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
            state_pb2.PlacementCmd(task_id=task_id, attempt=t.attempt, node_id=node)]))
        self.event(task_id, STARTED)
        if code is not None:
            self.event(task_id, EXITED, code)

    def event(self, task_id, kind, code=0):
        t = self.sm.tasks.tasks[task_id]
        self.apply(task_event=state_pb2.TaskEventCmd(node_id=t.node_id, event=tasks_pb2.TaskEvent(
            task_id=task_id, attempt=t.attempt, kind=kind, exit_code=code)))

    def gc(self, keep=1000, max_age_ms=None, history=1000):
        cmd = state_pb2.CollectGarbageCmd(keep_finished=keep, history_limit=history)
        if max_age_ms is not None:
            cmd.max_age_ms = max_age_ms
        return self.apply(collect_garbage=cmd)

    def ids(self):
        return sorted(self.sm.tasks.tasks)


def finished_world(n=5) -> World:
    """Tasks t0..t(n-1), each finished 1 s after the previous one."""
    w = World()
    for i in range(n):
        w.at += 1_000
        w.submit(f"t{i}")
        w.run(f"t{i}", code=i % 2)  # odd ones fail
    return w


def test_count_keeps_the_newest_finished_and_summarizes_the_rest():
    w = finished_world(5)
    done = w.gc(keep=2)
    assert (done.tasks, done.jobs, done.finished_kept) == (3, 0, 2)
    assert w.ids() == ["t3", "t4"]
    assert [t for _, t in w.sm.tasks.order] == ["t3", "t4"]
    s = w.sm.tasks.history.get("t1")
    assert (s.name, s.owner, s.state, s.has_exit_code, s.exit_code) == (
        "name-t1", "alice", tasks_pb2.TASK_STATE_FAILED, True, 1)
    assert (s.created_at_ms, s.finished_at_ms, s.collected_at_ms) == (3_000, 3_000, w.at)
    with pytest.raises(NotFound, match="garbage-collected.*failed \\(exit code 1\\)"):
        w.sm.tasks.get("t1")
    with pytest.raises(NotFound, match='task "nope" not found'):
        w.sm.tasks.get("nope")


def test_age_collects_what_finished_before_the_commands_time_only():
    w = finished_world(5)  # t0 finished at 2_000 ... t4 at 6_000
    w.at = 8_500
    done = w.gc(keep=100, max_age_ms=4_500)  # keeps what finished at 4_000 or later
    assert done.tasks == 2 and w.ids() == ["t2", "t3", "t4"]
    assert w.gc(keep=100, max_age_ms=4_500).tasks == 0  # nothing more at the same time


def test_never_collects_unfinished_work():
    w = World()
    w.submit("pending")
    w.submit("running")
    w.run("running", code=None)
    w.submit("assigned")
    w.apply(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
        state_pb2.PlacementCmd(task_id="assigned", attempt=1, node_id="b")]))
    w.at += 10**9
    done = w.gc(keep=0, max_age_ms=0)
    assert done.tasks == 0 and w.ids() == ["assigned", "pending", "running"]


def test_the_history_is_bounded_keeping_the_latest_collected():
    w = finished_world(6)
    w.gc(keep=3, history=2)  # t0, t1, t2 collected: only t1, t2 remembered
    assert [s.id for s in w.sm.tasks.history.summaries()] == ["t1", "t2"]
    w.gc(keep=0, history=2)
    assert [s.id for s in w.sm.tasks.history.summaries()] == ["t4", "t5"]
    assert not w.sm.tasks.tasks


def test_a_job_goes_whole_and_only_once_every_member_finished():
    w = World()
    spec = tasks_pb2.TaskSpec(argv=["train"], owner="bob", request_id="job-r",
                              torch=tasks_pb2.TorchSpec(nproc_per_node=1))
    w.apply(submit_job=state_pb2.SubmitJobCmd(job_id="j1", spec=spec, nodes=2))
    w.apply(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
        state_pb2.PlacementCmd(task_id="j1-0", attempt=1, node_id="a"),
        state_pb2.PlacementCmd(task_id="j1-1", attempt=1, node_id="b")]))
    w.event("j1-0", STARTED)
    w.event("j1-1", STARTED)
    w.event("j1-0", EXITED, 0)  # rank 0 done, rank 1 still running
    w.at += 10**6
    assert w.gc(keep=0, max_age_ms=0).tasks == 0 and "j1" in w.sm.tasks.jobs
    w.event("j1-1", EXITED, 0)
    w.at += 10**6
    done = w.gc(keep=0, max_age_ms=0)
    assert (done.tasks, done.jobs) == (2, 1)
    assert not w.sm.tasks.tasks and "j1" not in w.sm.tasks.jobs and not w.sm.tasks.job_requests
    assert w.sm.tasks.history.get("j1-1").job_id == "j1"
    with pytest.raises(NotFound, match='job "j1" was garbage-collected'):
        w.sm.tasks.job("j1")
    with pytest.raises(NotFound, match='job "j2" not found'):
        w.sm.tasks.job("j2")


def test_a_job_counts_once_against_keep_finished():
    w = finished_world(2)
    w.at += 1_000
    spec = tasks_pb2.TaskSpec(argv=["x"], torch=tasks_pb2.TorchSpec(nproc_per_node=1))
    w.apply(submit_job=state_pb2.SubmitJobCmd(job_id="j1", spec=spec, nodes=2))
    w.apply(cancel_task=state_pb2.CancelTaskCmd(task_id="j1-0"))  # the whole gang is cancelled
    done = w.gc(keep=2)
    assert done.tasks == 1 and w.ids() == ["j1-0", "j1-1", "t1"]


def test_a_collected_request_id_no_longer_answers_and_lists_stay_sorted():
    w = finished_world(1)
    w.at += 1_000
    w.submit("r", rid="req-1")
    w.run("r")
    w.gc(keep=0)
    assert "req-1" not in w.sm.tasks.by_request
    w.at += 1_000
    w.submit("r2", rid="req-1")  # a new task: the old one's idempotency ended with it
    assert w.ids() == ["r2"] and w.sm.tasks.order == [(w.at, "r2")]


def test_snapshots_carry_the_history_and_replicas_agree():
    w = finished_world(4)
    w.gc(keep=1)
    data = w.sm.snapshot()
    other = ClusterStateMachine()
    other.restore(data, w.sm.applied_index)
    assert other.snapshot() == data
    assert [s.id for s in other.tasks.history.summaries()] == ["t0", "t1", "t2"]
    assert other.tasks.order == w.sm.tasks.order
    with pytest.raises(NotFound, match="garbage-collected"):
        other.tasks.get("t0")


def test_the_snapshot_shrinks_under_churn():
    w = World()
    sizes = []
    for round_ in range(3):
        for i in range(200):
            w.at += 10
            w.submit(f"r{round_}-{i}")
            w.run(f"r{round_}-{i}")
        w.gc(keep=50, history=100)
        sizes.append(len(w.sm.snapshot()))
    assert len(w.sm.tasks.tasks) == 50 and len(w.sm.tasks.history) == 100
    assert sizes[2] <= sizes[0] * 1.1  # bounded, not growing with every round


def test_a_large_backlog_goes_over_several_commands_oldest_first(monkeypatch):
    from lepton.coordinator.state import retention

    monkeypatch.setattr(retention, "MAX_PER_COMMAND", 2)
    w = finished_world(5)
    steps = []
    while True:
        done = w.gc(keep=0)
        steps.append((done.tasks, done.finished_kept, done.more))
        if not done.more:
            break
    assert steps == [(2, 3, True), (2, 1, True), (1, 0, False)]
    assert [s.id for s in w.sm.tasks.history.summaries()] == ["t0", "t1", "t2", "t3", "t4"]
    assert not w.sm.tasks.order
