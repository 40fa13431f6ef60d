from __future__ import annotations

import pytest

from lepton.common.errors import FailedPrecondition, NotFound
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState, can_transition
from lepton.v1 import common_pb2, state_pb2, tasks_pb2


def register(node_id="n1", name="one", at=1000, **kw) -> bytes:
    cap = common_pb2.Capacity(cpu_logical=4, memory_bytes=8 << 30)
    return state_pb2.Command(
        at_ms=at,
        register_node=state_pb2.RegisterNodeCmd(node_id=node_id, name=name, address="127.0.0.1:1", capacity=cap, **kw),
    ).SerializeToString()


def set_state(node_id, state: NodeState, at=2000) -> bytes:
    return state_pb2.Command(
        at_ms=at, set_node_state=state_pb2.SetNodeStateCmd(node_id=node_id, state=state.proto, reason="t")
    ).SerializeToString()


def test_register_is_idempotent_and_updates():
    sm = ClusterStateMachine()
    sm.apply(1, register(labels={"a": "1"}))
    sm.apply(2, register(labels={"b": "2"}, at=5000))
    node = sm.get_node("n1")
    assert dict(node.labels) == {"b": "2"}
    assert node.registered_at_ms == 1000  # first registration time is kept
    assert len(sm.nodes) == 1


def test_lifecycle_transitions_and_illegal_ones():
    sm = ClusterStateMachine()
    sm.apply(1, register())
    assert sm.apply(2, set_state("n1", NodeState.SUSPECT)).state == NodeState.SUSPECT.proto
    assert sm.apply(3, set_state("n1", NodeState.DOWN)).state == NodeState.DOWN.proto
    err = sm.apply(4, set_state("n1", NodeState.SUSPECT))
    assert isinstance(err, FailedPrecondition) and "down to suspect" in err.message
    assert sm.get_node("n1").state == NodeState.DOWN.proto  # unchanged by the rejected command
    assert sm.apply(5, set_state("n1", NodeState.READY)).state == NodeState.READY.proto
    assert sm.apply(6, set_state("n1", NodeState.LEFT)).state == NodeState.LEFT.proto
    assert isinstance(sm.apply(7, set_state("n1", NodeState.READY)), FailedPrecondition)
    sm.apply(8, register())  # re-register brings a left node back
    assert sm.get_node("n1").state == NodeState.READY.proto


def test_unknown_node_and_garbage_commands_return_errors_not_raise():
    sm = ClusterStateMachine()
    assert isinstance(sm.apply(1, set_state("ghost", NodeState.DOWN)), NotFound)
    assert sm.apply(2, b"\xff\xff not a proto") is not None
    assert sm.applied_index == 2
    with pytest.raises(NotFound):
        sm.get_node("ghost")


def test_apply_refuses_to_go_backwards():
    sm = ClusterStateMachine()
    sm.apply(1, register())
    with pytest.raises(ValueError):
        sm.apply(1, register())


def test_snapshot_restore_roundtrip_is_exact():
    sm = ClusterStateMachine()
    sm.apply(1, register("n1", "one"))
    sm.apply(2, register("n2", "two"))
    sm.apply(3, set_state("n2", NodeState.SUSPECT))
    sm.apply(4, state_pb2.Command(set_drain=state_pb2.SetDrainCmd(node_id="n1", draining=True)).SerializeToString())
    data = sm.snapshot()
    other = ClusterStateMachine()
    other.restore(data, 4)
    assert other.snapshot() == data
    assert other.applied_index == 4
    assert other.get_node("n1").draining


def test_same_log_same_state_on_two_replicas():
    log = [register("n1"), register("n2"), set_state("n1", NodeState.SUSPECT), set_state("n1", NodeState.READY)]
    a, b = ClusterStateMachine(), ClusterStateMachine()
    for i, data in enumerate(log, 1):
        a.apply(i, data)
        b.apply(i, data)
    assert a.snapshot() == b.snapshot()


def test_listeners_see_changes_and_a_broken_one_does_not_stop_apply():
    sm = ClusterStateMachine()
    seen = []
    sm.add_listener(lambda c: (_ for _ in ()).throw(RuntimeError("boom")))
    sm.add_listener(seen.append)
    sm.apply(1, register())
    sm.apply(2, set_state("n1", NodeState.SUSPECT))
    assert [c.index for c in seen] == [1, 2]


def test_transition_table():
    assert can_transition(NodeState.READY, NodeState.SUSPECT)
    assert not can_transition(NodeState.READY, NodeState.DOWN)
    assert not can_transition(NodeState.LEFT, NodeState.READY)


def test_an_attempt_its_agent_stopped_gracefully_is_requeued_not_failed():
    from lepton.v1 import tasks_pb2

    sm = ClusterStateMachine()
    sm.apply(1, register("n1"))
    spec = tasks_pb2.TaskSpec(argv=["sleep", "60"], max_retries=0)
    sm.apply(2, state_pb2.Command(submit_task=state_pb2.SubmitTaskCmd(task_id="t1", spec=spec)).SerializeToString())
    sm.apply(3, state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
        state_pb2.PlacementCmd(task_id="t1", attempt=1, node_id="n1")])).SerializeToString())

    def exited(index, requeue):
        ev = tasks_pb2.TaskEvent(task_id="t1", attempt=sm.tasks.get("t1").attempt,
                                 kind=tasks_pb2.TaskEvent.KIND_EXITED, exit_code=-15,
                                 reason="agent stopping", requeue=requeue)
        return sm.apply(index, state_pb2.Command(task_event=state_pb2.TaskEventCmd(
            node_id="n1", event=ev)).SerializeToString())

    task = exited(4, requeue=True)
    assert task.state == tasks_pb2.TASK_STATE_PENDING and task.attempt == 2 and task.failures == 0
    sm.apply(5, state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
        state_pb2.PlacementCmd(task_id="t1", attempt=2, node_id="n1")])).SerializeToString())
    task = exited(6, requeue=False)  # the same exit, not flagged: a failure, and no retries left
    assert task.state == tasks_pb2.TASK_STATE_FAILED and task.failures == 1


def test_a_node_that_left_comes_back_undrained_but_a_crash_keeps_the_drain():
    sm = ClusterStateMachine()
    sm.apply(1, register("n1"))
    drain = state_pb2.Command(set_drain=state_pb2.SetDrainCmd(node_id="n1", draining=True)).SerializeToString()
    sm.apply(2, drain)
    sm.apply(3, set_state("n1", NodeState.LEFT))
    sm.apply(4, register("n1"))
    assert not sm.get_node("n1").draining
    sm.apply(5, drain)
    sm.apply(6, set_state("n1", NodeState.SUSPECT))
    sm.apply(7, set_state("n1", NodeState.DOWN))
    sm.apply(8, register("n1"))
    assert sm.get_node("n1").draining


def submit_batch(*pairs, at=1000) -> bytes:
    return state_pb2.Command(at_ms=at, submit_tasks=state_pb2.SubmitTasksCmd(tasks=[
        state_pb2.SubmitTaskCmd(task_id=tid, spec=tasks_pb2.TaskSpec(argv=["true"], request_id=rid))
        for tid, rid in pairs
    ])).SerializeToString()


def test_a_batch_of_submissions_is_stored_whole_or_not_at_all():
    sm = ClusterStateMachine()
    got = sm.apply(1, submit_batch(("t-a", "r1"), ("t-b", "r2"), ("t-c", "r1")))
    # The third repeats r1's request id: it answers with t-a, as a retried submit does.
    assert [t.id for t in got] == ["t-a", "t-b", "t-a"]
    assert sorted(sm.tasks.tasks) == ["t-a", "t-b"]
    # A taken id anywhere refuses the whole batch before anything is stored.
    err = sm.apply(2, submit_batch(("t-d", "r4"), ("t-b", "r5")))
    assert isinstance(err, FailedPrecondition) and "t-b" in err.message
    err = sm.apply(3, submit_batch(("t-e", ""), ("t-e", "")))
    assert isinstance(err, FailedPrecondition) and "twice" in err.message
    assert sorted(sm.tasks.tasks) == ["t-a", "t-b"] and "r4" not in sm.tasks.by_request


def submit_one(task_id, rid, at=1000) -> bytes:
    return state_pb2.Command(at_ms=at, submit_task=state_pb2.SubmitTaskCmd(
        task_id=task_id, spec=tasks_pb2.TaskSpec(argv=["true"], request_id=rid))).SerializeToString()


def test_an_unanswered_apply_builds_no_result_and_leaves_the_same_state():
    """A follower applies with answered=False (nobody waits): no task copies are returned,
    and its table ends exactly as the leader's, refusals included."""
    leader, follower = ClusterStateMachine(), ClusterStateMachine()
    log = [submit_one("t-a", "r1"), submit_batch(("t-b", "r2"), ("t-c", "r1")), submit_one("t-d", "r1"),
           submit_one("t-a", "r9")]
    answers = [leader.apply(i, data) for i, data in enumerate(log, 1)]
    quiet = [follower.apply(i, data, answered=False) for i, data in enumerate(log, 1)]
    assert answers[0].id == "t-a" and [t.id for t in answers[1]] == ["t-b", "t-a"] and answers[2].id == "t-a"
    assert isinstance(answers[3], FailedPrecondition) and isinstance(quiet[3], FailedPrecondition)
    assert quiet[:3] == [None, [None, None], None]
    assert follower.snapshot() == leader.snapshot()
    assert follower.tasks.by_request == leader.tasks.by_request and follower.tasks.pending == leader.tasks.pending
    # The answer is a copy: editing it changes nothing stored.
    answers[0].spec.argv.append("x")
    assert list(leader.tasks.tasks["t-a"].spec.argv) == ["true"]


def test_a_lost_node_requeues_its_attempts_without_a_failure_until_the_budget_is_spent():
    from lepton.coordinator.state.tasks import MAX_NODE_LOSSES

    sm = ClusterStateMachine()
    index = iter(range(1, 1000))
    sm.apply(next(index), register("n1"))
    spec = tasks_pb2.TaskSpec(argv=["sleep", "60"], max_retries=0)
    sm.apply(next(index), state_pb2.Command(submit_task=state_pb2.SubmitTaskCmd(task_id="t1", spec=spec)).SerializeToString())
    lost = state_pb2.Command(node_lost=state_pb2.NodeLostCmd(node_id="n1", reason="node_lost")).SerializeToString()
    for loss in range(1, MAX_NODE_LOSSES + 2):
        sm.apply(next(index), register("n1"))  # back, and placed again
        sm.apply(next(index), state_pb2.Command(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
            state_pb2.PlacementCmd(task_id="t1", attempt=loss, node_id="n1")])).SerializeToString())
        assert isinstance(sm.apply(next(index), lost), FailedPrecondition)  # not down: it lives on
        sm.apply(next(index), set_state("n1", NodeState.SUSPECT))
        sm.apply(next(index), set_state("n1", NodeState.DOWN))
        # Down is not yet lost: the attempt may run until its lease ends.
        assert sm.tasks.get("t1").state == tasks_pb2.TASK_STATE_ASSIGNED
        sm.apply(next(index), lost)
        task = sm.tasks.get("t1")
        assert task.failures == 0 and task.node_losses == min(loss, MAX_NODE_LOSSES)
        if loss <= MAX_NODE_LOSSES:
            assert task.state == tasks_pb2.TASK_STATE_PENDING and task.attempt == loss + 1
            assert f"node loss {loss}/{MAX_NODE_LOSSES}" in task.reason
    assert task.state == tasks_pb2.TASK_STATE_FAILED
    assert task.reason.startswith("node_lost") and "budget spent" in task.reason
    assert sm.tasks.on_node("n1") == []
