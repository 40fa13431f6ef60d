"""Rank logs under a cap: the launcher's rotation (`RankLog`, in `_pump`) and the torch
task's copy of them to its output (`RankLogTail`), which must see every line exactly once
across rotations. Real worker processes, outcomes asserted, never durations."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

from lepton.workloads.torch_launcher import RankLog, TorchLauncher
from lepton.workloads.torch_task import RankLogTail, _copy_output
from tests.unit.test_torch_launcher import bounded, spec

CAP = 4096
LINES = 3000


def numbered(i: int) -> bytes:
    return f"line {i:05d} ".encode() + b"x" * 40


def test_rank_log_rotates_between_whole_lines(tmp_path):
    path = tmp_path / "rank_0.log"
    rotated: list[tuple[Path, bytes]] = []
    log = RankLog(path, 100, lambda p: rotated.append((p, p.read_bytes())))
    lines = [f"{i:09d}\n".encode() for i in range(35)]  # 10 bytes each
    log.write_lines(lines[:15])
    log.write_lines(lines[15:])
    log.close()
    # The reader is told before each rename, with the file complete.
    assert [(p, data) for p, data in rotated] == [
        (path, b"".join(lines[0:10])), (path, b"".join(lines[10:20])), (path, b"".join(lines[20:30]))]
    assert (tmp_path / "rank_0.log.1").read_bytes() == b"".join(lines[20:30])
    assert path.read_bytes() == b"".join(lines[30:])

    # Only a single line longer than the cap overshoots it; lines are never cut.
    big = RankLog(tmp_path / "rank_1.log", 100)
    big.write_lines([b"a\n", b"y" * 300 + b"\n", b"z\n"])
    big.close()
    assert (tmp_path / "rank_1.log.1").read_bytes() == b"y" * 300 + b"\n"
    assert (tmp_path / "rank_1.log").read_bytes() == b"z\n"
    assert big.rotations == 2

    # No cap: one file.
    free = RankLog(tmp_path / "rank_2.log", 0)
    free.write_lines(lines * 10)
    free.close()
    assert (tmp_path / "rank_2.log").stat().st_size == 3500
    assert not (tmp_path / "rank_2.log.1").exists()


async def test_pump_caps_rank_logs_and_the_tail_copies_every_line_once(tmp_path):
    s = spec(tmp_path, f"""
        import sys
        for i in range({LINES}):
            print(f"line {{i:05d}} " + "x" * 40)
        sys.stdout.write("tail without newline")
    """, log_max_bytes=CAP)
    out = io.BytesIO()
    tail = RankLogTail(tmp_path / "logs", out)
    sizes: list[int] = []

    def on_rotate(path: Path) -> None:
        sizes.append(path.stat().st_size)
        tail.drain(path)

    launcher = TorchLauncher(s, on_log_rotate=on_rotate)
    done = asyncio.Event()
    copier = asyncio.create_task(_copy_output(tail, done))
    try:
        await launcher.start()
        result = await bounded(launcher.wait())
    finally:
        done.set()
        await bounded(copier)
        tail.close()
    assert result.ok, result
    # ~170 KB per rank through a 4 KiB cap: many rotations, none past the cap.
    assert len(sizes) >= 2 * 30 and max(sizes) <= CAP
    lines = out.getvalue().split(b"\n")
    assert lines[-1] == b""
    for rank in (0, 1):
        prefix = f"[rank {rank}] ".encode()
        expected = [prefix + numbered(i) for i in range(LINES)] + [prefix + b"tail without newline"]
        assert [line for line in lines if line.startswith(prefix)] == expected  # each once, in order
        current, previous = (tmp_path / "logs" / f"rank_{rank}.log"), (tmp_path / "logs" / f"rank_{rank}.log.1")
        assert 0 < current.stat().st_size <= CAP and 0 < previous.stat().st_size <= CAP
        kept = (previous.read_bytes() + current.read_bytes()).split(b"\n")
        assert kept[-1] == b"" and kept[:-1] == expected[-(len(kept) - 1):]  # the newest, contiguous
    assert len(lines) - 1 == 2 * (LINES + 1)


def test_tail_follows_a_rotation_between_two_polls(tmp_path):
    """Without the launcher's drain call: the held file is finished when the name moves on."""
    log = tmp_path / "rank_0.log"
    out = io.BytesIO()
    tail = RankLogTail(tmp_path, out)
    log.write_bytes(b"a\nb\npart")
    (tmp_path / "rank_0.error.json").write_text("{}")  # not a log
    tail.poll()
    assert out.getvalue() == b"a\nb\n"  # a partial line waits
    with open(log, "ab") as f:
        f.write(b"ial\nc\n")
    os.replace(log, tmp_path / "rank_0.log.1")
    log.write_bytes(b"d\ne")
    (tmp_path / "rank_1.log").write_bytes(b"r1\n")
    tail.poll()
    assert out.getvalue() == b"a\nb\npartial\nc\nd\nr1\n"
    tail.poll(final=True)  # the workers are done: the rest, partial or not
    assert out.getvalue() == b"a\nb\npartial\nc\nd\nr1\ne"
    tail.poll()
    assert out.getvalue().count(b"partial") == 1
    # Cut in place (as when the launcher cannot rename): read again from the start.
    os.truncate(log, 0)
    with open(log, "ab") as f:
        f.write(b"f\n")
    tail.poll()
    assert out.getvalue().endswith(b"e" + b"f\n")
    tail.close()
