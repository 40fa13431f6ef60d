"""write_atomic: all or nothing, the mode asked for whatever the umask, exclusive when asked,
fsync'd (file before it appears, folder after)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lepton.common import durable
from lepton.common.durable import atomic_writer, read_json, write_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test; restored after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _only(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o777])
@pytest.mark.parametrize("mode", [0o600, 0o644, 0o640])
def test_mode_is_what_was_asked_whatever_the_umask(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    path = tmp_path / "f"
    write_atomic(path, b"one", mode=mode)
    assert (_mode(path), path.read_bytes()) == (mode, b"one")


def test_default_mode_is_private_and_replacing_sets_it_again(tmp_path: Path, umask) -> None:
    umask(0o000)
    path = tmp_path / "secret"
    path.write_bytes(b"old")
    path.chmod(0o666)
    write_atomic(path, b"new")
    assert (_mode(path), path.read_bytes(), _only(tmp_path)) == (0o600, b"new", ["secret"])


def test_exclusive_refuses_an_existing_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "ca.key"
    write_atomic(path, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_atomic(path, b"second", exclusive=True)
    assert path.read_bytes() == b"first"
    assert _only(tmp_path) == ["ca.key"]  # no temp file left behind
    write_atomic(path, b"second")  # without `exclusive` it replaces
    assert path.read_bytes() == b"second"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_atomic(path, b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert _only(tmp_path) == ["state.json"]


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each fsync was called on: the file's or folder's path, via /proc/self/fd."""
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("exclusive", [False, True])
def test_the_file_then_its_folder_are_fsynced(tmp_path: Path, monkeypatch, exclusive: bool) -> None:
    seen = _record_fsyncs(monkeypatch)
    path = tmp_path / "hardstate"
    write_atomic(path, b"x", exclusive=exclusive)
    assert len(seen) == 2
    temp, folder = Path(seen[0]), Path(seen[1])
    assert temp.parent == tmp_path and temp.name.startswith(".hardstate.")  # before the rename
    assert folder == tmp_path  # after it


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_not_durable_skips_the_fsyncs(tmp_path: Path, monkeypatch) -> None:
    seen = _record_fsyncs(monkeypatch)
    write_atomic(tmp_path / "reported.json", b"{}", durable=False)
    assert seen == [] and (tmp_path / "reported.json").read_bytes() == b"{}"


def test_read_json_is_none_for_what_a_crash_or_a_stranger_may_leave(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    assert read_json(path) is None  # missing
    path.write_bytes(b'{"pid": 4')  # torn
    assert read_json(path) is None
    path.write_bytes(b"[1, 2]")  # not an object
    assert read_json(path) is None
    write_atomic(path, b'{"pid": 42}')
    assert read_json(path) == {"pid": 42}
