"""The serving loop (coordinator/loops/serving.py) on a real state machine, with a fake
endpoint table standing for what replicas report."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from lepton.common.states import NodeState, TaskState
from lepton.coordinator.loops import serving
from lepton.coordinator.loops.serving import ServingLoop, replica_views
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import serving_pb2, state_pb2, tasks_pb2
from tests.unit.test_deployments import _quota, create, world

READY, PENDING, DRAINING = serving_pb2.REPLICA_READY, serving_pb2.REPLICA_PENDING, serving_pb2.REPLICA_DRAINING


class FakeEndpoints:
    """task id -> reported state; `replicas(name)` as the leader's table answers."""

    def __init__(self, sm):
        self.sm = sm
        self.states: dict[str, int] = {}

    def replicas(self, name):
        return [SimpleNamespace(task_id=t, state=s) for t, s in self.states.items()
                if t in self.sm.tasks.tasks and self.sm.tasks.tasks[t].spec.replica.deployment == name]


class Rig:
    def __init__(self, replicas=2):
        self.w = world()
        self.now = 100.0
        self.ep = FakeEndpoints(self.w.sm)
        ids = iter(f"t-{i}" for i in range(1000))
        self.loop = ServingLoop(self.w.sm, self.w.propose, is_leader=lambda: True, monotonic=lambda: self.now,
                                endpoints=self.ep, new_task_id=lambda: next(ids))
        create(self.w, replicas=replicas)

    def cycle(self) -> str:
        return asyncio.run(self.loop.run_cycle())

    def live(self, gen: int | None = None) -> list[tasks_pb2.Task]:
        return [t for t in self.w.sm.deployments.live_tasks("web") if gen is None or t.spec.replica.generation == gen]

    def run_and_ready(self, *task_ids: str) -> None:
        """Place each on its own node, start it and report it READY."""
        for i, task_id in enumerate(task_ids):
            task = self.w.sm.tasks.get(task_id)
            node = f"n{i % 3 + 1}"
            self.w.apply(apply_plan=state_pb2.ApplyPlanCmd(placements=[
                state_pb2.PlacementCmd(task_id=task_id, attempt=task.attempt, node_id=node)]))
            self.w.apply(task_event=state_pb2.TaskEventCmd(node_id=node, event=tasks_pb2.TaskEvent(
                task_id=task_id, attempt=task.attempt, kind=tasks_pb2.TaskEvent.KIND_STARTED)))
            self.ep.states[task_id] = READY

    def fail(self, task_id: str) -> None:
        task = self.w.sm.tasks.get(task_id)
        self.w.apply(task_event=state_pb2.TaskEventCmd(node_id=task.node_id, event=tasks_pb2.TaskEvent(
            task_id=task_id, attempt=task.attempt, kind=tasks_pb2.TaskEvent.KIND_EXITED, exit_code=1)))

    def state_of(self, task_id: str) -> int:
        return {r.task_id: r.state for r in replica_views(self.w.sm, self.ep, "web")}[task_id]


def test_creates_the_replicas_and_reports_ready():
    rig = Rig()
    assert "started 2" in rig.cycle()
    assert [t.id for t in rig.live()] == ["t-0", "t-1"]
    assert rig.loop.status("web")[0] == "starting"
    assert "started" not in rig.cycle()  # nothing more while they start
    rig.run_and_ready("t-0")
    rig.cycle()
    assert rig.loop.status("web") == ("degraded", "1/2 replicas ready")
    assert rig.state_of("t-0") == READY and rig.state_of("t-1") == PENDING
    rig.run_and_ready("t-1")
    rig.cycle()
    assert rig.loop.status("web") == ("ready", "2/2 replicas ready")


def test_a_failed_replica_is_replaced_with_a_backoff():
    rig = Rig(replicas=1)
    rig.cycle()
    rig.run_and_ready("t-0")
    rig.cycle()
    rig.fail("t-0")
    said = rig.cycle()  # notices the failure: backs off before the replacement
    assert "started" not in said
    assert ("backing off 1s: 1 replica(s) failed, the last t-0 (exit code 1; lepton-ctl logs t-0)"
            in rig.loop.status("web")[1])
    rig.now += serving.BACKOFF_MIN_S
    assert "started 1" in rig.cycle()
    assert [t.id for t in rig.live()] == ["t-1"]


def test_scale_down_drains_then_cancels():
    rig = Rig(replicas=3)
    rig.cycle()
    rig.run_and_ready("t-0", "t-1")  # t-2 not ready: drained first
    rig.w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="web", replicas=1))
    assert "draining 2" in rig.cycle()
    assert set(rig.w.sm.deployments.get("web").draining) == {"t-2", "t-1"}
    assert rig.state_of("t-1") == DRAINING
    assert "stopped" not in rig.cycle()  # routers get DRAIN_WAIT_S to hear of it
    rig.now += serving.DRAIN_WAIT_S
    said = rig.cycle()
    assert "stopped t-1" in said and "stopped t-2" in said
    assert [t.id for t in rig.live()] == ["t-0"]
    assert rig.w.sm.tasks.get("t-1").state == TaskState.CANCELLED.proto
    rig.cycle()
    assert rig.loop.status("web")[0] == "ready"


def test_update_rolls_one_replica_at_a_time_never_below_the_count():
    rig = Rig(replicas=2)
    rig.cycle()
    rig.run_and_ready("t-0", "t-1")
    rig.w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits2"))
    seen_ready_min = 2
    for _ in range(30):
        rig.cycle()
        rig.now += serving.DRAIN_WAIT_S
        serving_ready = [t for t in rig.live() if rig.state_of(t.id) == READY]
        seen_ready_min = min(seen_ready_min, len(serving_ready))
        assert len([t for t in rig.live() if rig.state_of(t.id) != DRAINING]) <= 3  # one beyond the count
        new = [t for t in rig.live(gen=2) if rig.ep.states.get(t.id) != READY]
        rig.run_and_ready(*[t.id for t in new])
        if not rig.live(gen=1):
            break
    assert not rig.live(gen=1) and len(rig.live(gen=2)) == 2
    assert seen_ready_min >= 2
    assert all(serving.model_of(t) == "digits2" for t in rig.live())
    rig.cycle()
    assert rig.loop.status("web")[0] == "ready"


def test_rm_drains_everything_and_removes_the_deployment():
    rig = Rig(replicas=2)
    rig.cycle()
    rig.run_and_ready("t-0", "t-1")
    rig.w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web"))
    assert "draining 2" in rig.cycle()
    rig.now += serving.DRAIN_WAIT_S
    rig.cycle()
    assert rig.w.sm.deployments.live_tasks("web") == []
    assert "removed" in rig.cycle()
    assert "web" not in rig.w.sm.deployments.records
    assert rig.cycle() == "no deployments"


def test_a_follower_does_nothing():
    rig = Rig()
    rig.loop._is_leader = lambda: False
    assert rig.cycle() == "not the leader"
    assert rig.live() == []


def test_a_stalled_roll_lets_one_old_replica_make_way_never_the_last():
    rig = Rig(replicas=2)
    rig.cycle()
    rig.run_and_ready("t-0", "t-1")
    rig.w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits2"))
    assert "started 1" in rig.cycle()  # t-2, which finds no room: it stays pending
    rig.cycle()
    assert rig.w.sm.deployments.get("web").draining == []
    rig.now += serving.STALL_S
    assert "draining 1" in rig.cycle()
    assert "makes way" in rig.loop.status("web")[1]
    assert list(rig.w.sm.deployments.get("web").draining) == ["t-0"]
    rig.cycle()
    assert list(rig.w.sm.deployments.get("web").draining) == ["t-0"]  # one at a time
    # With one replica wanted, the only one serving never makes way.
    one = Rig(replicas=1)
    one.cycle()
    one.run_and_ready("t-0")
    one.w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits2"))
    one.cycle()
    one.cycle()
    one.now += serving.STALL_S * 3
    one.cycle()
    assert one.w.sm.deployments.get("web").draining == []


def test_the_sentence_says_why_replicas_wait():
    rig = Rig(replicas=2)
    rig.loop._pending_reason = lambda task_id: "waiting: no node has 8 free cpus" if task_id == "t-1" else ""
    rig.cycle()
    rig.cycle()
    assert rig.loop.status("web")[1] == "0/2 replicas ready; 2 pending (waiting: no node has 8 free cpus)"


def test_a_quota_refusal_pauses_without_writing_the_log():
    rig = Rig(replicas=2)
    rig.w.apply(set_quota=_quota("alice", 1))
    index = rig.w.index
    assert "quota pending_tasks" in rig.cycle()
    assert rig.w.index == index and rig.live() == []  # refused before proposing
    assert "waiting: quota pending_tasks" in rig.loop.status("web")[1]
    rig.cycle()
    assert "waiting: quota pending_tasks" in rig.loop.status("web")[1] and rig.w.index == index
    rig.w.apply(set_quota=_quota("alice", 10))
    rig.now += serving.REFUSED_PAUSE_S
    assert "started 2" in rig.cycle()


def test_a_new_leader_carries_on_from_the_replicated_state():
    rig = Rig(replicas=2)
    rig.cycle()
    rig.run_and_ready("t-0", "t-1")
    rig.w.apply(scale_deployment=state_pb2.ScaleDeploymentCmd(name="web", replicas=1))
    rig.cycle()  # t-1 draining when the leader changes
    # The new leader: the same log (here a snapshot), fresh soft state, reports not in yet.
    rig.loop.on_leadership(True, 2)
    rig.ep.states.clear()
    said = rig.cycle()
    assert "started" not in said and "stopped" not in said  # no duplicate, the drain waits again
    rig.now += serving.DRAIN_WAIT_S
    assert "stopped t-1" in rig.cycle()
    assert [t.id for t in rig.live()] == ["t-0"]
    copy = ClusterStateMachine()
    copy.restore(rig.w.sm.snapshot(), rig.w.index)
    assert list(copy.deployments.get("web").task_ids) == list(rig.w.sm.deployments.get("web").task_ids)


def test_a_crash_looping_replica_backs_off_even_beside_a_ready_one():
    rig = Rig(replicas=2)
    rig.cycle()
    rig.run_and_ready("t-0")
    waits = []
    for _ in range(3):
        rig.cycle()
        task_id = rig.live()[-1].id
        rig.run_and_ready(task_id)
        rig.ep.states.pop(task_id)  # it starts, then dies before it is ready
        rig.fail(task_id)
        rig.cycle()
        before = len(rig.live())
        waited = 0.0
        while len(rig.live()) == before:
            rig.now += 0.5
            waited += 0.5
            rig.cycle()
        waits.append(waited)
    assert waits == [serving.BACKOFF_MIN_S, 2 * serving.BACKOFF_MIN_S, 4 * serving.BACKOFF_MIN_S]


def test_a_replica_on_a_node_declared_down_is_replaced_at_once():
    """Not once the node's attempts are requeued (the fence wait, ~15 s past the down): its
    replica serves nothing from the moment the node is down."""
    rig = Rig(replicas=2)
    rig.cycle()
    rig.run_and_ready("t-0", "t-1")
    rig.cycle()
    assert rig.w.sm.tasks.get("t-1").node_id == "n2"
    rig.w.set_state("n2", NodeState.SUSPECT)
    assert "started" not in rig.cycle()  # suspect is not down: it may come back
    rig.w.set_state("n2", NodeState.DOWN)
    said = rig.cycle()
    assert "started 1" in said and "draining 1" in said and "on a down node" in said
    assert list(rig.w.sm.deployments.get("web").draining) == ["t-1"]
    rig.now += serving.DRAIN_WAIT_S
    assert "stopped t-1" in rig.cycle()
    assert rig.w.sm.tasks.get("t-1").state == TaskState.CANCELLED.proto
    assert [t.id for t in rig.live()] == ["t-0", "t-2"]
    assert rig.loop._soft["web"].failures == 0  # a lost node is no failure of the model: no backoff
    rig.run_and_ready("t-2")
    rig.cycle()
    assert rig.loop.status("web")[0] == "ready"


def test_a_removed_deployment_on_a_down_node_is_drained_then_removed():
    rig = Rig(replicas=1)
    rig.cycle()
    rig.run_and_ready("t-0")
    rig.w.set_state("n1", NodeState.SUSPECT)
    rig.w.set_state("n1", NodeState.DOWN)
    rig.w.apply(delete_deployment=state_pb2.DeleteDeploymentCmd(name="web"))
    assert "draining 1" in rig.cycle()
    rig.now += serving.DRAIN_WAIT_S
    rig.cycle()
    assert "removed" in rig.cycle()


def test_a_deployment_whose_replicas_keep_failing_is_failing_and_says_why():
    rig = Rig(replicas=1)
    rig.cycle()
    for n in range(serving.FAILING_AFTER):
        task_id = rig.live()[-1].id
        rig.run_and_ready(task_id)
        rig.ep.states.pop(task_id)  # it starts, then dies before it is ready
        rig.fail(task_id)
        rig.cycle()
        state, message = rig.loop.status("web")
        assert f"{n + 1} replica(s) failed, the last {task_id} (exit code 1; lepton-ctl logs {task_id})" in message
        assert state == ("failing" if n + 1 >= serving.FAILING_AFTER else "starting")
        rig.now += serving.BACKOFF_MAX_S
        rig.cycle()
    rig.run_and_ready(rig.live()[-1].id)  # one comes up after all
    rig.cycle()
    assert rig.loop.status("web") == ("ready", "1/1 replicas ready")


def test_an_update_to_a_model_that_cannot_load_is_failing_while_the_old_replicas_serve():
    rig = Rig(replicas=1)
    rig.cycle()
    rig.run_and_ready("t-0")
    rig.cycle()
    rig.w.apply(update_deployment=state_pb2.UpdateDeploymentCmd(name="web", model="digits2"))
    for _ in range(serving.FAILING_AFTER):
        rig.cycle()
        new = rig.live(gen=2)[-1].id
        rig.run_and_ready(new)
        rig.ep.states.pop(new)  # it starts, then dies before it is ready
        rig.fail(new)
        rig.cycle()
        rig.now += serving.BACKOFF_MAX_S
    assert rig.loop.status("web")[0] == "failing"
    assert [t.id for t in rig.live(gen=1)] == ["t-0"] and rig.state_of("t-0") == READY  # still serving
