"""InstallSnapshot in chunks (issue 14): the assembly's rules, and a lagging follower
catching up through a snapshot many chunks long, with chunks lost on the way."""

from __future__ import annotations

import pytest

from lepton.client.cli_security import join_snapshot_chunks
from lepton.common.errors import Internal
from lepton.coordinator.raft.messages import AppendResponse, Config, SnapshotAck, SnapshotRequest
from lepton.coordinator.raft.snapshot_transfer import (
    SnapshotAssembly,
    SnapshotSender,
    snapshot_chunk,
)
from lepton.coordinator.raft.transport import from_proto, to_proto
from lepton.coordinator.storage.log_store import Snapshot
from lepton.v1 import security_pb2 as spb
from tests.unit.test_raft_core import Net

SNAP = Snapshot(40, 3, bytes(range(256)) * 4, b"cfg")  # 1024 bytes


def chunks(snap: Snapshot, size: int, frm: str = "n1", term: int = 3) -> list[SnapshotRequest]:
    return [snapshot_chunk(frm, "n2", term, snap, off, size) for off in range(0, len(snap.data), size)]


def test_chunks_cover_the_snapshot_and_only_the_last_is_done() -> None:
    parts = chunks(SNAP, 100)
    assert len(parts) == 11
    assert b"".join(p.snapshot.data for p in parts) == SNAP.data
    assert [p.done for p in parts] == [False] * 10 + [True]
    assert all(p.snapshot.index == 40 and p.snapshot.config == b"cfg" for p in parts)
    empty = snapshot_chunk("n1", "n2", 1, Snapshot(5, 1, b"", b""), 0, 100)
    assert empty.done and empty.snapshot.data == b""


def test_assembly_installs_at_the_last_chunk() -> None:
    a = SnapshotAssembly()
    parts = chunks(SNAP, 300)
    wanted = [a.add(p) for p in parts]
    assert wanted[:-1] == [300, 600, 900]
    whole = wanted[-1]
    assert isinstance(whole, Snapshot)
    assert (whole.index, whole.term, whole.data, whole.config) == (40, 3, SNAP.data, b"cfg")
    assert a.received == 0  # nothing kept once installed


def test_assembly_asks_again_after_a_gap_or_a_repeat() -> None:
    a = SnapshotAssembly()
    p = chunks(SNAP, 300)
    assert a.add(p[0]) == 300
    assert a.add(p[2]) == 300  # p[1] was lost: ask for it
    assert a.add(p[0]) == 300  # a repeat (a restarted transfer): resume, keep what we hold
    assert a.add(p[1]) == 600
    assert a.received == 600


def test_a_chunk_of_another_transfer_never_mixes_in() -> None:
    a = SnapshotAssembly()
    assert a.add(chunks(SNAP, 300)[0]) == 300
    newer = Snapshot(50, 3, b"x" * 700, b"")
    assert a.add(chunks(newer, 300)[1]) == 0  # mid-transfer chunk of one we never saw begin
    assert a.received == 300
    assert a.add(chunks(newer, 300)[0]) == 300  # its start replaces the old transfer
    other_leader = chunks(SNAP, 300, frm="n3", term=4)
    assert a.add(other_leader[0]) == 300 and a.add(other_leader[1]) == 600


def test_sender_serves_what_the_follower_asks_for() -> None:
    s = SnapshotSender(chunk_bytes=500)
    first = s.start("n1", "n2", 3, SNAP)
    assert first.offset == 0 and len(first.snapshot.data) == 500 and not first.done
    nxt = s.next_chunk("n1", "n2", 3, 40, 500)
    assert nxt is not None and nxt.offset == 500 and not nxt.done
    assert s.next_chunk("n1", "n2", 3, 39, 500) is None  # another snapshot's index
    assert s.next_chunk("n1", "n2", 3, 40, 1024) is None  # past the end
    assert s.next_chunk("n1", "n3", 3, 40, 0) is None  # not sending to n3
    last = s.next_chunk("n1", "n2", 3, 40, 1000)
    assert last is not None and last.snapshot.data == SNAP.data[1000:] and last.done
    assert s.next_chunk("n1", "n2", 3, 40, 0) is None  # the last chunk went: the snapshot is let go
    s.start("n1", "n2", 3, SNAP)
    s.forget("n2")
    assert s.next_chunk("n1", "n2", 3, 40, 0) is None
    assert s.start("n1", "n2", 3, Snapshot(41, 3, b"small", b"")).done  # one chunk: kept by no one
    assert s.next_chunk("n1", "n2", 3, 41, 0) is None


def test_chunk_messages_cross_the_wire() -> None:
    for m in chunks(SNAP, 300):
        pb = to_proto(m)
        assert pb.WhichOneof("body") == "snapshot_chunk"  # an older follower ignores these
        assert from_proto(pb) == m
    ack = SnapshotAck("n2", "n1", 3, 40, 600)
    assert from_proto(to_proto(ack)) == ack
    # A snapshot in one chunk goes as the whole-snapshot message every version reads.
    whole = SnapshotRequest("n1", "n2", 3, SNAP)
    pb = to_proto(whole)
    assert pb.WhichOneof("body") == "snapshot" and from_proto(pb) == whole


def test_a_lagging_follower_installs_a_snapshot_of_many_chunks_despite_losses() -> None:
    net = Net(config=Config(heartbeat_interval=0.1, election_timeout=1.0, snapshot_chunk_bytes=64))
    n1 = net.elect("n1")
    cut = lambda m: "n3" in (m.frm, m.to)  # noqa: E731
    for k in range(10):
        n1.propose(b"%d" % k)
    net.deliver(drop=cut)
    state = bytes(range(200)) * 5  # 1000 bytes: 16 chunks
    assert n1.compact(11, state)
    net.drain("n1")
    n1.propose(b"after")
    net.heartbeat("n1")
    dropped = []

    def lose_two(m) -> bool:  # the 3rd chunk and the 5th ack are lost once each
        if isinstance(m, SnapshotRequest) and m.offset == 128 and 128 not in dropped:
            dropped.append(128)
            return True
        if isinstance(m, SnapshotAck) and m.offset == 320 and 320 not in dropped:
            dropped.append(320)
            return True
        return False

    net.deliver(drop=lose_two)
    n3 = net.cores["n3"]
    assert not [rd for rd in net.readies["n3"] if rd.install]  # stalled: waits for the leader
    for _ in range(4):  # the stall timeout restarts the transfer; n3 resumes where it stopped
        net.now += 1.1
        n1.tick(net.now)
        net.deliver(drop=lose_two)
    assert dropped == [128, 320]
    installs = [rd for rd in net.readies["n3"] if rd.install]
    assert len(installs) == 1 and installs[0].snapshot.data == state
    assert net.stores["n3"].snapshot().data == state
    assert n3.last_index() == 12 and n3.commit_index == 12
    assert [e.data for e in net.applied["n3"]][-1] == b"after"
    sent = [m for rd in net.readies["n1"] for m in rd.messages if isinstance(m, SnapshotRequest)]
    assert all(len(m.snapshot.data) <= 64 for m in sent)
    # Resumed, not restarted: at most the two lost pieces' worth is sent again.
    assert len(sent) <= 16 + 3
    replies = [m for rd in net.readies["n3"] for m in rd.messages if isinstance(m, AppendResponse)]
    assert any(r.success and r.index >= 11 for r in replies)


def _save_chunks(data: bytes, size: int) -> list:
    return [spb.SaveSnapshotResponse(data=data[o:o + size], index=9, term=2, cluster_id="c", offset=o,
                                      total_bytes=len(data)) for o in range(0, max(len(data), 1), size)]


def test_snapshot_save_joins_the_stream_and_refuses_a_partial_one() -> None:
    data = bytes(range(256)) * 40
    whole = join_snapshot_chunks(_save_chunks(data, 1000))
    assert (whole.data, whole.index, whole.term, whole.cluster_id) == (data, 9, 2, "c")
    assert join_snapshot_chunks(_save_chunks(b"", 1000)).data == b""
    parts = _save_chunks(data, 1000)
    with pytest.raises(Internal, match="sent 10000 of 10240 bytes"):
        join_snapshot_chunks(parts[:-1])
    with pytest.raises(Internal, match="offset 2000"):
        join_snapshot_chunks(parts[:1] + parts[2:])
    with pytest.raises(Internal, match="sent nothing"):
        join_snapshot_chunks([])
