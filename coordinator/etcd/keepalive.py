"""The lease keep-alive on a thread of its own, with its own gRPC channel to etcd.

On the coordinator's event loop a keep-alive waits behind whatever the loop is busy with
(a scheduling cycle, a burst of submissions), so a loaded leader lost its lease and stepped
down though etcd was fine. Here a plain thread sends one keep-alive every `interval`
seconds over a short stream with a deadline (a sync stream read cannot be bounded
otherwise), independent of the loop. Each answer reports the time the keep-alive was
*sent* (time.monotonic()): etcd expires the lease TTL seconds after it last received one,
which is later, so `sent + TTL - margin` stays a safe deadline however late it is read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

import grpc
from aetcd import rpc

logger = logging.getLogger(__name__)


class KeepAliveThread:
    """Keeps `lease` (set by the owner; 0: none) alive. `on_answer(lease, sent, ttl)` is
    called on this thread for each answer (ttl <= 0: etcd no longer knows the lease), and
    `on_silent(endpoints)` when keep-alives timed out twice in a row, at those endpoints
    (frozen or cut off: the owner's other calls should leave them too). Both must be cheap
    and thread-safe."""

    def __init__(self, endpoints: Sequence[str], credentials: grpc.ChannelCredentials | None,
                 options: list, interval: float, on_answer: Callable[[int, float, int], None],
                 on_silent: Callable[[set[str]], None], name: str):
        self._endpoints = list(endpoints)
        self._credentials = credentials
        self._options = options
        self._interval = interval
        self._on_answer = on_answer
        self._on_silent = on_silent
        self._index = 0
        self._channel: grpc.Channel | None = None
        self._stub: rpc.LeaseStub | None = None
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a new lease to keep alive at once
        self.lease = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def keep(self, lease: int) -> None:
        """Keep `lease` alive from now on (0: none)."""
        self.lease = lease
        self._wake.set()

    def stop(self) -> None:
        """Ends the thread after its current keep-alive (bounded by its deadline); not
        joined, so the event loop calling this never waits on etcd."""
        self._stopping.set()
        self._wake.set()

    def _open(self) -> None:
        if self._channel is not None:
            self._channel.close()
        target = self._endpoints[self._index]
        if self._credentials is not None:
            self._channel = grpc.secure_channel(target, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(target, self._options)
        self._stub = rpc.LeaseStub(self._channel)

    def _run(self) -> None:
        failures = 0  # keep-alives failed in a row
        silent: list[str] = []  # the endpoints of the last two that timed out, in a row
        try:
            self._open()
            while not self._stopping.is_set():
                lease = self.lease
                sent = time.monotonic()
                if lease:
                    try:
                        ttl = self._once(lease)
                        failures = 0
                        silent.clear()
                        if not self._stopping.is_set():
                            self._on_answer(lease, sent, ttl)
                    except grpc.RpcError as err:
                        failures += 1
                        if failures <= 2 or failures % 20 == 0:
                            logger.warning("etcd: lease keep-alive to %s failed (%d in a row): %s",
                                           self._endpoints[self._index], failures, _describe(err))
                        if isinstance(err, grpc.Call) and err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                            silent[:] = silent[-1:] + [self._endpoints[self._index]]
                            if len(silent) == 2:  # not one slow answer on a loaded box
                                self._on_silent(set(silent))
                        else:
                            silent.clear()
                        # Another member at once: the deadline (TTL - margin after the last
                        # answered send) leaves room for one more try after a timeout.
                        if len(self._endpoints) > 1:
                            self._index = (self._index + 1) % len(self._endpoints)
                            self._open()
                    except Exception:  # noqa: BLE001 - a dead thread would cost every later lease
                        failures += 1
                        logger.exception("etcd: lease keep-alive failed unexpectedly")
                self._wake.clear()
                pause = self._interval - (time.monotonic() - sent) if not failures else 0.05 * failures
                self._wake.wait(max(0.0, min(self._interval, pause)))
        finally:
            if self._channel is not None:
                self._channel.close()

    def _once(self, lease: int) -> int:
        """One keep-alive on a stream bounded by a deadline; the TTL etcd answered."""
        # Bounded by one interval: a member that stopped answering (SIGSTOP, a partition)
        # is left at TTL*2/3 after the last answered send, early enough to renew elsewhere.
        stream = self._stub.LeaseKeepAlive(iter([rpc.LeaseKeepAliveRequest(ID=lease)]),
                                           timeout=self._interval)
        try:
            for answer in stream:
                return answer.TTL
        finally:
            stream.cancel()
        raise _Ended()


class _Ended(grpc.RpcError):
    """The keep-alive stream ended without an answer."""

    def __str__(self) -> str:
        return "keep-alive stream ended without an answer"


def _describe(err: grpc.RpcError) -> str:
    if isinstance(err, grpc.Call):
        return f"{err.code().name}: {err.details()}"
    return str(err) or type(err).__name__
