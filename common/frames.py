"""Length-prefixed frames between an agent and its local replicas (docs/serving.md).

The agent's hop to a replica on its own node is a second unix socket beside the replica's
gRPC one (`frames_path`): a gRPC call there cost as much CPU per request as the client's
call to the agent (a profile of benchmarks/serve.py), for no gain on a private socket. Each
frame is a 12-byte header (payload bytes, request id, a status) and the payload:

- agent -> replica: status 0, the serialized `PredictRequest`;
- replica -> agent: status 0 and the serialized `PredictResponse`, or a gRPC status code
  (its number) and the error's message in UTF-8;
- agent -> replica, first on each connection: status KEY and the agent's key for this
  replica (agent/serving.py `attempt_key`). A replica that checks keys serves a connection
  only after the key it was claimed with; anything else gets PERMISSION_DENIED and the
  connection is closed (another task of the same user may reach the socket).

Requests are multiplexed on one connection by id and answered in any order. Frames written
in one turn of the event loop go out in one write (`FrameProtocol.send`), so a batch's
answers, or the requests of many callers, cost one system call. A frame over MAX_FRAME_BYTES
or a malformed one closes the connection (the peer sees its calls fail).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct

import grpc

from lepton.common.errors import LeptonError, error_for_code
from lepton.common.grpc_util import MAX_MESSAGE_BYTES

logger = logging.getLogger(__name__)

HEADER = struct.Struct("<IIi")  # payload length, request id, status (0: OK / a request)
# Above the gRPC message limit the agent applies to what it forwards, so the replica's own
# size checks (INVALID_ARGUMENT) answer an oversized request, not a dropped connection.
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + (1 << 20)
OK = 0
KEY = -1  # the status of a connection's key frame
FRAMES_SUFFIX = ".frames"
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def frames_path(serve_socket: str | os.PathLike[str]) -> str:
    """The frames socket of the replica whose gRPC socket is `serve_socket`."""
    return os.fspath(serve_socket) + FRAMES_SUFFIX


def error_of(status: int, payload: bytes) -> LeptonError:
    """The LeptonError an error frame carries."""
    code = _CODES.get(status, grpc.StatusCode.UNKNOWN)
    return error_for_code(code.name, payload.decode("utf-8", "replace"))


class FrameProtocol(asyncio.Protocol):
    """Splits the stream into frames (`frame_received`) and coalesces writes (`send`)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        start, size = 0, len(buf)
        while size - start >= HEADER.size:
            length, request_id, status = HEADER.unpack_from(buf, start)
            if length > MAX_FRAME_BYTES:
                logger.warning("a frame of %d bytes (at most %d): closing the connection", length, MAX_FRAME_BYTES)
                self.close()
                return
            end = start + HEADER.size + length
            if end > size:
                break
            self.frame_received(request_id, status, bytes(buf[start + HEADER.size:end]))
            start = end
            if self.transport is None or self.transport.is_closing():
                return  # closed by that frame: the rest is not read
        if start:
            del buf[:start]

    def frame_received(self, request_id: int, status: int, payload: bytes) -> None:
        raise NotImplementedError

    def send(self, request_id: int, status: int, payload: bytes) -> None:
        """Queue one frame; everything queued in this turn of the loop is written at once."""
        if self.transport is None or self.transport.is_closing():
            return
        self._out.append(HEADER.pack(len(payload), request_id, status))
        self._out.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def close(self) -> None:
        if self.transport is not None:
            self._flush()
            self.transport.close()
