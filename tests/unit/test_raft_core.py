"""Rules of the Raft core, one at a time, on a hand-driven network. No sleeps, no clocks."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from lepton.common.errors import NotLeader
from lepton.coordinator.raft.core import RaftCore
from lepton.coordinator.raft.messages import (
    AppendRequest,
    AppendResponse,
    Config,
    Heartbeat,
    HeartbeatResponse,
    Message,
    Ready,
    Role,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    persist,
)
from lepton.coordinator.storage.log_store import Entry, MemoryLogStore

CFG = Config(heartbeat_interval=0.1, election_timeout=1.0)


class Net:
    """Cores on MemoryLogStores; messages move only when a test says so."""

    def __init__(self, n: int = 3, config: Config = CFG, stores: dict[str, MemoryLogStore] | None = None):
        self.ids = [f"n{i}" for i in range(1, n + 1)]
        self.peers = {i: f"10.0.0.{k}:7000" for k, i in enumerate(self.ids, 1)}
        self.stores = stores or {i: MemoryLogStore() for i in self.ids}
        self.config = config
        self.now = 0.0
        self.cores = {i: self._core(i) for i in self.ids}
        self.outbox: list[Message] = []
        self.applied: dict[str, list[Entry]] = {i: [] for i in self.ids}
        self.reads: dict[str, list[tuple[object, int]]] = {i: [] for i in self.ids}
        self.readies: dict[str, list[Ready]] = {i: [] for i in self.ids}

    def _core(self, i: str) -> RaftCore:
        return RaftCore(i, self.peers, self.stores[i], now=self.now, rng=random.Random(i), config=self.config)

    def restart(self, i: str) -> None:
        self.cores[i] = self._core(i)

    def drain(self, i: str) -> None:
        core = self.cores[i]
        while core.has_ready():
            rd = core.ready()
            self.readies[i].append(rd)
            self.outbox.extend(rd.eager_messages)
            persist(self.stores[i], rd)
            self.outbox.extend(rd.messages)
            self.applied[i].extend(rd.committed)
            self.reads[i].extend(rd.read_states)
            core.advance(rd)

    def drain_all(self) -> None:
        for i in self.ids:
            self.drain(i)

    def deliver(self, drop: Callable[[Message], bool] = lambda m: False, rounds: int = 100) -> None:
        """Move messages until the network is quiet."""
        for _ in range(rounds):
            self.drain_all()
            if not self.outbox:
                return
            batch, self.outbox = self.outbox, []
            for m in batch:
                if not drop(m):
                    self.cores[m.to].step(m, self.now)
        raise AssertionError("network never went quiet")

    def timeout(self, i: str) -> None:
        """Fire `i`'s election timer (and only its)."""
        core = self.cores[i]
        self.now = max(self.now, core.next_deadline())
        core.tick(self.now)

    def elect(self, i: str) -> RaftCore:
        self.timeout(i)
        self.deliver()
        assert self.cores[i].role is Role.LEADER
        return self.cores[i]

    def heartbeat(self, i: str) -> None:
        self.now += self.config.heartbeat_interval
        self.cores[i].tick(self.now)


def test_prevote_then_vote_elects_a_leader_that_commits_a_noop() -> None:
    net = Net()
    n1 = net.cores["n1"]
    net.timeout("n1")
    assert n1.role is Role.PRE_CANDIDATE
    assert n1.term == 0  # PreVote bumps no term
    net.deliver()
    assert n1.role is Role.LEADER and n1.term == 1
    assert all(c.leader == "n1" for c in net.cores.values())
    assert n1.commit_index == 1
    assert n1.term_at(1) == 1 and n1.entry_at(1).data == b""
    assert n1.progress() == {"n1": (1, 0), "n2": (1, 0), "n3": (1, 0)}


def test_a_partitioned_node_does_not_bump_terms_or_disrupt_the_leader() -> None:
    net = Net()
    net.elect("n1")
    cut = lambda m: "n3" in (m.frm, m.to)  # noqa: E731
    for _ in range(5):
        net.timeout("n3")
        net.deliver(drop=cut)
        assert net.cores["n3"].term == 1  # pre-votes never succeed, so no term is spent
    net.heartbeat("n1")
    net.deliver()  # healed: n3 just follows again
    assert net.cores["n1"].role is Role.LEADER and net.cores["n1"].term == 1
    assert net.cores["n3"].role is Role.FOLLOWER and net.cores["n3"].leader == "n1"


def test_leader_lease_ignores_a_disruptive_vote_request() -> None:
    net = Net()
    net.elect("n1")
    n2 = net.cores["n2"]
    n2.step(VoteRequest("n3", "n2", 5, 100, 5), net.now)
    assert n2.term == 1 and n2.voted_for == "n1"


def test_check_quorum_steps_down_a_leader_that_hears_from_no_majority() -> None:
    net = Net()
    n1 = net.elect("n1")
    for _ in range(25):  # > 2 election timeouts of heartbeats, all unanswered
        net.heartbeat("n1")
        net.drain("n1")
        net.outbox.clear()
    assert n1.role is Role.FOLLOWER
    assert n1.term == 1 and n1.leader == ""
    with pytest.raises(NotLeader):
        n1.propose(b"x")


def test_vote_is_persisted_in_the_same_ready_as_its_grant() -> None:
    net = Net()
    n2 = net.cores["n2"]
    n2.step(VoteRequest("n1", "n2", 1, 0, 0), 0.0)
    rd = n2.ready()
    assert rd.hard_state == (1, "n1")
    assert [type(m).__name__ for m in rd.messages] == ["VoteResponse"] and rd.messages[0].granted
    n2.advance(rd)


def test_vote_needs_an_up_to_date_log() -> None:
    net = Net()
    net.stores["n2"].append([Entry(1, 1, b"a"), Entry(2, 1, b"b")])
    net.stores["n2"].set_hard_state(1, "")
    net.restart("n2")
    n2 = net.cores["n2"]
    n2.step(VoteRequest("n1", "n2", 2, 1, 1), 0.0)  # shorter log of the same last term
    rd = n2.ready()
    assert not rd.messages[0].granted
    n2.advance(rd)


def test_leader_commits_only_entries_of_its_own_term_by_counting() -> None:
    stores = {i: MemoryLogStore() for i in ("n1", "n2", "n3")}
    stores["n1"].append([Entry(1, 1, b"old")])
    stores["n1"].set_hard_state(1, "n1")
    net = Net(stores=stores)
    n1 = net.cores["n1"]
    net.timeout("n1")
    net.deliver(drop=lambda m: isinstance(m, AppendRequest))  # elected; appends held back
    assert n1.role is Role.LEADER and n1.term == 2 and n1.last_index() == 2  # + the no-op
    n1.step(AppendResponse("n2", "n1", 2, True, 1), net.now)  # a majority holds index 1...
    assert n1.commit_index == 0  # ...but it is of term 1: not committed by counting
    n1.step(AppendResponse("n2", "n1", 2, True, 2), net.now)
    assert n1.commit_index == 2  # the own-term no-op commits, and index 1 with it


def test_follower_truncates_a_conflicting_suffix_and_persists_the_change() -> None:
    store = MemoryLogStore()
    store.append([Entry(1, 1, b"a"), Entry(2, 1, b"b"), Entry(3, 2, b"stale"), Entry(4, 2, b"stale")])
    store.set_hard_state(2, "")
    net = Net(stores={"n1": MemoryLogStore(), "n2": store, "n3": MemoryLogStore()})
    n2 = net.cores["n2"]
    n2.step(AppendRequest("n1", "n2", 3, 2, 1, [Entry(3, 3, b"new")], 1), 0.0)
    rd = n2.ready()
    assert rd.entries == [Entry(3, 3, b"new")] and rd.must_sync
    assert isinstance(rd.messages[0], AppendResponse) and rd.messages[0].success
    assert rd.messages[0].index == 3
    persist(store, rd)
    n2.advance(rd)
    assert store.last_index() == 3 and store.term_at(3) == 3
    assert n2.commit_index == 1


def test_reject_carries_a_conflict_hint_that_skips_a_whole_term() -> None:
    store = MemoryLogStore()
    store.append([Entry(1, 1, b"")] + [Entry(i, 2, b"x") for i in range(2, 11)])
    store.set_hard_state(2, "")
    net = Net(stores={"n1": MemoryLogStore(), "n2": store, "n3": MemoryLogStore()})
    n2 = net.cores["n2"]
    n2.step(AppendRequest("n1", "n2", 4, 10, 3, [], 0), 0.0)
    rd = n2.ready()
    rej = rd.messages[0]
    assert not rej.success and rej.index == 10
    assert (rej.hint_term, rej.hint_index) == (2, 2)
    n2.advance(rd)
    n2.step(AppendRequest("n1", "n2", 4, 20, 3, [], 0), 0.0)  # past our end
    rd = n2.ready()
    assert (rd.messages[0].hint_term, rd.messages[0].hint_index) == (0, 11)
    n2.advance(rd)


def test_lagging_follower_catches_up_in_batches() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, max_msg_bytes=10, max_inflight=64))
    n1 = net.elect("n1")
    for k in range(30):
        n1.propose(b"%04d" % k)
    net.deliver(drop=lambda m: "n3" in (m.frm, m.to))  # its appends are lost
    assert n1.commit_index == 31 and net.cores["n3"].last_index() == 1
    for _ in range(3):
        net.heartbeat("n1")  # answered heartbeats, unanswered appends: the leader probes again
    rounds = 0
    while net.cores["n3"].last_index() < 31:
        assert rounds < 20, "no progress"
        net.drain_all()
        batch, net.outbox = net.outbox, []
        for m in batch:
            net.cores[m.to].step(m, net.now)
        rounds += 1
    # Up to 2 entries (10 bytes) per message, pipelined: far fewer round trips than entries.
    assert rounds <= 12


def test_snapshot_compacts_and_a_lagging_follower_installs_it() -> None:
    net = Net()
    n1 = net.elect("n1")
    cut = lambda m: "n3" in (m.frm, m.to)  # noqa: E731
    for k in range(10):
        n1.propose(b"%d" % k)
    net.deliver(drop=cut)
    assert n1.applied_index == 11
    assert n1.compact(11, b"STATE@11")
    net.drain("n1")
    assert net.stores["n1"].snapshot().index == 11 and net.stores["n1"].first_index() == 12
    n1.propose(b"after")
    for _ in range(3):  # answered heartbeats, an unanswered append: the leader probes again
        net.heartbeat("n1")
        net.deliver()
    n3 = net.cores["n3"]
    installs = [rd for rd in net.readies["n3"] if rd.install]
    assert len(installs) == 1 and installs[0].snapshot.data == b"STATE@11"
    assert net.stores["n3"].snapshot().index == 11
    assert n3.last_index() == 12 and n3.commit_index == 12
    assert [e.data for e in net.applied["n3"]][-1] == b"after"
    assert any(isinstance(m, SnapshotRequest) for rd in net.readies["n1"] for m in rd.messages)


def test_read_index_waits_for_a_quorum_heartbeat_round() -> None:
    net = Net()
    n1 = net.elect("n1")
    n1.read_index("r1")
    net.drain("n1")
    assert net.reads["n1"] == []  # not before a majority confirmed leadership
    hbs = [m for m in net.outbox if isinstance(m, Heartbeat)]
    assert hbs and all(m.ctx >= 1 for m in hbs)
    net.deliver()
    assert net.reads["n1"] == [("r1", 1)]
    with pytest.raises(NotLeader) as err:
        net.cores["n2"].read_index("r2")
    assert err.value.leader == "10.0.0.1:7000"


def test_read_index_before_own_term_commit_waits_for_it() -> None:
    net = Net()
    net.timeout("n1")
    net.deliver(drop=lambda m: isinstance(m, AppendRequest))  # elected, no-op not replicated
    n1 = net.cores["n1"]
    n1.read_index("r")
    net.deliver(drop=lambda m: isinstance(m, AppendRequest))  # heartbeats acked
    assert net.reads["n1"] == []
    net.heartbeat("n1")
    net.deliver()
    assert net.reads["n1"] == [("r", 1)]


def test_reads_are_aborted_when_leadership_is_lost() -> None:
    net = Net()
    n1 = net.elect("n1")
    n1.read_index("r")
    n1.step(AppendResponse("n2", "n1", 7, False, 0), net.now)  # a higher term
    rd = n1.ready()
    assert rd.aborted_reads == ["r"] and n1.role is Role.FOLLOWER
    n1.advance(rd)


def test_propose_on_a_follower_names_the_leader() -> None:
    net = Net()
    net.elect("n1")
    with pytest.raises(NotLeader) as err:
        net.cores["n2"].propose(b"x")
    assert err.value.leader == "10.0.0.1:7000"


def test_leadership_transfer_to_a_caught_up_follower() -> None:
    net = Net()
    n1 = net.elect("n1")
    n1.transfer_leadership("n2")
    with pytest.raises(NotLeader):
        n1.propose(b"x")  # no proposals while handing over
    net.drain("n1")
    assert any(isinstance(m, TimeoutNow) and m.to == "n2" for m in net.outbox)
    net.deliver()  # n2 campaigns at once; the others' leases do not stop it
    n2 = net.cores["n2"]
    assert n2.role is Role.LEADER and n2.term == 2
    assert n1.role is Role.FOLLOWER and n1.leader == "n2"


def test_restart_restores_term_vote_and_log() -> None:
    net = Net()
    n1 = net.elect("n1")
    n1.propose(b"x")
    net.deliver()
    net.restart("n2")
    n2 = net.cores["n2"]
    assert n2.term == 1 and n2.voted_for == "n1" and n2.last_index() == 2
    assert n2.commit_index == 0  # relearned from the leader
    net.heartbeat("n1")
    net.deliver()
    assert n2.commit_index == 2


def test_inputs_between_ready_and_advance_are_refused() -> None:
    net = Net()
    n1 = net.cores["n1"]
    net.timeout("n1")
    rd = n1.ready()
    with pytest.raises(RuntimeError):
        n1.tick(net.now)
    n1.advance(rd)


def test_leader_appends_go_before_its_fsync_but_it_counts_itself_only_after() -> None:
    net = Net()
    n1 = net.elect("n1")
    index, _ = n1.propose(b"x")
    rd = n1.ready()
    assert rd.entries and rd.must_sync
    # The appends may leave before the leader's own write (the followers' fsyncs overlap it)...
    assert {m.to for m in rd.eager_messages if isinstance(m, AppendRequest)} == {"n2", "n3"}
    assert not any(isinstance(m, AppendRequest) for m in rd.messages)
    # ...but the leader's entry is not yet its own vote: one follower's ack is not enough
    # until the leader has synced and advanced.
    assert n1.progress()["n1"][0] == index - 1
    persist(net.stores["n1"], rd)
    n1.advance(rd)
    n1.step(AppendResponse("n2", "n1", n1.term, True, index), net.now)
    assert n1.commit_index == index


def test_only_a_leader_sends_before_its_disk() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, pre_vote=False))
    n1 = net.cores["n1"]
    net.timeout("n1")  # a candidate: its vote for itself must be durable before it asks
    rd = n1.ready()
    assert rd.hard_state == (1, "n1") and not rd.eager_messages
    assert {type(m).__name__ for m in rd.messages} == {"VoteRequest"}
    n1.advance(rd)
    n2 = net.cores["n2"]
    n2.step(AppendRequest("n1", "n2", 1, 0, 0, [Entry(1, 1, b"a")], 0), net.now)
    rd = n2.ready()  # a follower acknowledges only what it has synced
    assert not rd.eager_messages and isinstance(rd.messages[0], AppendResponse)
    n2.advance(rd)


def test_a_commit_rides_on_the_next_append_or_goes_after_a_short_delay() -> None:
    net = Net()
    n1 = net.elect("n1")
    net.heartbeat("n1")
    net.deliver()
    index, _ = n1.propose(b"x")
    net.drain("n1")  # the append goes out
    sent, net.outbox = net.outbox, []
    for m in sent:
        net.cores[m.to].step(m, net.now)
    net.drain("n2")
    net.drain("n3")
    acks, net.outbox = net.outbox, []
    for m in acks:
        n1.step(m, net.now)
    assert n1.commit_index == index
    net.drain("n1")
    assert not [m for m in net.outbox if isinstance(m, Heartbeat)]  # no message per commit
    assert net.cores["n2"].commit_index < index
    # A new entry's append carries the commit...
    n1.propose(b"y")
    net.drain("n1")
    appends = [m for m in net.outbox if isinstance(m, AppendRequest)]
    assert {m.to for m in appends} == {"n2", "n3"} and all(m.commit == index for m in appends)
    net.outbox.clear()
    # ...and with nothing to carry it, the commit goes within commit_notify_delay.
    net2 = Net()
    leader = net2.elect("n1")
    i2, _ = leader.propose(b"z")
    net2.deliver()
    assert net2.cores["n2"].commit_index < i2
    assert leader.next_deadline() <= net2.now + CFG.commit_notify_delay
    net2.now = leader.next_deadline()
    leader.tick(net2.now)
    net2.deliver()
    assert net2.cores["n2"].commit_index == net2.cores["n3"].commit_index == i2


def test_commit_notify_delay_zero_tells_followers_at_once() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, commit_notify_delay=0.0))
    n1 = net.elect("n1")
    index, _ = n1.propose(b"x")
    net.deliver()
    assert net.cores["n2"].commit_index == net.cores["n3"].commit_index == index


def test_proposals_made_while_an_append_is_out_go_together_in_the_next() -> None:
    net = Net()  # the default: one append in flight per follower
    n1 = net.elect("n1")
    n1.propose(b"a")
    net.drain("n1")
    first = [m for m in net.outbox if isinstance(m, AppendRequest) and m.to == "n2"]
    assert [e.data for m in first for e in m.entries] == [b"a"]
    net.outbox = [m for m in net.outbox if m not in first]
    for k in range(5):  # not acknowledged yet: these wait for n2's answer
        n1.propose(b"%d" % k)
        net.drain("n1")
    assert not [m for m in net.outbox if isinstance(m, AppendRequest) and m.to == "n2"]
    for m in first:
        net.cores["n2"].step(m, net.now)
    net.drain("n2")
    for m in [m for m in net.outbox if m.frm == "n2"]:
        n1.step(m, net.now)
    net.drain("n1")
    second = [m for m in net.outbox if isinstance(m, AppendRequest) and m.to == "n2"]
    assert len(second) == 1 and [e.data for e in second[0].entries] == [b"0", b"1", b"2", b"3", b"4"]


def test_a_leader_persists_proposals_made_while_every_append_is_out_with_the_next_append() -> None:
    net = Net()  # one append in flight per follower
    n1 = net.elect("n1")
    n1.propose(b"a")
    net.drain("n1")
    first, net.outbox = net.outbox, []
    assert [len(rd.entries) for rd in net.readies["n1"][-1:]] == [1]  # sent and persisted together
    synced = net.stores["n1"].last_index()
    for k in range(5):  # both followers' windows are full: nothing can go out, nothing is synced
        index, _ = n1.propose(b"%d" % k)
        net.drain("n1")
    assert net.stores["n1"].last_index() == synced
    assert not net.outbox and not n1.has_ready()
    assert n1.progress()["n1"][0] == index - 5  # not yet its own vote
    # n2's answer frees its window: the five go to n2 and onto the leader's disk in one Ready,
    # the append before the fsync; n3 (still out) needs nothing more.
    for m in first:
        net.cores[m.to].step(m, net.now)
    net.drain("n2")
    for m in [m for m in net.outbox if m.frm == "n2"]:
        n1.step(m, net.now)
    net.outbox = [m for m in net.outbox if m.frm != "n2"]
    before = len(net.readies["n1"])
    net.drain("n1")
    rd = net.readies["n1"][before]
    assert [e.data for e in rd.entries] == [b"0", b"1", b"2", b"3", b"4"] and rd.must_sync
    assert [(m.to, len(m.entries)) for m in rd.eager_messages if isinstance(m, AppendRequest)] == [("n2", 5)]
    assert net.stores["n1"].last_index() == synced + 5
    net.deliver()
    assert n1.commit_index == index and n1.progress()["n1"][0] == index


def test_a_leader_whose_follower_is_probing_persists_at_once() -> None:
    net = Net()
    n1 = net.elect("n1")
    n1.propose(b"a")
    net.drain("n1")
    net.outbox.clear()  # both appends lost: both followers' windows stay full
    net.now += 3 * CFG.heartbeat_interval
    n1.step(HeartbeatResponse("n2", "n1", n1.term, 0), net.now)  # n2 answers heartbeats only: probe it
    index, _ = n1.propose(b"b")
    net.drain("n1")
    assert n1.progress()["n1"][0] == index  # persisted without waiting for n3's window
