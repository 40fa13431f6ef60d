"""lepton.client.Client against in-process fake coordinators on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from lepton.client import (
    Cancelled,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    LeptonError,
    NotFound,
    NotLeader,
    Unavailable,
    parse_servers,
)
from lepton.client.testing import FakeCoordinator, make_node, serve
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub


def dead_address() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


@pytest.fixture
def fake() -> FakeCoordinator:
    f = FakeCoordinator()
    f.add_node(make_node("aaaa1111", "agent-1", voter=True))
    f.add_node(make_node("aaaa2222", "agent-2", state=pb.NODE_STATE_DOWN))
    f.add_node(make_node("bbbb3333", "agent-3", state=pb.NODE_STATE_LEFT))
    return f


@pytest.fixture
def addr(fake: FakeCoordinator) -> Iterator[str]:
    with serve(fake) as a:
        yield a


def names(fake: FakeCoordinator) -> list[str]:
    return [m for m, _ in fake.calls]


# -- addresses and validation -----------------------------------------------------------


def test_parse_servers_accepts_strings_and_lists() -> None:
    assert parse_servers("a:1") == ["a:1"]
    assert parse_servers(" a:1, b:2 ,,a:1") == ["a:1", "b:2"]
    assert parse_servers(["a:1", "[::1]:7070"]) == ["a:1", "[::1]:7070"]


@pytest.mark.parametrize(
    "bad", ["", ",", "host", "host:", ":7070", "host:http", "host:0", "host:70000"]
)
def test_parse_servers_rejects_bad_addresses(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_servers(bad)


def test_bad_timeout_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        Client("a:1", timeout=0)


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_node_id_fails_before_any_rpc(fake: FakeCoordinator, addr: str, bad: str) -> None:
    with Client(addr) as c:
        for call in (c.node, c.drain, c.find_node):
            with pytest.raises(InvalidArgument, match="must not be empty"):
                call(bad)
    assert fake.calls == []


def test_unknown_state_filter_fails_before_any_rpc(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c, pytest.raises(InvalidArgument, match="unknown node state 'bogus'"):
        c.nodes(states=["bogus"])
    assert fake.calls == []


# -- the node API -------------------------------------------------------------------------


def test_nodes_returns_typed_results(addr: str) -> None:
    with Client(addr) as c:
        nodes = {n.id: n for n in c.nodes()}
    assert set(nodes) == {"aaaa1111", "aaaa2222", "bbbb3333"}
    n1 = nodes["aaaa1111"]
    assert (n1.name, n1.state, n1.voter, n1.draining) == ("agent-1", "ready", True, False)
    assert n1.capacity.memory_bytes == 16 * 1024**3
    assert n1.usage is None
    assert nodes["aaaa2222"].state == "down"
    assert nodes["bbbb3333"].state == "left"


def test_nodes_state_filter_is_sent_as_enums(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c:
        got = c.nodes(states=["ready", "LEFT"])
    assert sorted(n.name for n in got) == ["agent-1", "agent-3"]
    ((_, req),) = fake.calls
    assert list(req.states) == [pb.NODE_STATE_READY, pb.NODE_STATE_LEFT]


def test_node_not_found_maps_to_not_found(addr: str) -> None:
    with Client(addr) as c:
        assert c.node("aaaa1111").name == "agent-1"
        with pytest.raises(NotFound, match='node "nope" not found'):
            c.node("nope")


def test_drain_sends_enable_and_returns_the_node(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c:
        assert c.drain("aaaa1111").draining is True
        assert c.drain("aaaa1111", enable=False).draining is False
    assert [r.enable for m, r in fake.calls] == [True, False]


def test_cluster_status_is_converted(fake: FakeCoordinator, addr: str) -> None:
    fake.status = cpb.ClusterStatus(
        leader_id="aaaa1111",
        leader="127.0.0.1:7070",
        term=4,
        commit_index=10,
        applied_index=9,
        voters=[cpb.Voter(id="aaaa1111", address="127.0.0.1:7070", role="leader", match_index=10)],
        nodes_by_state={"ready": 1, "down": 1},
        node_count=2,
        version="0.1.0",
    )
    with Client(addr) as c:
        s = c.cluster_status()
    assert (s.leader_id, s.leader, s.term, s.commit_index, s.applied_index) == (
        "aaaa1111",
        "127.0.0.1:7070",
        4,
        10,
        9,
    )
    assert s.voters[0].role == "leader" and s.voters[0].lag == 0
    assert s.nodes_by_state == {"down": 1, "ready": 1}


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("aaaa1111", "aaaa1111"),
        ("agent-2", "aaaa2222"),
        ("bbbb", "bbbb3333"),
        ("aaaa2", "aaaa2222"),
    ],
)
def test_find_node_by_id_name_or_unique_prefix(addr: str, ref: str, want: str) -> None:
    with Client(addr) as c:
        assert c.find_node(ref).id == want


def test_find_node_ambiguous_and_missing(addr: str) -> None:
    with Client(addr) as c:
        with pytest.raises(
            InvalidArgument, match='node "aaaa" is ambiguous: matches aaaa1111, aaaa2222'
        ):
            c.find_node("aaaa")
        with pytest.raises(NotFound, match='^node "zzz" not found$'):
            c.find_node("zzz")


def test_find_node_prefers_the_live_node_of_a_reused_name(fake: FakeCoordinator, addr: str) -> None:
    fake.add_node(make_node("cccc4444", "agent-3"))  # agent-3 came back under a new id
    with Client(addr) as c:
        assert c.find_node("agent-3").id == "cccc4444"


# -- errors, leader finding and retries ---------------------------------------------------


def test_connection_refused_is_one_readable_line() -> None:
    dead = dead_address()
    t0 = time.monotonic()
    with Client(dead, timeout=5, connect_timeout=0.3) as c, pytest.raises(Unavailable) as info:
        c.nodes()
    assert str(info.value) == f"cannot reach {dead} (connection refused)"
    assert not isinstance(info.value, NotLeader)
    assert time.monotonic() - t0 < 3  # connect_timeout, not the whole timeout


def test_unreachable_retries_until_timeout_by_default() -> None:
    t0 = time.monotonic()
    with Client(dead_address(), timeout=0.6) as c, pytest.raises(Unavailable, match="cannot reach"):
        c.cluster_status()
    assert 0.5 < time.monotonic() - t0 < 3


def test_all_unreachable_lists_every_address() -> None:
    a, b = dead_address(), dead_address()
    with Client([a, b], timeout=5, connect_timeout=0) as c, pytest.raises(Unavailable) as info:
        c.nodes()
    assert (
        str(info.value)
        == f"cannot reach any server: {a} (connection refused), {b} (connection refused)"
    )


def test_unreachable_address_is_skipped_and_the_good_one_remembered(
    fake: FakeCoordinator, addr: str
) -> None:
    dead = dead_address()
    with Client(f"{dead},{addr}") as c:
        assert len(c.nodes()) == 3
        assert c.current_address == addr
        c.nodes()
    assert names(fake) == ["ListNodes", "ListNodes"]


def test_follower_hint_leads_straight_to_the_leader(fake: FakeCoordinator, addr: str) -> None:
    follower = FakeCoordinator()
    follower.leader_hint = addr
    with serve(follower) as faddr, Client(faddr) as c:
        assert len(c.nodes()) == 3
        assert c.current_address == addr
        assert c.addresses == [faddr, addr]  # the hinted leader was learned
        c.cluster_status()  # goes to the leader directly now
    assert names(follower) == ["ListNodes"]
    assert names(fake) == ["ListNodes", "GetClusterStatus"]


def test_hints_pointing_in_a_circle_end_as_not_leader() -> None:
    a, b = FakeCoordinator(), FakeCoordinator()
    with serve(a) as aaddr, serve(b) as baddr:
        a.leader_hint, b.leader_hint = baddr, aaddr
        with Client(aaddr, timeout=0.5) as c, pytest.raises(NotLeader) as info:
            c.nodes()
    assert info.value.leader in (aaddr, baddr)
    assert len(a.calls) + len(b.calls) < 40  # backed off, did not spin


def test_server_unavailable_is_retried_for_reads(fake: FakeCoordinator, addr: str) -> None:
    fake.fail_unavailable = 2
    with Client(addr, timeout=5) as c:
        assert len(c.nodes()) == 3
    assert names(fake) == ["ListNodes"] * 3


def test_server_unavailable_is_not_retried_for_non_idempotent_calls(
    fake: FakeCoordinator, addr: str
) -> None:
    fake.fail_unavailable = 1
    with Client(addr) as c, pytest.raises(Unavailable, match="no leader elected yet"):
        c._unary(CoordinatorStub, "ListNodes", cpb.ListNodesRequest(), idempotent=False)
    assert len(fake.calls) == 1


def test_redirect_is_followed_even_for_non_idempotent_calls(
    fake: FakeCoordinator, addr: str
) -> None:
    follower = FakeCoordinator()
    follower.leader_hint = addr
    with serve(follower) as faddr, Client(faddr) as c:
        c._unary(CoordinatorStub, "ListNodes", cpb.ListNodesRequest(), idempotent=False)
    assert names(fake) == ["ListNodes"]


def test_other_errors_are_mapped_and_not_retried(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c, pytest.raises(NotFound):
        c.node("missing")
    assert len(fake.calls) == 1


def test_slow_server_raises_deadline_exceeded(fake: FakeCoordinator, addr: str) -> None:
    fake.delay_s = 1.0
    with Client(addr, timeout=0.3) as c, pytest.raises(DeadlineExceeded, match="no answer from"):
        c.nodes()


def test_a_silent_server_does_not_eat_the_whole_budget(fake: FakeCoordinator, addr: str) -> None:
    slow = FakeCoordinator()
    slow.delay_s = 5.0
    with serve(slow) as saddr, Client([saddr, addr], timeout=3.0) as c:
        t0 = time.monotonic()
        assert len(c.nodes()) == 3
        assert time.monotonic() - t0 < 2.5
        assert c.current_address == addr


def test_closed_client_refuses_calls(addr: str) -> None:
    c = Client(addr)
    c.close()
    c.close()  # idempotent
    with pytest.raises(Cancelled):
        c.nodes()


# -- watch ---------------------------------------------------------------------------------


def event(kind: int, node_id: str, index: int) -> cpb.NodeEvent:
    return cpb.NodeEvent(
        kind=kind, node=make_node(node_id), at_ms=1_700_000_000_000 + index, index=index
    )


def test_watch_yields_events_until_the_stream_ends(fake: FakeCoordinator, addr: str) -> None:
    fake.push_event(event(cpb.NodeEvent.KIND_REGISTERED, "n1", 1))
    fake.push_event(event(cpb.NodeEvent.KIND_DRAIN_CHANGED, "n1", 2))
    fake.push_event(None)
    with Client(addr) as c:
        got = [(e.kind, e.node.id, e.index) for e in c.watch_nodes()]
    assert got == [("registered", "n1", 1), ("drain_changed", "n1", 2)]


def test_watch_follows_a_redirect(fake: FakeCoordinator, addr: str) -> None:
    follower = FakeCoordinator()
    follower.leader_hint = addr
    fake.push_event(event(cpb.NodeEvent.KIND_STATE_CHANGED, "n1", 7))
    with serve(follower) as faddr, Client(faddr) as c, c.watch_nodes() as w:
        e = next(w)
    assert (e.kind, e.index) == ("state_changed", 7)


@pytest.mark.parametrize("how", ["cancel", "client_close"])
def test_watch_stops_quietly_when_cancelled(fake: FakeCoordinator, addr: str, how: str) -> None:
    c = Client(addr)
    w = c.watch_nodes()
    got: list[object] = []
    done = threading.Event()

    def consume() -> None:
        got.extend(w)  # blocks: no events come
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 5
    while fake.watchers == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.watchers == 1
    w.cancel() if how == "cancel" else c.close()
    assert done.wait(5)
    assert got == []
    c.close()
    deadline = time.monotonic() + 5
    while fake.watchers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.watchers == 0  # the server saw the cancel


def test_watch_error_after_events_is_raised(fake: FakeCoordinator) -> None:
    class Failing(FakeCoordinator):
        def WatchNodes(self, request, context):  # type: ignore[no-untyped-def]
            yield event(cpb.NodeEvent.KIND_REGISTERED, "n1", 1)
            context.abort(grpc.StatusCode.INTERNAL, "log corrupted")

    with serve(Failing()) as a, Client(a) as c:
        w = c.watch_nodes()
        assert next(w).index == 1
        with pytest.raises(Exception, match="log corrupted") as info:
            next(w)
    assert type(info.value).__name__ == "Internal"


def test_a_server_without_the_service_is_named() -> None:
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as c, pytest.raises(LeptonError) as info:
            c.nodes()
    finally:
        server.stop(None)
    assert str(info.value).startswith(f"127.0.0.1:{port} does not serve ListNodes")
    assert info.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_watch_subscribes_when_made_not_on_first_next(fake: FakeCoordinator, addr: str) -> None:
    # Changes made between watch_nodes() and the first next() must not be lost.
    with Client(addr) as c, c.watch_nodes() as w:
        deadline = time.monotonic() + 5
        while fake.watchers == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.watchers == 1
        fake.push_event(event(cpb.NodeEvent.KIND_REGISTERED, "n9", 9))
        assert next(w).index == 9


def test_watch_skips_an_unreachable_address(fake: FakeCoordinator, addr: str) -> None:
    fake.push_event(event(cpb.NodeEvent.KIND_REGISTERED, "n1", 1))
    with Client([dead_address(), addr]) as c, c.watch_nodes() as w:
        assert next(w).index == 1
        assert c.current_address == addr
