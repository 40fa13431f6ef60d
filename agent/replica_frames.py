"""The agent's end of a local replica's frames socket (common/frames.py, docs/serving.md).

One connection per replica, opened on first use and again after a loss; the router's calls
to that replica are multiplexed on it by request id. A lost connection fails every call
on it with UNAVAILABLE (the router tries another replica); a call that outlives its
deadline ends with DEADLINE_EXCEEDED here and its late answer is dropped.
"""

from __future__ import annotations

import asyncio
import os

from lepton.agent.replica_peer import ImpostorReplica, check_peer
from lepton.common.errors import DeadlineExceeded, Unavailable
from lepton.common.frames import KEY, OK, FrameProtocol, error_of
from lepton.common.sockets import UnixTarget

_ID_MASK = 0xFFFFFFFF


class FramesAbsent(Unavailable):
    """A ready replica without a frames socket (started by an older Lepton and re-adopted):
    the caller uses its gRPC socket instead."""


class FramesConnection(FrameProtocol):
    """One open connection; `call` sends a request and waits for its answer."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._next_id = 0
        self.lost = False
        self._why_lost = "the replica closed its connection"

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(Unavailable(self._why_lost))

    def frame_received(self, request_id: int, status: int, payload: bytes) -> None:
        if request_id == 0 and status != OK:  # about the connection (its key): it ends next
            self._why_lost = f"the replica refused this agent's connection: {error_of(status, payload).message}"
            return
        future = self._calls.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result((status, payload))

    async def call(self, request: bytes, timeout_s: float) -> bytes:
        """The serialized PredictResponse for serialized PredictRequest `request`. Raises
        the replica's LeptonError, Unavailable (connection lost) or DeadlineExceeded."""
        if self.lost:
            raise Unavailable(self._why_lost)
        loop = asyncio.get_running_loop()
        self._next_id = request_id = self._next_id % _ID_MASK + 1  # 1..2^32-1; 0 is the connection's
        future = self._calls[request_id] = loop.create_future()
        # A timer, not asyncio.wait_for: that costs a task per call (Python 3.11).
        timer = loop.call_later(timeout_s, _expire, future)
        self.send(request_id, OK, request)
        try:
            status, payload = await future
        finally:
            timer.cancel()
            self._calls.pop(request_id, None)
        if status != OK:
            raise error_of(status, payload)
        return payload


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("the replica did not answer within the deadline"))


class FramesDialer:
    """A replica's frames socket: `ready()` (the open connection, or None) and `connect()`.
    `session`: the replica attempt's pid; each connection's listener must be of its session
    before the key is sent (agent/replica_peer.py), else `impostor` says why and every
    later connect is refused (the supervisor stops the replica)."""

    def __init__(self, path: str | os.PathLike[str], key: str = "", session: int = 0):
        self.path = os.fspath(path)
        self._key = key  # sent first on each connection (common/frames.py)
        self._session = session
        self.impostor = ""
        self._conn: FramesConnection | None = None
        self._connecting: asyncio.Future[FramesConnection] | None = None
        self._closed = False
        self.absent = False  # no socket there (FramesAbsent): not tried again

    def ready(self) -> FramesConnection | None:
        conn = self._conn
        return conn if conn is not None and not conn.lost else None

    async def connect(self) -> FramesConnection:
        """The open connection, opening it (once for any number of callers). Raises Unavailable."""
        conn = self.ready()
        if conn is not None:
            return conn
        if self._closed:
            raise Unavailable("the replica is stopping on this node")
        if self.impostor:
            raise ImpostorReplica(self.impostor)
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    async def _open(self) -> FramesConnection:
        loop = asyncio.get_running_loop()
        try:
            target = UnixTarget(self.path)  # a deep data dir: through a handle on its folder
        except OSError as err:
            raise Unavailable(f"the replica's socket is not there: {err}") from None
        try:
            transport, conn = await loop.create_unix_connection(FramesConnection, target.target.removeprefix("unix:"))
        except FileNotFoundError:
            raise FramesAbsent(f"the replica has no frames socket ({self.path})") from None
        except OSError as err:
            raise Unavailable(f"cannot reach the replica: {err}") from None
        finally:
            target.close()  # the connection, once made, no longer needs the path
        if self._session:
            try:
                check_peer(transport.get_extra_info("socket"), self._session, "its frames socket")
            except ImpostorReplica:
                transport.close()  # nothing was sent on it
                raise
        if self._key:
            conn.send(0, KEY, self._key.encode())
        return conn

    def _opened(self, future: asyncio.Future[FramesConnection]) -> None:
        self._connecting = None
        if future.cancelled():
            return
        if future.exception() is not None:
            self.absent = isinstance(future.exception(), FramesAbsent)
            if isinstance(future.exception(), ImpostorReplica):
                self.impostor = future.exception().message
            return
        conn = future.result()
        if self._closed:
            conn.close()
        else:
            self._conn = conn

    def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

