"""Every Raft message survives the protobuf round trip unchanged."""

from __future__ import annotations

import pytest

from lepton.coordinator.raft.messages import (
    AppendRequest,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    SnapshotRequest,
    TimeoutNow,
    VoteRequest,
    VoteResponse,
)
from lepton.coordinator.raft.transport import from_proto, to_proto
from lepton.coordinator.storage.log_store import Entry, Snapshot
from lepton.v1 import raft_pb2

MESSAGES = [
    VoteRequest("a", "b", 7, 100, 6, True, False),
    VoteRequest("a", "b", 7, 100, 6, False, True),
    VoteResponse("b", "a", 7, True, True),
    AppendRequest("a", "b", 7, 10, 6, [Entry(11, 7, b"x"), Entry(12, 7, b"")], 9),
    AppendRequest("a", "b", 7, 10, 6, [], 9),
    AppendResponse("b", "a", 7, False, 10, 4, 3),
    AppendResponse("b", "a", 7, True, 12),
    Heartbeat("a", "b", 7, 9, 42),
    HeartbeatResponse("b", "a", 7, 42),
    SnapshotRequest("a", "b", 7, Snapshot(50, 6, b"\x00state")),
    TimeoutNow("a", "b", 7),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    wire = to_proto(msg).SerializeToString()
    assert from_proto(raft_pb2.RaftMessage.FromString(wire)) == msg


def test_unknown_body_is_ignored() -> None:
    assert from_proto(raft_pb2.RaftMessage(from_id="a", to_id="b", term=1)) is None


def test_not_a_message_is_refused() -> None:
    with pytest.raises(TypeError):
        to_proto("hello")  # type: ignore[arg-type]
