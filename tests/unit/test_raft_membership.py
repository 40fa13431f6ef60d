"""Single-server changes of the voter set in the Raft core, on a hand-driven network."""

from __future__ import annotations

import random

import pytest

from lepton.common.errors import AlreadyExists, FailedPrecondition, NotFound, NotLeader
from lepton.coordinator.raft.core import RaftCore
from lepton.coordinator.raft.membership import decode_config, encode_config, is_config
from lepton.coordinator.raft.messages import (
    AppendRequest,
    AppendResponse,
    Config,
    Heartbeat,
    Role,
    SnapshotRequest,
    TimeoutNow,
)
from lepton.coordinator.storage.log_store import MemoryLogStore
from tests.unit.test_raft_core import CFG, Net


def with_spare(net: Net, i: str = "n4") -> RaftCore:
    """Add a server outside the configuration (its bootstrap voters do not name it)."""
    net.ids.append(i)
    net.stores[i] = MemoryLogStore()
    net.applied[i], net.reads[i], net.readies[i] = [], [], []
    core = RaftCore(i, net.peers, net.stores[i], now=net.now, rng=random.Random(i), config=net.config)
    net.cores[i] = core
    return core


def addr(i: str) -> str:
    return f"10.0.0.{i[1:]}:7000"


def test_config_payload_round_trips_and_never_looks_like_a_command() -> None:
    data = encode_config({"n2": "b:1", "n1": "a:1"})
    assert is_config(data) and decode_config(data) == {"n1": "a:1", "n2": "b:1"}
    assert not is_config(b"") and not is_config((7).to_bytes(8, "big")) and not is_config(b"\x08\x01")
    with pytest.raises(ValueError):
        decode_config(b"\x08\x01")


def test_a_server_outside_the_configuration_never_campaigns() -> None:
    net = Net()
    n4 = with_spare(net)
    for _ in range(3):
        net.timeout("n4")
        assert n4.role is Role.FOLLOWER and n4.term == 0 and not n4.has_ready()


def test_new_voter_catches_up_as_a_learner_then_joins() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, learner_slack=0))
    n1 = net.elect("n1")
    n4 = with_spare(net)
    for k in range(10):
        n1.propose(b"x%d" % k)
    net.deliver()
    n1.add_voter("n4", addr("n4"))
    assert n1.learners == ["n4"] and n1.voters == ["n1", "n2", "n3"]
    # While it catches up, commits need only the old majority: the learner does not count.
    net.deliver(drop=lambda m: "n4" in (m.frm, m.to))
    n1.propose(b"more")
    net.deliver(drop=lambda m: "n4" in (m.frm, m.to))
    assert n1.commit_index == n1.last_index() and n1.voters == ["n1", "n2", "n3"]
    net.heartbeat("n1")
    net.deliver()  # caught up: the leader appends the configuration that adds it
    for core in net.cores.values():
        assert core.voters == ["n1", "n2", "n3", "n4"]
    assert n1.learners == [] and n1.pending_change() is None
    assert n1.config_index <= n1.commit_index  # committed
    assert n4.last_index() == n1.last_index() and n4.is_voter
    # Four voters: a majority is three, so two of the old ones plus the new one commit.
    n1.propose(b"after")
    net.deliver(drop=lambda m: "n3" in (m.frm, m.to))
    assert n1.commit_index == n1.last_index()


def test_a_learner_that_never_answers_is_dropped_and_the_change_fails() -> None:
    net = Net()
    n1 = net.elect("n1")
    with_spare(net)
    n1.add_voter("n4", addr("n4"))
    for _ in range(120):  # 12 s of heartbeats, with nothing from n4
        net.heartbeat("n1")
        net.deliver(drop=lambda m: "n4" in (m.frm, m.to))
    assert n1.pending_change() is None and n1.learners == []
    assert "n4 did not catch up" in n1.change_error
    assert n1.voters == ["n1", "n2", "n3"]


def test_one_change_at_a_time_and_bad_requests_change_nothing() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, learner_slack=0))
    n1 = net.elect("n1")
    with_spare(net)
    with pytest.raises(NotLeader):
        net.cores["n2"].remove_voter("n3")
    with pytest.raises(AlreadyExists):
        n1.add_voter("n2", addr("n2"))
    with pytest.raises(NotFound):
        n1.remove_voter("n9")
    n1.add_voter("n4", addr("n4"))
    with pytest.raises(FailedPrecondition):
        n1.remove_voter("n3")  # the learner's change is in flight
    net.deliver()
    assert n1.voters == ["n1", "n2", "n3", "n4"]
    n1.remove_voter("n3")
    assert n1.voters == ["n1", "n2", "n4"]  # effective on append, before it commits
    with pytest.raises(FailedPrecondition):
        n1.remove_voter("n2")  # the last configuration is not committed yet
    net.deliver()
    n1.remove_voter("n2")
    net.deliver()
    n1.remove_voter("n4")
    net.deliver()
    assert n1.voters == ["n1"] and n1.role is Role.LEADER
    with pytest.raises(FailedPrecondition, match="last voter"):
        n1.remove_voter("n1")


def test_a_change_waits_until_the_leader_committed_an_entry_of_its_term() -> None:
    net = Net()
    n1 = net.cores["n1"]
    net.timeout("n1")
    net.deliver(drop=lambda m: isinstance(m, AppendResponse))  # elected; no-op not committed
    assert n1.role is Role.LEADER and n1.commit_index == 0
    last = n1.last_index()
    n1.remove_voter("n3")
    assert n1.pending_change() == ("remove", "n3") and n1.last_index() == last  # not yet
    net.heartbeat("n1")
    net.deliver()
    assert n1.pending_change() is None and n1.voters == ["n1", "n2"]
    assert n1.config_index == last + 1 and n1.commit_index == last + 1


def test_a_removed_leader_steps_down_once_the_entry_commits() -> None:
    net = Net()
    n1 = net.elect("n1")
    n1.remove_voter("n1")
    assert n1.voters == ["n2", "n3"] and n1.role is Role.LEADER  # still leads, uncounted
    net.drain("n1")
    # Held back: only n2 acknowledges, which is not a majority of {n2, n3} without n3.
    net.deliver(drop=lambda m: m.frm == "n3" or m.to == "n3")
    assert n1.role is Role.LEADER and n1.commit_index < n1.config_index
    for _ in range(3):  # n3 hears again; its lost append is resent
        net.heartbeat("n1")
        net.deliver()
    assert n1.role is Role.FOLLOWER and not n1.is_voter
    leaders = [c for c in net.cores.values() if c.role is Role.LEADER]
    assert len(leaders) == 1 and leaders[0].id in ("n2", "n3")  # handed over at once
    assert any(isinstance(m, TimeoutNow) for r in net.readies["n1"] for m in r.messages)
    term = n1.term
    net.timeout("n1")  # outside the configuration: it never campaigns again
    assert n1.role is Role.FOLLOWER and n1.term == term


def test_configuration_is_effective_on_append_and_rolled_back_by_truncation() -> None:
    net = Net()
    n1 = net.elect("n1")
    n2, n3 = net.cores["n2"], net.cores["n3"]
    n1.remove_voter("n3")
    net.drain("n1")
    # The entry reaches n2 (effective there on append), but n2's answer is lost.
    net.deliver(drop=lambda m: m.to == "n3" or m.frm == "n2")
    assert n2.voters == ["n1", "n2"] and n1.commit_index < n1.config_index
    # And again with n1 alone holding it: n2 truncates it when a new leader overrides it.
    net2 = Net()
    a = net2.elect("n1")
    a.remove_voter("n3")
    assert a.voters == ["n1", "n2"]
    net2.drain("n1")
    net2.outbox.clear()  # the entry never leaves n1
    net2.now += 5.0  # leases run out
    net2.timeout("n2")
    net2.deliver(drop=lambda m: "n1" in (m.frm, m.to))
    assert net2.cores["n2"].role is Role.LEADER
    net2.heartbeat("n2")
    net2.deliver()  # healed: n1 learns of term 2 and takes n2's log
    assert a.role is Role.FOLLOWER
    assert a.voters == ["n1", "n2", "n3"] and a.config_index == 0  # back to the bootstrap set
    assert n3.voters == ["n1", "n2", "n3"]


def test_configuration_travels_in_snapshots_and_survives_a_restart() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, learner_slack=0))
    n1 = net.elect("n1")
    with_spare(net)
    n1.add_voter("n4", addr("n4"))
    net.deliver()
    n1.remove_voter("n2")
    net.deliver()
    assert n1.voters == ["n1", "n3", "n4"]
    applied = n1.applied_index
    assert n1.compact(applied, b"STATE")
    net.drain("n1")
    snap = net.stores["n1"].snapshot()
    assert decode_config(snap.config) == {"n1": addr("n1"), "n3": addr("n3"), "n4": addr("n4")}
    # A restart knows the voters from the snapshot, not from its bootstrap peers.
    net.restart("n1")
    assert net.cores["n1"].voters == ["n1", "n3", "n4"]
    # A new server brought up to date by InstallSnapshot learns them too.
    n3 = net.elect("n3")
    net.deliver()
    assert n3.compact(n3.applied_index, b"STATE3")
    n5 = with_spare(net, "n5")
    n3.add_voter("n5", "10.0.0.5:7000")
    net.deliver()
    assert any(isinstance(m, SnapshotRequest) for r in net.readies["n3"] for m in r.messages)
    assert n5.voters == ["n1", "n3", "n4", "n5"]
    assert decode_config(net.stores["n5"].snapshot().config) == decode_config(snap.config)


def test_messages_from_a_leader_outside_our_configuration_are_accepted() -> None:
    net = Net()
    n4 = with_spare(net)
    # n4's own configuration (the bootstrap voters) does not name n9, a leader elsewhere.
    n4.step(AppendRequest("n9", "n4", 3, 0, 0, [], 0), 0.0)
    rd = n4.ready()
    assert n4.leader == "n9" and n4.term == 3
    assert isinstance(rd.messages[0], AppendResponse) and rd.messages[0].success
    n4.advance(rd)
    n4.step(Heartbeat("n9", "n4", 3, 0, 0), 0.0)
    assert n4.has_ready()


def test_commands_that_look_like_a_configuration_are_refused() -> None:
    net = Net(config=CFG)
    n1 = net.elect("n1")
    with pytest.raises(ValueError):
        n1.propose(encode_config({"n1": "x"}))


def test_file_store_keeps_the_snapshot_configuration(tmp_path) -> None:
    from lepton.coordinator.storage.log_store import FileLogStore, Snapshot

    store = FileLogStore(tmp_path / "raft")
    store.save_snapshot(Snapshot(3, 1, b"state", encode_config({"n1": "a:1"})))
    store.close()
    again = FileLogStore(tmp_path / "raft")
    assert again.snapshot() == Snapshot(3, 1, b"state", encode_config({"n1": "a:1"}))
    again.save_snapshot(Snapshot(4, 1, b"older format"))  # no configuration: no trailer
    again.close()
    assert FileLogStore(tmp_path / "raft").snapshot() == Snapshot(4, 1, b"older format")


def test_install_snapshot_carries_the_configuration_over_the_wire() -> None:
    from lepton.coordinator.raft.transport import from_proto, to_proto
    from lepton.coordinator.storage.log_store import Snapshot

    m = SnapshotRequest("a", "b", 7, Snapshot(50, 6, b"state", encode_config({"a": "a", "b": "b"})))
    assert from_proto(to_proto(m)) == m


def test_join_as_voter_needs_join_and_no_peers(tmp_path) -> None:
    from lepton.common.config import AgentConfig
    from lepton.common.errors import InvalidArgument

    ok = AgentConfig(data_dir=str(tmp_path), join=["127.0.0.1:7001"], join_as_voter=True)
    assert ok.join_as_voter and not ok.peers
    with pytest.raises(InvalidArgument, match="join_as_voter"):
        AgentConfig(data_dir=str(tmp_path), join_as_voter=True)
    with pytest.raises(InvalidArgument, match="join_as_voter"):
        AgentConfig(data_dir=str(tmp_path), peers=["127.0.0.1:7001"], join=["127.0.0.1:7002"],
                    join_as_voter=True)


def test_a_removed_server_that_missed_its_removal_does_not_disrupt() -> None:
    net = Net()
    n1 = net.elect("n1")
    cut = lambda m: "n3" in (m.frm, m.to)  # noqa: E731
    n1.remove_voter("n3")
    net.deliver(drop=cut)
    assert n1.voters == ["n1", "n2"] and n1.config_index <= n1.commit_index
    n3 = net.cores["n3"]
    assert n3.voters == ["n1", "n2", "n3"]  # never heard of it
    for _ in range(5):  # back on the network, it keeps campaigning: PreVote fails on its log
        net.timeout("n3")
        net.deliver()
    assert n1.role is Role.LEADER and n1.term == 1 and net.cores["n2"].term == 1
    n1.propose(b"still")
    net.deliver()
    assert n1.commit_index == n1.last_index()
