"""The leader's scheduling loop against a real state machine and a fake commit (no Raft, no
agents): what it commits, the sentence each cycle returns, and when it skips a pass."""

from __future__ import annotations

import asyncio

import pytest

from lepton.common.errors import FailedPrecondition
from lepton.common.states import TaskState
from lepton.coordinator.loops.scheduling import SchedulingLoop
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, state_pb2, tasks_pb2

TERM = 7


class World:
    """A state machine wired to a loop the way Coordinator wires them; commits apply at once."""

    def __init__(self, **loop_options):
        loop_options.setdefault("full_pass_spacing", 0.0)  # a loaded test machine must not defer passes
        self.sm = ClusterStateMachine()
        self.leader = True
        self.committed: list[state_pb2.Command] = []
        self.refuse: Exception | None = None  # the next commit raises this
        self.free_ports: dict[str, int] = {}
        self.loop = SchedulingLoop(
            self.sm, self.commit, is_leader=lambda: self.leader, term=lambda: TERM,
            wall_ms=lambda: 10_000, free_port=lambda node_id: self.free_ports.get(node_id, 0),
            **loop_options)
        self.sm.tasks.listeners.append(self.loop.on_task_change)
        self.sm.add_listener(self.loop.wake)

    async def commit(self, cmd: state_pb2.Command):
        if self.refuse is not None:
            err, self.refuse = self.refuse, None
            raise err
        self.committed.append(cmd)
        return self.apply(cmd)

    def apply(self, cmd: state_pb2.Command):
        result = self.sm.apply(self.sm.applied_index + 1, cmd.SerializeToString())
        if isinstance(result, Exception):
            raise result
        return result

    def node(self, node_id: str, cpus: int = 4, gpus: int = 0, address: str = "") -> None:
        cap = common_pb2.Capacity(cpu_logical=cpus, memory_bytes=8 << 30, gpus=[
            common_pb2.Gpu(index=i, memory_total_bytes=80 << 30) for i in range(gpus)])
        address = address or f"10.0.0.{len(self.sm.nodes) + 1}:7000"
        self.apply(state_pb2.Command(at_ms=1000, register_node=state_pb2.RegisterNodeCmd(
            node_id=node_id, name=node_id, address=address, capacity=cap)))

    def submit(self, task_id: str, *, cpu: float = 1.0, gpus: int = 0, priority: int = 0) -> None:
        spec = tasks_pb2.TaskSpec(argv=["true"], priority=priority,
                                  resources=tasks_pb2.Resources(cpu=cpu, gpus=gpus))
        self.apply(state_pb2.Command(at_ms=1000, submit_tasks=state_pb2.SubmitTasksCmd(
            tasks=[state_pb2.SubmitTaskCmd(task_id=task_id, spec=spec)])))

    def state(self, task_id: str) -> TaskState:
        return TaskState.from_proto(self.sm.tasks.tasks[task_id].state)


@pytest.fixture
def world():
    return World(aging_interval_s=0.0)  # every cycle may age: only `settled` skips a pass


async def test_a_follower_schedules_nothing_and_keeps_no_reasons(world):
    world.node("n1", cpus=1)
    world.submit("big", cpu=8)
    await world.loop.run_cycle()
    assert "big" in world.loop.reasons
    world.leader = False
    assert await world.loop.run_cycle() == "not the leader: nothing to schedule"
    assert world.loop.reasons == {}
    world.node("n2", cpus=16)  # room now, but a follower must not place it
    assert await world.loop.run_cycle() == "not the leader: nothing to schedule"
    assert world.committed == [] and world.state("big") == TaskState.PENDING
    world.loop._wakeup.clear()
    world.submit("later")  # a follower neither wakes for it nor keeps its id as fresh
    assert not world.loop._wakeup.is_set() and not world.loop._fresh
    world.leader = True
    world.loop.wake()  # leadership: a full pass finds it all the same
    assert await world.loop.run_cycle() == "placed 2 of 2 tasks, preempted 0, 0 unschedulable"


async def test_a_placement_is_committed_as_one_plan_in_the_leaders_term(world):
    world.node("n1")
    assert await world.loop.run_cycle() == "nothing pending"
    world.submit("t1")
    world.submit("t2")
    assert await world.loop.run_cycle() == "placed 2 of 2 tasks, preempted 0, 0 unschedulable"
    assert len(world.committed) == 1
    plan = world.committed[0].apply_plan
    assert plan.term == TERM
    assert sorted((p.task_id, p.attempt, p.node_id) for p in plan.placements) == [
        ("t1", 1, "n1"), ("t2", 1, "n1")]
    assert world.state("t1") == world.state("t2") == TaskState.ASSIGNED
    assert await world.loop.run_cycle() == "nothing pending"
    assert len(world.committed) == 1


async def test_an_unplaceable_task_says_why_and_settles_until_room_is_freed(world):
    world.node("n1", cpus=4)
    world.submit("gpu-task", gpus=2)
    sentence = await world.loop.run_cycle()
    assert sentence == "placed 0 of 1 tasks, preempted 0, 1 unschedulable"
    assert "gpu" in world.loop.reasons["gpu-task"]
    # Nothing changed: the aging pass is skipped (settled), so nothing is recomputed.
    assert await world.loop.run_cycle() == "nothing new to place"
    assert world.committed == []
    world.node("n2", gpus=2)  # a node change frees room: a full pass again
    assert await world.loop.run_cycle() == "placed 1 of 1 tasks, preempted 0, 0 unschedulable"
    assert world.committed[0].apply_plan.placements[0].node_id == "n2"
    assert list(world.committed[0].apply_plan.placements[0].gpu_indices) == [0, 1]


async def test_a_fresh_submission_is_placed_without_a_full_pass():
    world = World(aging_interval_s=3600.0)  # no aging pass during the test
    world.node("n1", cpus=2)
    world.submit("wide", cpu=64)
    await world.loop.run_cycle()  # the first cycle is a full pass
    assert "wide" in world.loop.reasons
    world.submit("narrow", cpu=1)
    assert await world.loop.run_cycle() == "placed 1 of 1 tasks, preempted 0, 0 unschedulable"
    assert world.state("narrow") == TaskState.ASSIGNED and world.state("wide") == TaskState.PENDING
    assert "wide" in world.loop.reasons  # kept: only a full pass recomputes it


async def test_a_plan_the_state_refuses_is_dropped_and_retried(world):
    world.node("n1")
    world.submit("t1")
    world.refuse = FailedPrecondition("task t1 moved on")
    assert await world.loop.run_cycle() == "plan dropped (task t1 moved on)"
    assert world.state("t1") == TaskState.PENDING and world.committed == []
    assert await world.loop.run_cycle() == "placed 1 of 1 tasks, preempted 0, 0 unschedulable"
    assert world.state("t1") == TaskState.ASSIGNED


async def test_one_cycle_looks_at_the_most_urgent_tasks_only():
    world = World(aging_interval_s=0.0, max_per_cycle=1)
    world.node("n1", cpus=1)
    world.submit("low", cpu=4, priority=0)
    world.submit("high", cpu=4, priority=10)
    await world.loop.run_cycle()
    assert world.loop.reasons["low"] == "waiting: queued behind 1 more urgent tasks"
    assert world.loop.reasons["high"] != world.loop.reasons["low"]


@pytest.mark.parametrize("addresses, hosts", [
    (("10.0.0.1:7000", "10.0.0.2:7000"), {"n1": "10.0.0.1", "n2": "10.0.0.2"}),
    # MASTER_ADDR is a bare host to torch: an IPv6 node's brackets belong to HOST:PORT only.
    (("[fd00::1]:7000", "[fd00::2]:7000"), {"n1": "fd00::1", "n2": "fd00::2"}),
])
async def test_gang_members_learn_where_rank_0_hosts_the_store(world, addresses, hosts):
    world.node("n1", address=addresses[0])
    world.node("n2", address=addresses[1])
    world.free_ports["n1"] = world.free_ports["n2"] = 41000
    spec = tasks_pb2.TaskSpec(argv=["true"], resources=tasks_pb2.Resources(cpu=4))
    world.apply(state_pb2.Command(at_ms=1000, submit_job=state_pb2.SubmitJobCmd(job_id="j1", spec=spec, nodes=2)))
    assert await world.loop.run_cycle() == "placed 2 of 2 tasks, preempted 0, 0 unschedulable"
    placements = world.committed[0].apply_plan.placements
    rank0 = next(p for p in placements if world.sm.tasks.tasks[p.task_id].spec.gang_rank == 0)
    assert {(p.master_addr, p.master_port) for p in placements} == {(hosts[rank0.node_id], 41000)}


def submit_many(world: World, n: int, *, cpu: float = 4.0, priority: int = 0, prefix: str = "t") -> None:
    spec = tasks_pb2.TaskSpec(argv=["true"], priority=priority, resources=tasks_pb2.Resources(cpu=cpu))
    world.apply(state_pb2.Command(at_ms=1000, submit_tasks=state_pb2.SubmitTasksCmd(
        tasks=[state_pb2.SubmitTaskCmd(task_id=f"{prefix}{i:05d}", spec=spec) for i in range(n)])))


async def test_a_full_pass_looks_at_the_most_urgent_only_and_the_rest_read_queued_behind():
    world = World(aging_interval_s=0.0, max_per_cycle=10)
    world.node("n1", cpus=1)  # nothing fits: every task waits
    submit_many(world, 3000)
    submit_many(world, 3, priority=5, prefix="hi")
    await world.loop.run_cycle()
    reasons = world.loop.reasons
    # One entry per task looked at, not 3,003: the most urgent, then the oldest.
    assert set(dict(reasons)) == {"hi00000", "hi00001", "hi00002"} | {f"t{i:05d}" for i in range(7)}
    behind = "waiting: queued behind 10 more urgent tasks"
    assert reasons.get("t02999") == behind and reasons["t02999"] == behind
    world.leader = False
    await world.loop.run_cycle()
    assert world.loop.reasons.get("t02999") is None


async def test_fresh_tasks_past_one_cycles_bound_are_placed_by_the_next_cycles():
    world = World(aging_interval_s=3600.0, max_per_cycle=2)  # no aging pass: only fresh cycles
    world.node("n1", cpus=4)
    world.submit("wide", cpu=64)
    await world.loop.run_cycle()  # a full pass: nothing placed, the cluster settles
    submit_many(world, 5, cpu=0.5, prefix="small")  # five fresh tasks, two per cycle
    sentences = [await world.loop.run_cycle() for _ in range(3)]
    assert sentences[:2] == ["placed 2 of 2 tasks, preempted 0, 0 unschedulable"] * 2
    assert sentences[2] == "placed 1 of 1 tasks, preempted 0, 0 unschedulable"
    assert all(world.state(f"small{i:05d}") == TaskState.ASSIGNED for i in range(5))


async def test_the_queue_is_rebuilt_from_a_restored_snapshot():
    world = World(aging_interval_s=0.0, max_per_cycle=2)
    world.node("n1", cpus=8)
    submit_many(world, 2, cpu=1, priority=3, prefix="keep")
    data, index = world.sm.snapshot(), world.sm.applied_index
    submit_many(world, 5, cpu=1, priority=9, prefix="gone")  # not in the snapshot
    world.sm.restore(data, index)  # a new pending set the listeners never saw
    await world.loop.run_cycle()
    placed = {p.task_id for p in world.committed[0].apply_plan.placements}
    assert placed == {"keep00000", "keep00001"}


async def test_a_costly_full_pass_spaces_the_next_while_fresh_tasks_are_still_placed():
    world = World(aging_interval_s=3600.0, full_pass_spacing=1e9, min_cycle_s=0.0)
    world.node("n1", cpus=1)
    world.submit("wide", cpu=4)
    await world.loop.run_cycle()  # full: wide does not fit; the next full pass waits
    world.node("n2", cpus=8)  # room for wide, but only a full pass would look
    world.submit("fresh", cpu=1)
    assert await world.loop.run_cycle() == "placed 1 of 1 tasks, preempted 0, 0 unschedulable"
    assert world.state("fresh") == TaskState.ASSIGNED and world.state("wide") == TaskState.PENDING
    # `run` comes back for the deferred pass without another wake-up.
    world.loop._full_not_before = asyncio.get_running_loop().time() + 0.05  # as if it cost 50 ms / 1e9
    runner = asyncio.create_task(world.loop.run())
    try:
        for _ in range(1000):  # generous: a loaded machine
            if world.state("wide") == TaskState.ASSIGNED:
                break
            await asyncio.sleep(0.01)
        assert world.state("wide") == TaskState.ASSIGNED
    finally:
        runner.cancel()


async def test_a_task_the_scheduler_cannot_take_is_skipped_with_a_reason_not_the_whole_cycle(world):
    # A log may hold such a task (a SubmitTask with a job id and no gang size was accepted
    # before validation refused it, found by the API fuzz test): it must not stop the rest.
    world.node("n1")
    bad = tasks_pb2.TaskSpec(argv=["true"], job_id="j-forged")  # gang_size 0
    world.apply(state_pb2.Command(at_ms=1000, submit_tasks=state_pb2.SubmitTasksCmd(
        tasks=[state_pb2.SubmitTaskCmd(task_id="bad", spec=bad)])))
    world.submit("good")
    sentence = await world.loop.run_cycle()
    assert sentence == "placed 1 of 1 tasks, preempted 0, 0 unschedulable"
    assert world.state("good") == TaskState.ASSIGNED and world.state("bad") == TaskState.PENDING
    assert "gang_size must be >= 1" in world.loop.reasons["bad"]


async def test_the_first_change_after_a_quiet_spell_is_placed_at_once_and_the_next_waits_its_turn():
    world = World(aging_interval_s=3600.0, min_cycle_s=3600.0)  # the spacing never runs out here
    world.node("n1", cpus=8)
    world.submit("first")
    runner = asyncio.create_task(world.loop.run())

    async def settle() -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    try:
        for _ in range(500):
            if world.state("first") == TaskState.ASSIGNED:
                break
            await asyncio.sleep(0.01)
        assert world.state("first") == TaskState.ASSIGNED  # no min_cycle_s wait before it
        world.submit("second")  # within min_cycle_s of the cycle before: it waits for the next
        await settle()
        assert world.state("second") == TaskState.PENDING
        assert len(world.committed) == 1
    finally:
        runner.cancel()
