"""The node's stable identity, persisted in its data dir."""

from __future__ import annotations

import fcntl
import os
import re
import stat
import uuid
from pathlib import Path

from lepton.common.durable import write_atomic
from lepton.common.errors import FailedPrecondition

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
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"another lepton-agent is using {data_dir}") from None
    return fd


def secure_data_dir(data_dir: Path) -> int:
    """Refuse a data dir someone else can write (FailedPrecondition, one line); else make it
    0700 and everything in it private: no group or other bits (the Raft log holds task env
    values, the data dir tokens and keys). The agent's umask (077) keeps new files so; this
    fixes what an older version or another umask left. Returns how many modes it changed."""
    st = data_dir.stat()
    if st.st_uid != os.geteuid():
        raise FailedPrecondition(f"data dir {data_dir} belongs to uid {st.st_uid}, not to this agent "
                                 f"(uid {os.geteuid()}): chown it or choose another --data-dir")
    if st.st_mode & 0o022:
        raise FailedPrecondition(f"data dir {data_dir} can be written by others (mode {st.st_mode & 0o7777:04o}): "
                                 f"chmod 700 it or choose another --data-dir")
    fixed = 0
    for folder, dirs, files in os.walk(data_dir):
        for name in (".", *dirs, *files):
            path = os.path.join(folder, name)
            try:
                mode = os.lstat(path).st_mode
                if mode & 0o077 and not stat.S_ISLNK(mode):
                    os.chmod(path, mode & 0o7700)  # group and others lose all; the owner keeps his
                    fixed += 1
            except FileNotFoundError:  # a task's file, gone meanwhile
                continue
    return fixed
