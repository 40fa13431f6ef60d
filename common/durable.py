"""Durable file writes (and the reads that go with them), shared by every component that
must survive a crash."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (a rename, a new file) durable. Raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_writer(path: str | os.PathLike[str], *, mode: int = 0o600, exclusive: bool = False,
                  durable: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s new content into; on a clean exit it replaces `path`
    whole, on an exception `path` is left as it was. A reader (and, with `durable`, a
    crash) sees the old file or the whole new one, never a part.

    `mode`: the file's permissions whatever the umask, set before any byte is written
    (0600 by default: keys, tokens and specs with secrets go through here). `exclusive`:
    refuse (FileExistsError) when `path` exists, also one made meanwhile. `durable`: fsync
    the file before it appears and the folder after (False where losing the write to a
    power cut is harmless and the fsync is not). Raises OSError.
    """
    path = Path(path)
    # A name of its own per write: concurrent writers of one path never share a temp file.
    # A crash can leave one behind; it is hidden and never read.
    tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and fails where a file already is
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600,
                 exclusive: bool = False, durable: bool = True) -> None:
    """Replace `path` with `data`, all or nothing; the options are `atomic_writer`'s.
    Raises OSError (FileExistsError: `exclusive` and `path` exists)."""
    with atomic_writer(path, mode=mode, exclusive=exclusive, durable=durable) as f:
        f.write(data)


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object
    (a file someone else writes, or one torn by a crash before it was fsync'd)."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
