"""The agent's CoordinatorLink and the heartbeat on it, over a fake wire (no coordinator,
no agent): leader following, listeners, and each Heartbeater.run_cycle outcome."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lepton.agent.heartbeat import CachedSample, Heartbeater
from lepton.agent.link import CoordinatorLink
from lepton.common.errors import InvalidArgument, NotFound, NotLeader, Unavailable
from lepton.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, datasets_pb2_grpc
from tests.unit.link_fakes import FakeWireLink, refuse, rpc_error, wait_until

A, B, C = "10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --- the link ---------------------------------------------------------------------------

async def test_a_followers_hint_aims_every_caller_at_the_leader_and_tells_listeners():
    link = FakeWireLink([A, B])
    link.server(A).handlers["DrainNode"] = refuse(rpc_error(grpc.StatusCode.UNAVAILABLE, "not the leader", leader=C))
    with pytest.raises(NotLeader):
        await link.coordinator.call("DrainNode", coordinator_pb2.DrainNodeRequest(node_id="n"), 1.0)
    assert link.address == C and link.addresses == [A, B, C]
    assert link.moves == [(A, C)]
    link.failed(rpc_error(grpc.StatusCode.UNAVAILABLE, "not the leader", leader=C), A)  # a late one
    assert link.address == C and link.moves == [(A, C)]
    # The datasets service goes to the same leader: one view for all callers.
    link.server(C).handlers["DropReplica"] = lambda req: "dropped"
    assert await link.datasets.call("DropReplica", object(), 1.0) == "dropped"
    assert link.server(C).calls[0][0] == "DropReplica"


async def test_callers_failing_on_one_dead_leader_move_the_link_one_step():
    link = FakeWireLink([A, B, C])
    dead = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    # Three calls were in flight to A when it died; each reports the failure.
    for _ in range(3):
        link.failed(dead, A)
    assert link.address == B and link.moves == [(A, B)]
    link.skip(A)  # a late report about A changes nothing either
    assert link.address == B
    link.skip()  # about the current address: move on
    assert link.address == C


async def test_a_refusal_is_not_a_reason_to_look_elsewhere():
    link = FakeWireLink([A, B])
    link.server(A).handlers["DrainNode"] = refuse(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad node id"))
    with pytest.raises(InvalidArgument):
        await link.coordinator.call("DrainNode", coordinator_pb2.DrainNodeRequest(), 1.0)
    assert link.address == A and link.moves == []


async def test_answers_age_and_a_removed_listener_hears_nothing():
    clock = Clock()
    link = FakeWireLink([A, B], clock=clock)
    assert link.answer_age_s() == float("inf")
    link.server(A).handlers["DrainNode"] = lambda req: "drained"
    await link.coordinator.call("DrainNode", coordinator_pb2.DrainNodeRequest(), 1.0)
    clock.t += 2.5
    assert link.answer_age_s() == pytest.approx(2.5)
    heard = []
    remove = link.on_leader_change(lambda old, new: heard.append(new))
    link.skip()
    remove()
    link.skip()
    assert heard == [B]


async def test_one_channel_per_address_shared_by_the_services():
    link = CoordinatorLink([A, B])
    coordinator = link.stub(coordinator_pb2_grpc.CoordinatorStub, A)
    datasets = link.stub(datasets_pb2_grpc.DatasetsStub, A)
    assert link.stub(coordinator_pb2_grpc.CoordinatorStub, A) is coordinator
    assert link.stub(coordinator_pb2_grpc.CoordinatorStub, B) is not coordinator
    assert datasets is not coordinator and len(link._channels) == 2
    await link.close()
    assert link._channels == {}


def test_a_link_needs_an_address():
    with pytest.raises(ValueError):
        CoordinatorLink([])


# --- the heartbeat on it ----------------------------------------------------------------

class Beat:
    """A Heartbeater on a fake wire whose every address registers the node."""

    def __init__(self, addresses=(A, B), interval_s=1.0, local=None):
        self.clock = Clock()
        self.link = FakeWireLink(list(addresses), clock=self.clock)
        self.registered = 0
        self.terms: list[int] = []
        for address in addresses:
            self.link.server(address).handlers["RegisterNode"] = lambda req: coordinator_pb2.RegisterNodeResponse(
                heartbeat_interval_ms=500)
        self.hb = Heartbeater(
            self.link, lambda: coordinator_pb2.RegisterNodeRequest(node_id="n1"),
            lambda: common_pb2.Usage(cpu_percent=12.5), interval_s=interval_s,
            on_term=self.terms.append, on_registered=self._registered, clock=self.clock,
            local=local, local_address=A if local is not None else "")

    def _registered(self):
        self.registered += 1

    def stream(self, address=A):
        return self.link.server(address).streams[-1]

    async def beating(self) -> None:
        """Registered and one heartbeat sent."""
        assert await self.hb.run_cycle() == f"registered with the coordinator at {A}"
        assert await self.hb.run_cycle() == "heartbeat ok"


async def test_registers_then_beats_on_a_stream_at_the_interval_the_leader_asks():
    b = Beat()
    await b.beating()
    assert b.registered == 1 and b.hb.interval_s == 0.5
    [(method, req)] = b.link.server(A).calls
    assert method == "RegisterNode" and req.node_id == "n1"
    assert [(r.node_id, r.usage.cpu_percent) for r in b.stream().sent] == [("n1", 12.5)]
    b.clock.t += 10
    b.stream().answer(coordinator_pb2.HeartbeatResponse(heartbeat_interval_ms=2000, term=4))
    await wait_until(lambda: b.terms == [4], "the reader to take the answer")
    assert b.hb.interval_s == 2.0
    assert b.link.answer_age_s() == 0  # the answer counts as the leader's, for every caller
    assert await b.hb.run_cycle() == "heartbeat ok"
    assert len(b.link.server(A).streams) == 1 and len(b.stream().sent) == 2


async def test_a_silent_leader_is_skipped_for_every_caller():
    b = Beat()
    await b.beating()
    b.clock.t += 1.9  # under the 2 s floor: still waiting
    assert await b.hb.run_cycle() == "heartbeat ok"
    b.clock.t += 0.2
    with pytest.raises(Unavailable, match=f"{A} has not answered heartbeats for 2.1s"):
        await b.hb.run_cycle()
    assert b.stream(A).cancelled
    assert b.link.address == B and b.link.moves == [(A, B)]
    assert await b.hb.run_cycle() == "heartbeat ok"  # still registered: beats at B
    assert len(b.stream(B).sent) == 1


async def test_answers_keep_a_slow_link_alive():
    b = Beat()
    await b.beating()
    for _ in range(5):
        b.clock.t += 1.5
        b.stream().answer(coordinator_pb2.HeartbeatResponse())
        await wait_until(lambda: b.hb.answer_age_s() == 0, "the answer")
        assert await b.hb.run_cycle() == "heartbeat ok"
    assert b.link.moves == []


async def test_a_leader_that_forgot_the_node_gets_a_new_registration():
    b = Beat()
    await b.beating()
    b.stream().answer(rpc_error(grpc.StatusCode.NOT_FOUND, "unknown node n1"))
    await wait_until(lambda: b.hb._broken is not None, "the reader to see the failure")
    assert await b.hb.run_cycle() == "coordinator does not know this node; registering again"
    assert b.stream().cancelled
    assert await b.hb.run_cycle() == f"registered with the coordinator at {A}"
    assert b.registered == 2


async def test_a_node_the_leader_has_as_left_registers_again():
    b = Beat()
    await b.beating()
    b.stream().answer(coordinator_pb2.HeartbeatResponse(state=common_pb2.NODE_STATE_LEFT))
    await wait_until(lambda: b.hb._left, "the reader to see LEFT")
    assert await b.hb.run_cycle() == "coordinator has this node as left; registering again"
    assert await b.hb.run_cycle() == f"registered with the coordinator at {A}"


async def test_a_deposed_leader_closing_the_stream_sends_the_heartbeat_to_the_new_one():
    b = Beat(addresses=(A, B, C))
    await b.beating()
    b.stream().answer(rpc_error(grpc.StatusCode.UNAVAILABLE, "not the leader", leader=C))
    await wait_until(lambda: b.link.address == C, "the link to follow the hint")
    with pytest.raises(NotLeader):
        await b.hb.run_cycle()
    assert await b.hb.run_cycle() == "heartbeat ok"
    assert len(b.stream(C).sent) == 1 and b.link.moves == [(A, C)]


async def test_a_heartbeat_follows_a_leader_another_caller_found():
    b = Beat()
    await b.beating()
    b.link.skip(A)  # say the assignment stream was redirected
    assert await b.hb.run_cycle() == "heartbeat ok"
    assert b.stream(A).cancelled and len(b.stream(B).sent) == 1


async def test_a_broken_write_reports_why_the_stream_failed():
    b = Beat()
    await b.beating()
    b.stream().write_error = asyncio.InvalidStateError()
    b.stream().answer(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset"))
    await wait_until(lambda: b.hb._broken is not None, "the reader to see the failure")
    with pytest.raises(Unavailable, match="connection reset"):
        await b.hb.run_cycle()
    assert b.link.address == B


async def test_leave_tells_the_leader_and_stops_beating():
    b = Beat()
    await b.beating()
    left = []
    b.link.server(A).handlers["LeaveNode"] = lambda req: left.append(req.node_id) or "left"
    assert await b.hb.leave(timeout=5.0)
    assert left == ["n1"] and b.stream().cancelled
    b.link.server(A).handlers["LeaveNode"] = refuse(rpc_error(grpc.StatusCode.NOT_FOUND, "unknown node"))
    assert not await b.hb.leave(timeout=5.0)  # never registered there: nothing to leave


# --- a voter's agent beating into its own coordinator ------------------------------------

class OwnCoordinator:
    """This voter's coordinator as the heartbeat sees it in-process: leads, or names the leader."""

    def __init__(self):
        self.beats: list[coordinator_pb2.HeartbeatRequest] = []
        self.error: Exception | None = None

    async def beat(self, req):
        if self.error is not None:
            raise self.error
        self.beats.append(req)
        return coordinator_pb2.HeartbeatResponse(term=3, heartbeat_interval_ms=1000)


async def test_a_voter_beats_into_its_own_leading_coordinator_without_a_stream():
    own = OwnCoordinator()
    b = Beat(local=own.beat)
    await b.beating()
    assert await b.hb.run_cycle() == "heartbeat ok"
    assert [(r.node_id, r.usage.cpu_percent) for r in own.beats] == [("n1", 12.5)] * 2
    assert b.link.server(A).streams == []  # no round trip to ourselves
    assert b.terms == [3, 3] and b.hb.interval_s == 1.0 and b.hb.answer_age_s() == 0


async def test_an_own_coordinator_that_does_not_lead_sends_the_beat_to_the_leader():
    own = OwnCoordinator()
    b = Beat(addresses=(A, B, C), local=own.beat)
    await b.beating()
    own.error = NotLeader("this voter is not the coordinator", leader=C)
    with pytest.raises(NotLeader):
        await b.hb.run_cycle()
    assert b.link.address == C and b.link.moves == [(A, C)]  # every caller follows
    assert await b.hb.run_cycle() == "heartbeat ok"
    assert len(b.stream(C).sent) == 1 and len(own.beats) == 1


async def test_an_own_coordinator_that_forgot_the_node_gets_a_new_registration():
    own = OwnCoordinator()
    b = Beat(local=own.beat)
    await b.beating()
    own.error = NotFound('node "n1" is not registered')
    assert await b.hb.run_cycle() == "coordinator does not know this node; registering again"
    own.error = InvalidArgument("usage.gpus lists 99")
    assert await b.hb.run_cycle() == f"registered with the coordinator at {A}"
    with pytest.raises(InvalidArgument):
        await b.hb.run_cycle()
    assert b.link.address == A  # a refusal is not a reason to look elsewhere


def test_usage_is_sampled_once_per_max_age_not_per_beat():
    clock = Clock()
    taken = []
    usage = CachedSample(lambda: taken.append(clock.t) or len(taken), 5.0, clock=clock)
    for _ in range(10):  # ten beats a second apart
        usage()
        clock.t += 1.0
    assert taken == [1000.0, 1005.0] and usage.samples == 2


async def test_an_idle_heartbeat_wakes_only_at_its_interval():
    """Counts beats, not time: at a 1 s interval, half a second holds at most one beat."""
    own = OwnCoordinator()
    b = Beat(local=own.beat)
    task = asyncio.create_task(b.hb.run())
    try:
        await wait_until(lambda: b.hb.beats >= 1, "the first beat")
        await asyncio.sleep(0.5)
        assert b.hb.beats == 1 and b.hb.interval_s == 1.0
    finally:
        b.hb.stop()
        await asyncio.gather(task, return_exceptions=True)
