"""A fake wire under the agent's CoordinatorLink: per-address fake servers instead of gRPC
channels, so the link's own logic (leader following, listeners) runs unchanged and the
heartbeat and assignment loops can be driven without a coordinator or an agent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from lepton.agent.link import CoordinatorLink
from lepton.common.errors import LEADER_METADATA_KEY

WAIT_S = 30.0  # generous: the machine may be loaded


def rpc_error(code: grpc.StatusCode, details: str = "", leader: str = "") -> grpc.aio.AioRpcError:
    """What a gRPC call raises; `leader` as a follower's trailing metadata names it."""
    trailing = grpc.aio.Metadata((LEADER_METADATA_KEY, leader)) if leader else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details or code.name)


def refuse(err: Exception):
    """A unary handler that fails every call with `err`."""
    def handler(request):
        raise err
    return handler


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class BidiStream:
    """A HeartbeatStream call: what the agent wrote, and answers the test feeds in."""

    def __init__(self):
        self.sent: list = []
        self.cancelled = False
        self.write_error: BaseException | None = None
        self._answers: asyncio.Queue = asyncio.Queue()

    async def write(self, request) -> None:
        if self.write_error is not None:
            raise self.write_error
        self.sent.append(request)

    async def read(self):
        item = await self._answers.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def answer(self, item) -> None:
        """A response, grpc.aio.EOF, or an exception the next read raises."""
        self._answers.put_nowait(item)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class ServerStream:
    """A server-streaming call (WatchAssignments): async-iterated; cancel() ends the
    iteration with CancelledError, as grpc.aio does."""

    _CANCEL = object()

    def __init__(self, request):
        self.request = request
        self.cancelled = False
        self._items: asyncio.Queue = asyncio.Queue()

    def push(self, item) -> None:
        """A message, an exception the iteration raises, or None: the stream ends."""
        self._items.put_nowait(item)

    def cancel(self) -> bool:
        self.cancelled = True
        self._items.put_nowait(self._CANCEL)
        return True

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._items.get()
        if item is self._CANCEL:
            raise asyncio.CancelledError()
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class FakeServer:
    """One address. Unary methods answer from `handlers[method](request)` (which may raise
    an AioRpcError); streams are recorded for the test to drive."""

    def __init__(self, address: str):
        self.address = address
        self.handlers: dict[str, Callable] = {}
        self.calls: list[tuple[str, object]] = []
        self.streams: list = []

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)

        def invoke(request=None, timeout=None):
            if request is None:  # a bidi stream
                stream = BidiStream()
                self.streams.append(stream)
                return stream
            if method in self.handlers or not method.startswith("Watch"):
                return self._unary(method, request)
            stream = ServerStream(request)
            self.streams.append(stream)
            return stream

        return invoke

    async def _unary(self, method: str, request):
        self.calls.append((method, request))
        handler = self.handlers.get(method)
        if handler is None:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{method} not faked")
        return handler(request)


class FakeWireLink(CoordinatorLink):
    """The real link; its stubs are FakeServers, one per address (whatever the service)."""

    def __init__(self, addresses: list[str], **kw):
        super().__init__(addresses, **kw)
        self.servers: dict[str, FakeServer] = {}
        self.moves: list[tuple[str, str]] = []
        self.on_leader_change(lambda old, new: self.moves.append((old, new)))

    def server(self, address: str) -> FakeServer:
        if address not in self.servers:
            self.servers[address] = FakeServer(address)
        return self.servers[address]

    def stub(self, stub_class: type, address: str) -> FakeServer:
        return self.server(address)
