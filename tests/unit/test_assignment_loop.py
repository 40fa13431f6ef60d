"""The agent's assignment loop over a fake wire (no coordinator, no agent, no processes): the
watcher hands each desired set to the runner and follows the leader; the reporter sends a
full report first, and acknowledges exits only once a leader has taken them."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lepton.agent.assignments import AGENT_STOPPING, AssignmentLoop, to_proto
from lepton.agent.tasks.task_spec import RunningTask, TaskEvent, TaskEventKind
from lepton.v1 import coordinator_pb2, tasks_pb2
from tests.unit.link_fakes import WAIT_S, FakeWireLink, ServerStream, refuse, rpc_error, wait_until

A, B, C = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"


class FakeRunner:
    """Records what the loop asks of the task runner."""

    def __init__(self):
        self.reconciled: list[tuple[list[tuple[str, int]], int]] = []
        self.acknowledged: list[tuple[str, int]] = []
        self.now_running: list[RunningTask] = []

    def reconcile(self, specs, term: int) -> str:
        self.reconciled.append(([(s.task_id, s.attempt) for s in specs], term))
        return f"{len(specs)} wanted"

    def running(self) -> list[RunningTask]:
        return list(self.now_running)

    def acknowledge(self, task_id: str, attempt: int) -> None:
        self.acknowledged.append((task_id, attempt))


class World:
    def __init__(self, tmp_path, addresses=(A, B, C)):
        self.link = FakeWireLink(list(addresses))
        self.runner = FakeRunner()
        self.loop = AssignmentLoop("n1", self.link, str(tmp_path))
        self.loop.attach(self.runner)
        self.reports: list[tuple[str, coordinator_pb2.ReportTaskEventsRequest]] = []
        self.tasks: list[asyncio.Task] = []
        for address in addresses:
            self.link.server(address).handlers["ReportTaskEvents"] = self._taker(address)

    def _taker(self, address: str):
        def take(req):
            copy = coordinator_pb2.ReportTaskEventsRequest()
            copy.CopyFrom(req)
            self.reports.append((address, copy))
            return "taken"
        return take

    def start(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.tasks:  # no await on a task that might swallow its cancellation
            await asyncio.wait(self.tasks, timeout=WAIT_S)

    def streams(self, address: str) -> list[ServerStream]:
        return self.link.server(address).streams

    async def stream_at(self, address: str, count: int = 1) -> ServerStream:
        await wait_until(lambda: len(self.streams(address)) >= count, f"watch stream #{count} at {address}")
        return self.streams(address)[count - 1]


def assignment_set(term: int, *pairs: tuple[str, int]) -> tasks_pb2.AssignmentSet:
    return tasks_pb2.AssignmentSet(term=term, assignments=[
        tasks_pb2.Assignment(task_id=t, attempt=n, term=term, spec=tasks_pb2.TaskSpec(argv=["true"]))
        for t, n in pairs])


def exited(task_id: str, attempt: int = 1, reason: str = "exited") -> TaskEvent:
    return TaskEvent(task_id=task_id, attempt=attempt, term=2, kind=TaskEventKind.EXITED, exit_code=0, reason=reason)


@pytest.fixture
async def world(tmp_path):
    w = World(tmp_path)
    yield w
    await w.stop()


async def test_each_desired_set_goes_to_the_runner(world):
    world.start(world.loop.watch())
    stream = await world.stream_at(A)
    assert stream.request.node_id == "n1" and world.link.answer_age_s() == float("inf")
    stream.push(assignment_set(3, ("t1", 2), ("t2", 1)))
    stream.push(assignment_set(3))  # everything stopped
    await wait_until(lambda: len(world.runner.reconciled) == 2, "two reconciles")
    assert world.runner.reconciled == [([("t1", 2), ("t2", 1)], 3), ([], 3)]
    assert world.link.answer_age_s() != float("inf")  # a set is an answer from the leader


async def test_the_watch_follows_the_link_when_another_caller_moves_it(world):
    watch = world.start(world.loop.watch())
    old = await world.stream_at(A)
    world.link.skip(A)  # the heartbeat found A silent
    assert old.cancelled
    new = await world.stream_at(B)
    new.push(assignment_set(4, ("t1", 1)))
    await wait_until(lambda: world.runner.reconciled == [([("t1", 1)], 4)], "the set from B")
    # A drop is not a stop: cancelling the loop itself still ends it.
    watch.cancel()
    await asyncio.wait({watch}, timeout=WAIT_S)
    assert watch.cancelled()


async def test_a_followers_refusal_sends_the_watch_to_the_leader_it_names(world):
    world.start(world.loop.watch())
    (await world.stream_at(A)).push(rpc_error(grpc.StatusCode.UNAVAILABLE, "not the leader", leader=C))
    stream = await world.stream_at(C)
    assert world.link.address == C and world.streams(B) == []
    stream.push(assignment_set(5, ("t9", 1)))
    await wait_until(lambda: world.runner.reconciled == [([("t9", 1)], 5)], "the set from C")


async def test_a_stream_the_leader_ends_is_opened_again(world):
    world.start(world.loop.watch())
    (await world.stream_at(A)).push(None)
    again = await world.stream_at(A, count=2)
    again.push(assignment_set(6, ("t1", 1)))
    await wait_until(lambda: world.runner.reconciled == [([("t1", 1)], 6)], "the set on the new stream")
    assert world.link.moves == []


async def test_the_first_report_is_a_full_one_then_events_follow(world):
    world.runner.now_running = [RunningTask(task_id="t1", attempt=3, term=2, pid=10, started_at_ms=1)]
    world.start(world.loop.report())
    await wait_until(lambda: len(world.reports) == 1, "the full report")
    _, full = world.reports[0]
    assert full.full_report and full.node_id == "n1" and not full.events
    assert [(a.task_id, a.attempt, a.term) for a in full.running] == [("t1", 3, 2)]
    world.loop.on_event(TaskEvent(task_id="t1", attempt=3, term=2, kind=TaskEventKind.STARTED))
    world.loop.on_event(exited("t1", 3))
    await wait_until(lambda: sum(len(r.events) for _, r in world.reports) == 2, "both events reported")
    assert not any(r.full_report for _, r in world.reports[1:])
    assert world.runner.acknowledged == [("t1", 3)]  # exits only: the runner may forget them


async def test_an_exit_no_leader_took_is_sent_again_and_acknowledged_once(world):
    world.start(world.loop.report())
    await wait_until(lambda: len(world.reports) == 1, "the full report")
    world.link.server(A).handlers["ReportTaskEvents"] = refuse(
        rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    world.loop.on_event(exited("t1"))
    await wait_until(lambda: len(world.reports) == 2, "the event, at the next address")
    address, req = world.reports[1]
    assert address == B and [e.task_id for e in req.events] == ["t1"]
    assert world.runner.acknowledged == [("t1", 1)]


def test_an_attempt_stopped_by_a_graceful_agent_stop_is_reported_for_requeue():
    stopping = to_proto(exited("t1", reason=AGENT_STOPPING))
    failed = to_proto(TaskEvent(task_id="t1", attempt=1, term=2, kind=TaskEventKind.EXITED,
                                exit_code=1, reason="x" * 5000))
    assert stopping.requeue and stopping.kind == tasks_pb2.TaskEvent.KIND_EXITED
    assert not failed.requeue and failed.exit_code == 1 and len(failed.reason) == 1024
