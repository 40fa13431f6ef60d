"""Is the process listening on a replica's socket the replica this agent started?

A replica serves on unix sockets in its attempt's folder (agent/serving.py,
agent/replica_frames.py). Another task of the same uid can bind a socket of its own and
rename it over the replica's: the agent would then hand its replica key and its callers'
inputs to that task, and return its answers as predictions. So before anything is sent on
a connection the agent asks the kernel who listens (SO_PEERCRED: the pid that called
listen()) and accepts only a process of the attempt's own session: attempts are spawned
as session leaders (agent/tasks/gate.py, start_new_session), and no other process can
join a session, only leave one for a new one. A wrong peer is `ImpostorReplica`: the
supervisor stops that attempt and the serving loop starts a new replica elsewhere.

The gRPC channel reconnects on its own (after a drop, after idling), out of our sight, so
its target is pinned: a handle (O_PATH) on the socket file that was checked, dialled as
`/proc/self/fd/N`. A later rename over the path changes nothing for the channel: the
kernel resolves the handle to the same inode, whose bound socket is the checked one.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

from lepton.common.errors import Unavailable

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ImpostorReplica(Unavailable):
    """The socket's listener is not a process of the replica's attempt."""


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of connected unix socket `sock`."""
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid


def check_peer(sock: socket.socket, session: int, what: str) -> None:
    """Raise ImpostorReplica unless the listener on `sock` is in session `session` (the
    attempt's pid). A listener that has exited meanwhile is no proof either way: refused."""
    pid = peer_pid(sock)
    try:
        sid = os.getsid(pid) if pid > 0 else -1
    except OSError:  # gone
        sid = -1
    if sid != session:
        raise ImpostorReplica(f"{what} is served by pid {pid}, not by the replica's attempt "
                              f"(session {session}): refused")


class PinnedSocket:
    """A handle on a replica's socket file, checked once (`verify`), then dialled by gRPC
    through `target` whatever is renamed over the path. `close()` lets it go."""

    def __init__(self, path: str | os.PathLike[str]):
        # O_PATH: no permission on the socket needed, any path length (connect through
        # /proc/self/fd/N stays under sun_path's 108 bytes). FileNotFoundError: not bound yet.
        self._fd: int | None = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.path = f"/proc/self/fd/{self._fd}"
        self.target = f"unix:{self.path}"

    async def verify(self, session: int, what: str) -> None:
        """Connect once and check the listener (ImpostorReplica); OSError (refused: bound,
        not listening yet) leaves it unverified, for the caller to try again."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.path)
            check_peer(sock, session, what)
        finally:
            sock.close()

    def still_at(self, path: str | os.PathLike[str]) -> bool:
        """Whether the file at `path` is still the pinned socket (not replaced, not gone)."""
        if self._fd is None:
            return False
        try:
            now = os.stat(path, follow_symlinks=False)
        except OSError:
            return False
        pinned = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) == (pinned.st_dev, pinned.st_ino)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
