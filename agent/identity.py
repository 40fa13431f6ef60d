"""The node's stable identity, persisted in its data dir."""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from pathlib import Path

from lepton.common.durable import write_atomic

_VALID = re.compile(r"^[a-z0-9][a-z0-9-]{3,63}$")


def load_or_create_node_id(data_dir: Path) -> str:
    """Read `node_id` from the data dir, or make one (durably) on first start."""
    path = data_dir / "node_id"
    if path.exists():
        node_id = path.read_text().strip()
        if not _VALID.match(node_id):
            raise OSError(f"{path} holds an invalid node id {node_id[:40]!r}; remove it to start afresh")
        return node_id
    node_id = uuid.uuid4().hex[:16]
    write_atomic(path, (node_id + "\n").encode())
    return node_id


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the life of the process.

    Two agents on one data dir would share a node id, a log and task folders: refuse.
    Returns the lock's file descriptor (closed by the OS when the process exits).
    """
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"another lepton-agent is using {data_dir}") from None
    return fd
