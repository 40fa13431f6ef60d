"""The client follows leader hints, but asks each address at most once a round: a stale
hint naming an address already asked sends the call to one not asked yet."""

from __future__ import annotations

import pytest

from lepton.client import Client, NotLeader
from lepton.client.testing import FakeCoordinator, make_node, serve


def leader() -> FakeCoordinator:
    f = FakeCoordinator()
    f.add_node(make_node("aaaa1111", "agent-1", voter=True))
    return f


def test_a_server_naming_itself_leader_does_not_hold_the_call() -> None:
    """A server that refuses while naming itself (its stale view) is left for the others."""
    stale, real = FakeCoordinator(), leader()
    with serve(stale) as saddr, serve(real) as raddr:
        stale.leader_hint = saddr
        with Client([saddr, raddr], timeout=5) as c:
            assert [n.name for n in c.nodes()] == ["agent-1"]
            assert c.current_address == raddr
    assert len(stale.calls) == 1  # asked once, not again and again


def test_a_circle_of_stale_hints_moves_on_to_the_other_servers() -> None:
    """a -> b -> a (stale, mid-election) while c leads: c is asked after one round."""
    a, b, c_leader = FakeCoordinator(), FakeCoordinator(), leader()
    with serve(a) as aaddr, serve(b) as baddr, serve(c_leader) as caddr:
        a.leader_hint, b.leader_hint = baddr, aaddr
        with Client([aaddr, baddr, caddr], timeout=5) as c:
            assert len(c.nodes()) == 1
            assert c.current_address == caddr
    assert (len(a.calls), len(b.calls), len(c_leader.calls)) == (1, 1, 1)


def test_when_every_server_refuses_each_is_asked_once_a_round() -> None:
    a, b = FakeCoordinator(), FakeCoordinator()
    with serve(a) as aaddr, serve(b) as baddr:
        a.leader_hint, b.leader_hint = aaddr, aaddr
        with Client([aaddr, baddr], timeout=0.5) as c, pytest.raises(NotLeader):
            c.nodes()
    # Rounds of one call each, separated by backoffs: never one address twice in a row
    # within a round, so the counts stay within one of each other.
    assert abs(len(a.calls) - len(b.calls)) <= 1 and len(b.calls) >= 1


def test_followers_naming_the_dead_leader_do_not_spin_the_client_between_them() -> None:
    """The leader was killed; a follower still names it (before the election ends): the
    client asks the other servers rather than the dead one and that follower in turn."""
    import socket

    with socket.socket() as dead:  # a port nobody listens on: the killed leader
        dead.bind(("127.0.0.1", 0))
        daddr = f"127.0.0.1:{dead.getsockname()[1]}"
    stale, real = FakeCoordinator(), leader()
    with serve(stale) as saddr, serve(real) as raddr:
        stale.leader_hint = daddr
        with Client([daddr, saddr, raddr], timeout=5) as c:
            assert [n.name for n in c.nodes()] == ["agent-1"]
            assert c.current_address == raddr
    assert len(stale.calls) <= 2  # was: asked again and again, the third server never
