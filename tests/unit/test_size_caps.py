"""Size caps (issue 14): specs, exec limits, SubmitTasks batches, log entries and Raft
batches stay far below the 16 MiB message envelope; the refusals name the cap."""

from __future__ import annotations

from collections import deque

import pytest

from lepton.common import validation as v
from lepton.common.config import AgentConfig
from lepton.common.errors import InvalidArgument
from lepton.common.grpc_util import MAX_MESSAGE_BYTES
from lepton.coordinator.raft.messages import AppendRequest, Heartbeat
from lepton.coordinator.raft.transport import take_batch
from lepton.coordinator.storage.log_store import Entry
from lepton.v1 import tasks_pb2


def spec(**kw) -> tasks_pb2.TaskSpec:
    kw.setdefault("argv", ["true"])
    return tasks_pb2.TaskSpec(**kw)


def test_a_16_mib_submit_is_refused_naming_the_cap() -> None:
    big = spec(argv=["echo"] + ["x" * (16 << 10)] * 1023)  # ~16 MiB, under the message limit
    assert 15 << 20 < big.ByteSize() < MAX_MESSAGE_BYTES
    with pytest.raises(InvalidArgument, match=r"exec allows at most \d+"):
        v.check_task_spec(big)
    with pytest.raises(InvalidArgument, match=rf"spec is \d+ bytes; at most {v.DEFAULT_MAX_SPEC_BYTES}"):
        v.check_spec_size(big)


def test_a_9_8_mb_argv_is_refused_by_exec_s_limit() -> None:
    argv = ["echo"] + ["a" * 100_000] * 98  # 9.8 MB of arguments, each under MAX_ARG_STRLEN
    with pytest.raises(InvalidArgument, match=r"argv and env take \d+ bytes; exec allows at most \d+"):
        v.check_task_spec(spec(argv=argv), max_bytes=v.MAX_SPEC_BYTES_CEILING)


def test_a_2_mb_env_is_refused() -> None:
    env = {f"V{i}": "e" * 100_000 for i in range(20)}
    with pytest.raises(InvalidArgument, match="exec allows at most"):
        v.check_task_spec(spec(env=env), max_bytes=v.MAX_SPEC_BYTES_CEILING)


def test_one_string_over_max_arg_strlen_is_refused() -> None:
    with pytest.raises(InvalidArgument, match=r"argv\[1\] is 131072 bytes .* at most 131071"):
        v.check_task_spec(spec(argv=["echo", "a" * (128 << 10)]))
    with pytest.raises(InvalidArgument, match="env K is"):
        v.check_task_spec(spec(env={"K": "b" * (128 << 10)}))
    with pytest.raises(InvalidArgument, match="NUL"):
        v.check_task_spec(spec(argv=["echo", "a\0b"]))


def test_what_exec_allows_passes() -> None:
    v.check_task_spec(spec(argv=["echo", "a" * 100_000], env={"K": "v" * 100_000}))
    assert 0 < v.exec_args_limit() < MAX_MESSAGE_BYTES


def test_the_spec_cap_is_a_setting_with_a_ceiling() -> None:
    assert AgentConfig(max_spec_bytes="512KiB").max_spec_bytes == 512 << 10
    with pytest.raises(InvalidArgument, match="max_spec_bytes must be between 1024 and"):
        AgentConfig(max_spec_bytes="16MiB")
    small = spec(argv=["echo", "x" * 3000])
    with pytest.raises(InvalidArgument, match="at most 2048"):
        v.check_task_spec(small, max_bytes=2048)


def test_entries_are_capped_well_below_the_message_limit() -> None:
    v.check_entry_size(v.MAX_ENTRY_BYTES)
    with pytest.raises(InvalidArgument, match=f"at most {v.MAX_ENTRY_BYTES}"):
        v.check_entry_size(v.MAX_ENTRY_BYTES + 1)
    # The largest allowed spec or batch, in a command, still fits an entry; an entry plus a
    # full AppendEntries payload (1 MiB) fits one message with room to spare.
    assert v.MAX_SPEC_BYTES_CEILING + 4096 < v.MAX_ENTRY_BYTES
    assert v.MAX_BATCH_SPEC_BYTES + 1000 * 64 < v.MAX_ENTRY_BYTES
    assert v.MAX_ENTRY_BYTES + (1 << 20) < MAX_MESSAGE_BYTES // 2


def test_spec_batches_cut_by_count_and_bytes() -> None:
    specs = [spec(argv=["echo", "x" * 1000]) for _ in range(10)]
    one = specs[0].ByteSize()
    runs = v.spec_batches(specs, max_count=4, max_bytes=10 * one)
    assert [len(r) for r in runs] == [4, 4, 2]
    runs = v.spec_batches(specs, max_count=100, max_bytes=3 * one)
    assert [len(r) for r in runs] == [3, 3, 3, 1]
    assert all(sum(s.ByteSize() for s in r) <= 3 * one for r in runs)
    huge = spec(argv=["echo", "y" * 50_000])
    assert v.spec_batches([huge, specs[0]], 10, max_bytes=1000) == [[huge], [specs[0]]]


def _append(to: str, size: int) -> AppendRequest:
    return AppendRequest("a", to, 1, 0, 0, [Entry(1, 1, b"x" * size)], 0)


def test_raft_batches_are_cut_to_fit() -> None:
    queue = deque([_append("b", 400), _append("b", 400), Heartbeat("a", "b", 1, 0, 0), _append("b", 400)])
    sizes = []
    while queue:
        batch = take_batch(queue, 1000)
        assert batch.ByteSize() <= 1000
        sizes.append(len(batch.messages))
    assert sizes == [3, 1]  # the heartbeat still fits beside two appends; the third does not


def test_a_lone_message_over_the_batch_size_still_goes() -> None:
    queue = deque([_append("b", 5000), _append("b", 10)])
    assert len(take_batch(queue, 1000).messages) == 1
    assert len(take_batch(queue, 1000).messages) == 1
    assert not queue
