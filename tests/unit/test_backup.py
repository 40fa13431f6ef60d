"""Backup files: round trip, atomic writes, and refusal of corrupt, truncated, foreign files."""

from __future__ import annotations

import os
import stat

import pytest

from lepton.common import backup
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, state_pb2

CLUSTER = "c-1f2e3d"


def _state_bytes() -> tuple[bytes, int]:
    sm = ClusterStateMachine()
    cmd = state_pb2.Command(at_ms=5, register_node=state_pb2.RegisterNodeCmd(
        node_id="node-0001", name="a", address="10.0.0.1:7070", capacity=common_pb2.Capacity()))
    sm.apply(1, cmd.SerializeToString())
    return sm.snapshot(), sm.applied_index


def test_round_trip_restores_the_state(tmp_path):
    payload, index = _state_bytes()
    path = backup.save(payload, index, 3, CLUSTER, tmp_path / "b.lbk", created_ms=42)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    got = backup.load(path, expected_cluster_id=CLUSTER)
    assert (got.payload, got.index, got.term, got.cluster_id, got.created_ms) == (payload, 1, 3, CLUSTER, 42)
    sm = ClusterStateMachine()
    sm.restore(got.payload, got.index)
    assert [n.id for n in sm.list_nodes()] == ["node-0001"]
    assert [p.name for p in tmp_path.iterdir()] == ["b.lbk"]  # no temp file left


def test_empty_payload_and_large_values(tmp_path):
    path = backup.save(b"", (1 << 64) - 1, 0, "é" * 10, tmp_path / "x")
    assert backup.load(path).index == (1 << 64) - 1


def test_no_overwrite_unless_asked(tmp_path):
    path = tmp_path / "b.lbk"
    backup.save(b"one", 1, 1, CLUSTER, path)
    with pytest.raises(AlreadyExists):
        backup.save(b"two", 2, 1, CLUSTER, path)
    assert backup.load(path).payload == b"one"
    backup.save(b"two", 2, 1, CLUSTER, path, overwrite=True)
    assert backup.load(path).payload == b"two"


@pytest.mark.parametrize("args", [
    (b"x", -1, 0, CLUSTER), (b"x", 0, 1 << 64, CLUSTER), (b"x", 0, 0, ""),
    (b"x", 0, 0, "c" * 300), ("not bytes", 0, 0, CLUSTER),
])
def test_bad_values_are_refused(tmp_path, args):
    with pytest.raises(InvalidArgument):
        backup.save(*args, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        backup.save(b"data", 1, 1, CLUSTER, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def good(tmp_path):
    return backup.save(b"payload-bytes" * 100, 9, 2, CLUSTER, tmp_path / "good.lbk").read_bytes()


def _write(tmp_path, data: bytes):
    p = tmp_path / "bad.lbk"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d[:-1], "truncated"),
    (lambda d: d[:100], "truncated"),
    (lambda d: d + b"\0", "trailing bytes"),
    (lambda d: d[:200] + bytes([d[200] ^ 1]) + d[201:], "checksum"),  # a flipped payload bit
    (lambda d: d[:-1] + bytes([d[-1] ^ 0xFF]), "checksum"),  # a damaged checksum
    (lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:], "checksum"),  # a header field (created_ms)
    (lambda d: b"NOTLEPTN" + d[8:], "not a Lepton backup"),
    (lambda d: b"", "not a Lepton backup"),
    (lambda d: b"LEPTONBK", "not a Lepton backup"),
    (lambda d: os.urandom(4096), "not a Lepton backup"),
])
def test_corrupt_files_are_refused(tmp_path, good, mutate, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        backup.load(_write(tmp_path, mutate(good)))


def test_a_header_claiming_a_huge_payload_is_refused_without_reading_it(tmp_path, good):
    header = bytearray(good[: backup._HEAD.size])
    header[-8:] = (1 << 62).to_bytes(8, "big")
    with pytest.raises(InvalidArgument, match="truncated"):
        backup.load(_write(tmp_path, bytes(header) + good[backup._HEAD.size:]))


def test_foreign_cluster_and_newer_format(tmp_path, good):
    path = _write(tmp_path, good)
    with pytest.raises(FailedPrecondition, match="belongs to cluster 'c-1f2e3d', not 'other'"):
        backup.load(path, expected_cluster_id="other")
    newer = bytearray(good)
    newer[8:10] = (2).to_bytes(2, "big")
    with pytest.raises(FailedPrecondition, match="format version 2"):
        backup.load(_write(tmp_path, bytes(newer)))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(NotFound):
        backup.load(tmp_path / "nope")
    with pytest.raises(InvalidArgument):
        backup.load(tmp_path)
