"""A report's task events committed as one command (TaskEventsCmd): applied in order, each
as a TaskEventCmd of its own would be, so N exits cost one Raft round and nothing else moves."""

from __future__ import annotations

from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, state_pb2, tasks_pb2

KIND = tasks_pb2.TaskEvent


def placed(n: int) -> ClusterStateMachine:
    """A state with node n1 and tasks t0..t(n-1) placed on it (one retry each)."""
    sm = ClusterStateMachine()
    cmds = [
        state_pb2.Command(register_node=state_pb2.RegisterNodeCmd(
            node_id="n1", name="one", address="127.0.0.1:1",
            capacity=common_pb2.Capacity(cpu_logical=4, memory_bytes=8 << 30))),
        state_pb2.Command(submit_tasks=state_pb2.SubmitTasksCmd(tasks=[
            state_pb2.SubmitTaskCmd(task_id=f"t{i}", spec=tasks_pb2.TaskSpec(argv=["true"], max_retries=1))
            for i in range(n)])),
        state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
            state_pb2.PlacementCmd(task_id=f"t{i}", attempt=1, node_id="n1") for i in range(n)])),
    ]
    for index, cmd in enumerate(cmds, 1):
        cmd.at_ms = 1000
        assert not isinstance(sm.apply(index, cmd.SerializeToString()), Exception)
    return sm


def events() -> list[tasks_pb2.TaskEvent]:
    """Starts and exits of four tasks, one failing (retried: attempt 2), a late repeat of its
    attempt 1 (stale by then), a repeat start, and one from the wrong attempt."""
    return [
        tasks_pb2.TaskEvent(task_id="t0", attempt=1, kind=KIND.KIND_STARTED, at_ms=1100),
        tasks_pb2.TaskEvent(task_id="t1", attempt=1, kind=KIND.KIND_STARTED, at_ms=1100),
        tasks_pb2.TaskEvent(task_id="t0", attempt=1, kind=KIND.KIND_EXITED, exit_code=0, at_ms=1200),
        tasks_pb2.TaskEvent(task_id="t1", attempt=1, kind=KIND.KIND_EXITED, exit_code=3, at_ms=1200),
        tasks_pb2.TaskEvent(task_id="t1", attempt=1, kind=KIND.KIND_EXITED, exit_code=0, at_ms=1300),
        tasks_pb2.TaskEvent(task_id="t2", attempt=1, kind=KIND.KIND_STARTED, at_ms=1100),
        tasks_pb2.TaskEvent(task_id="t2", attempt=1, kind=KIND.KIND_STARTED, at_ms=1150),
        tasks_pb2.TaskEvent(task_id="t3", attempt=7, kind=KIND.KIND_EXITED, exit_code=0, at_ms=1200),
    ]


def test_a_batch_ends_in_the_state_its_events_one_by_one_reach():
    one_by_one, batched = placed(4), placed(4)
    for index, ev in enumerate(events(), 4):
        cmd = state_pb2.Command(at_ms=2000, task_event=state_pb2.TaskEventCmd(node_id="n1", event=ev))
        assert not isinstance(one_by_one.apply(index, cmd.SerializeToString()), Exception)
    cmd = state_pb2.Command(at_ms=2000, task_events=state_pb2.TaskEventsCmd(node_id="n1", events=events()))
    assert batched.apply(4, cmd.SerializeToString()) == len(events())
    got = {t: batched.tasks.get(t) for t in ("t0", "t1", "t2", "t3")}
    assert got["t0"].state == tasks_pb2.TASK_STATE_SUCCEEDED
    # t1 failed once (retried, attempt 2 pending); the late exit of attempt 1 changed nothing.
    assert got["t1"].state == tasks_pb2.TASK_STATE_PENDING and got["t1"].attempt == 2
    assert got["t1"].failures == 1
    assert got["t2"].state == tasks_pb2.TASK_STATE_RUNNING and got["t2"].started_at_ms == 1100
    assert got["t3"].state == tasks_pb2.TASK_STATE_ASSIGNED
    for t in got:
        assert one_by_one.tasks.get(t) == got[t]


def test_events_about_unknown_tasks_or_kinds_are_skipped_not_the_batch():
    sm = placed(2)
    batch = [
        tasks_pb2.TaskEvent(task_id="t-gone", attempt=1, kind=KIND.KIND_EXITED, exit_code=0),
        tasks_pb2.TaskEvent(task_id="t0", attempt=1, kind=KIND.KIND_UNSPECIFIED),
        tasks_pb2.TaskEvent(task_id="t1", attempt=1, kind=KIND.KIND_EXITED, exit_code=0),
    ]
    cmd = state_pb2.Command(at_ms=2000, task_events=state_pb2.TaskEventsCmd(node_id="n1", events=batch))
    assert sm.apply(4, cmd.SerializeToString()) == 1
    assert sm.tasks.get("t0").state == tasks_pb2.TASK_STATE_ASSIGNED
    assert sm.tasks.get("t1").state == tasks_pb2.TASK_STATE_SUCCEEDED


def test_events_from_another_node_change_nothing():
    sm = placed(1)
    batch = [tasks_pb2.TaskEvent(task_id="t0", attempt=1, kind=KIND.KIND_EXITED, exit_code=0)]
    cmd = state_pb2.Command(at_ms=2000, task_events=state_pb2.TaskEventsCmd(node_id="n2", events=batch))
    sm.apply(4, cmd.SerializeToString())
    assert sm.tasks.get("t0").state == tasks_pb2.TASK_STATE_ASSIGNED
