"""The replica's frames socket: Predict for its own agent without a gRPC call per request.

Beside its gRPC socket (health, and Predict for anything else) a replica listens on
`common.frames.frames_path(socket)`, reachable like the gRPC one only by its agent and the
task. Each request frame (common/frames.py) is parsed, checked and queued in the batcher
from the read callback, and answered from the batch's callback: no task, no coroutine per
request. The answers are those of the gRPC Predict (InferenceService, the same checks and
errors); a malformed request is INVALID_ARGUMENT and the replica keeps serving.
On SIGTERM (`drain`) the listener closes and new requests are answered UNAVAILABLE (the
agent retries another replica) while the queued ones finish.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from lepton.common.errors import InvalidArgument, LeptonError, PermissionDenied, Unavailable
from lepton.common.frames import KEY, OK, FrameProtocol
from lepton.common.sockets import UnixTarget
from lepton.v1 import serving_pb2

logger = logging.getLogger("lepton.replica")
_NOT_ERRORS = (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)


class FrameServer:
    """Serves `service` (replica.InferenceService: start_predict, answer) on a unix socket.
    `key_ok(key)`, when given, must accept a connection's key frame before it is served."""

    def __init__(self, service: Any, key_ok: Callable[[str], bool] | None = None):
        self.service = service
        self.key_ok = key_ok
        self.draining = False
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._target: UnixTarget | None = None
        self._path = ""

    async def start(self, path: str | os.PathLike[str]) -> None:
        """Listen on `path` (a previous attempt's file removed first). Raises OSError."""
        self._path = os.fspath(path)
        Path(self._path).unlink(missing_ok=True)
        self._target = UnixTarget(self._path)  # a deep data dir: through a handle on its folder
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _Connection(self), path=self._target.target.removeprefix("unix:"))
        except OSError:
            self._target.close()
            raise

    def drain(self) -> None:
        """No new connections; new requests are UNAVAILABLE; queued ones still answered."""
        self.draining = True
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """After the batcher finished: send what is queued and close every connection."""
        self.drain()
        await asyncio.sleep(0)  # the batch callbacks' frames are flushed in this turn
        for conn in list(self.connections):
            conn.close()
        Path(self._path).unlink(missing_ok=True)
        if self._target is not None:
            self._target.close()


class _Connection(FrameProtocol):
    def __init__(self, server: FrameServer):
        super().__init__()
        self._server = server
        self._admitted = server.key_ok is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)

    def frame_received(self, request_id: int, status: int, payload: bytes) -> None:
        if status == KEY or not self._admitted:
            self._admit(request_id, status, payload)
            return
        try:
            if self._server.draining:
                raise Unavailable("the replica is shutting down")
            try:
                request = serving_pb2.PredictRequest.FromString(payload)
            except DecodeError:
                raise InvalidArgument("the request is not a serialized PredictRequest") from None
            future = self._server.service.start_predict(request)
        except LeptonError as err:
            self._send_error(request_id, err)
            return
        except Exception as err:  # noqa: BLE001 - one request's failure; the replica keeps serving
            logger.exception("predict frame failed")
            self._send_error(request_id, LeptonError(f"the replica failed on this request: {err}"))
            return
        future.add_done_callback(functools.partial(self._answer, request_id))

    def _admit(self, request_id: int, status: int, payload: bytes) -> None:
        """A key frame: admitted if the replica takes that key; a refused key, or a request
        before any key, is PERMISSION_DENIED and the end of the connection."""
        key_ok = self._server.key_ok
        if status == KEY and (key_ok is None or key_ok(payload.decode("utf-8", "replace"))):
            self._admitted = True
            return
        self._send_error(request_id, PermissionDenied(
            "only this replica's agent may call it: call Predict on an agent (lepton-ctl serve predict)"))
        self.close()

    def _answer(self, request_id: int, future: asyncio.Future) -> None:
        if future.cancelled():
            return
        try:
            response = self._server.service.answer(future)
        except LeptonError as err:
            self._send_error(request_id, err)
            return
        self.send(request_id, OK, response.SerializeToString())

    def _send_error(self, request_id: int, err: LeptonError) -> None:
        # Never UNKNOWN (nor OK): an error without a code of its own is the replica's, INTERNAL.
        code = err.code if err.code not in _NOT_ERRORS else grpc.StatusCode.INTERNAL
        self.send(request_id, code.value[0], err.message.encode("utf-8", "replace"))
