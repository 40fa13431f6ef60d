"""The agent's heartbeat: register, heartbeat on a stream, drain, leave.

Calls go through the agent's one CoordinatorLink (lepton.agent.link), which follows the
leader. A leader that stops answering on the stream is skipped here (the link tells the
other callers); each failure backs off exponentially (with jitter) up to `MAX_BACKOFF_S`.

A voter's agent whose own coordinator leads beats in-process (`local`): the same checks and
answer as the RPC, no stream to itself. The usage it reports is sampled every
`USAGE_SAMPLE_S` (`CachedSample`), not per beat.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import grpc

from lepton.agent.link import MAX_BACKOFF_S, MIN_BACKOFF_S, CoordinatorLink
from lepton.common.errors import (
    REASON_WRONG_STATE_BACKEND,
    FailedPrecondition,
    LeptonError,
    NotFound,
    Unavailable,
)
from lepton.common.failover import answer_deadline_s
from lepton.v1 import common_pb2, coordinator_pb2

logger = logging.getLogger(__name__)

# Usage (CPU, memory, disk, GPUs, a free port) is sampled this often, not on every beat: the
# scheduler and `nodes show` need it fresh to seconds, and a beat should cost next to nothing.
USAGE_SAMPLE_S = 5.0

T = TypeVar("T")
LocalBeat = Callable[[coordinator_pb2.HeartbeatRequest], Awaitable[coordinator_pb2.HeartbeatResponse]]


class CachedSample(Generic[T]):
    """`sample()`'s last result, taken again once it is `max_age_s` old."""

    def __init__(self, sample: Callable[[], T], max_age_s: float, clock: Callable[[], float] = time.monotonic):
        self._sample = sample
        self._max_age_s = max_age_s
        self._clock = clock
        self._value: T | None = None
        self._taken = 0.0
        self.samples = 0  # how many were taken (tests)

    def __call__(self) -> T:
        now = self._clock()
        if self._value is None or now - self._taken >= self._max_age_s:
            self._value, self._taken = self._sample(), now
            self.samples += 1
        return self._value


class Heartbeater:
    """Keeps this node registered and heartbeating. `run_cycle()` does one step."""

    def __init__(
        self,
        link: CoordinatorLink,
        make_registration: Callable[[], coordinator_pb2.RegisterNodeRequest],
        usage: Callable[[], common_pb2.Usage],
        *,
        interval_s: float,
        on_term: Callable[[int], None] | None = None,
        on_registered: Callable[[], None] | None = None,
        on_refused: Callable[[LeptonError], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        local: LocalBeat | None = None,
        local_address: str = "",
    ):
        self._link = link
        self._make_registration = make_registration
        self._usage = usage
        self.interval_s = interval_s
        self._on_term = on_term
        self._on_registered = on_registered  # the shard inventory reports at once
        self._on_refused = on_refused  # a refusal no retry can change: the agent exits
        self._registered = False
        self._stream = None  # the HeartbeatStream call, while open
        self._stream_address = ""  # where it is open
        self._reader: asyncio.Task[None] | None = None
        self._broken: LeptonError | None = None  # why the stream failed, seen by the reader
        self._left = False  # the leader has this node as left
        self._clock = clock  # monotonic; injectable so tests need not wait out a silence
        self._last_answer = 0.0  # clock() of the leader's last answer on the stream
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # cuts run()'s wait short: stopping, a shorter interval
        # This voter's own coordinator's heartbeat handling, used while the link aims at
        # `local_address` (ours): no network round trip to ourselves.
        self._local = local
        self._local_address = local_address
        self.beats = 0  # beats sent (tests count them)
        self.node_id = make_registration().node_id

    def answer_age_s(self) -> float:
        """Seconds since the leader last answered on the heartbeat stream; NaN before the
        first answer. Safe from any thread."""
        if not self._last_answer:
            return float("nan")
        return max(0.0, self._clock() - self._last_answer)

    async def run_cycle(self) -> str:
        """Register if needed, else send one heartbeat. Raises LeptonError on failure."""
        timeout = max(1.0, 2 * self.interval_s)
        if self._broken is not None:
            err, self._broken = self._broken, None
            self._drop_stream()
            if isinstance(err, NotFound):
                self._registered = False  # the cluster forgot us (e.g. its state was wiped)
                return "coordinator does not know this node; registering again"
            raise err
        if not self._registered:
            request = self._make_registration()
            try:
                resp = await self._link.coordinator.call("RegisterNode", request, timeout)
            except FailedPrecondition as err:
                # A voter of the other state backend (coordinator/api/service.py's
                # _check_voter_backend) is refused until it is restarted with other flags.
                if request.voter and err.reason == REASON_WRONG_STATE_BACKEND and self._on_refused is not None:
                    self._on_refused(err)
                raise
            self._registered = True
            self._adopt_interval(resp.heartbeat_interval_ms)
            if self._on_registered is not None:
                self._on_registered()
            return f"registered with the coordinator at {self._link.address}"
        if self._local is not None and self._link.address == self._local_address:
            return await self._beat_locally(timeout)
        if self._stream is not None and self._stream_address != self._link.address:
            self._drop_stream()  # another caller found the leader elsewhere: follow it
        if self._stream is None:
            self._stream, self._stream_address = self._link.coordinator.open_stream("HeartbeatStream")
            self._last_answer = self._clock()
            self._reader = asyncio.create_task(
                self._read(self._stream, self._stream_address), name="heartbeat-reader")
        address = self._stream_address
        silent = self._clock() - self._last_answer
        # The leader answers every second beat: a silence past the answer deadline (in the
        # interval it hands out) means it is gone. The new leader's failover grace is sized
        # on the same numbers (common/failover.py).
        if silent > answer_deadline_s(self.interval_s):
            # Hung or SIGSTOPped: other streams to it (assignments) cannot tell; moving the
            # link tells them.
            self._drop_stream()
            self._link.skip(address)
            raise Unavailable(f"{address} has not answered heartbeats for {silent:.1f}s")
        req = coordinator_pb2.HeartbeatRequest(node_id=self.node_id, usage=self._usage())
        self.beats += 1
        try:
            await asyncio.wait_for(self._stream.write(req), timeout)
        except asyncio.TimeoutError:
            self._drop_stream()
            self._link.skip(address)
            raise Unavailable(f"{address} took no heartbeat in {timeout:.1f}s") from None
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # The reader sees the same failure and records why; report it next cycle.
            await asyncio.sleep(0)
            err, self._broken = self._broken, None
            self._drop_stream()
            raise err or Unavailable(f"{address} closed the heartbeat stream") from None
        return self._after_beat()

    async def _beat_locally(self, timeout: float) -> str:
        """One beat into this voter's own coordinator: its answer (or NotLeader, naming the
        leader the link then aims at) comes back in-process."""
        self._drop_stream()  # one opened to ourselves before this coordinator led
        address = self._local_address
        req = coordinator_pb2.HeartbeatRequest(node_id=self.node_id, usage=self._usage())
        self.beats += 1
        try:
            resp = await asyncio.wait_for(self._local(req), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"this voter's coordinator took no heartbeat in {timeout:.1f}s") from None
        except NotFound:
            self._registered = False  # the cluster forgot us (e.g. its state was wiped)
            return "coordinator does not know this node; registering again"
        except LeptonError as err:
            raise self._link.refused(err, address) from None
        self._answered(resp)
        return self._after_beat()

    def _after_beat(self) -> str:
        if self._left:
            self._left = False
            self._registered = False
            self._drop_stream()
            return "coordinator has this node as left; registering again"
        return "heartbeat ok"

    def _answered(self, resp: coordinator_pb2.HeartbeatResponse) -> None:
        self._last_answer = self._clock()
        self._link.answered()
        self._adopt_interval(resp.heartbeat_interval_ms)
        if self._on_term is not None:
            self._on_term(resp.term)
        if resp.state == common_pb2.NODE_STATE_LEFT:
            self._left = True

    async def _read(self, stream, address: str) -> None:
        """Consume the leader's answers (sent on change only). A broken stream is recorded
        for run_cycle; gRPC keepalive notices a leader that went silent."""
        try:
            while True:
                resp = await stream.read()
                if resp is grpc.aio.EOF:
                    raise Unavailable(f"{address} closed the heartbeat stream")
                self._answered(resp)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as rpc_err:
            if rpc_err.code() != grpc.StatusCode.CANCELLED or not self._stopping.is_set():
                self._broken = self._link.failed(rpc_err, address)
        except LeptonError as err:
            self._broken = err

    def _adopt_interval(self, interval_ms: int) -> None:
        """Beat as often as the leader asks (its heartbeat budget stretches the interval in
        a large cluster). A shorter interval cuts the current wait short."""
        if not interval_ms or interval_ms / 1000 == self.interval_s:
            return
        old, self.interval_s = self.interval_s, interval_ms / 1000
        logger.info("heartbeat: interval now %.3fs (was %.3fs), as the leader asks", self.interval_s, old)
        if self.interval_s < old:
            self._wake.set()

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None

    async def run(self) -> None:
        backoff = MIN_BACKOFF_S
        last = ""
        while not self._stopping.is_set():
            try:
                sentence = await self.run_cycle()
                backoff = MIN_BACKOFF_S
                delay = None if self._registered else 0.0  # None: the current interval
            except LeptonError as err:
                sentence = f"coordinator call failed ({err.code.name}: {err.message}); retrying"
                delay = backoff * random.uniform(0.5, 1.0)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            except Exception:
                logger.exception("heartbeat cycle failed")
                sentence, delay = "heartbeat cycle crashed", backoff
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            if sentence != last:
                logger.info("heartbeat: %s", sentence)
                last = sentence
            await self._pause(delay)

    async def _pause(self, delay: float | None) -> None:
        """Wait `delay` seconds (None: the heartbeat interval, re-read whenever the leader
        shortens it, so a shrinking cluster's agents speed up at once), or until stopped."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while not self._stopping.is_set():
            remaining = start + (self.interval_s if delay is None else delay) - loop.time()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def drain(self, timeout: float = 3.0) -> bool:
        """Ask the leader to place nothing more here (a graceful stop begins)."""
        req = coordinator_pb2.DrainNodeRequest(node_id=self.node_id, enable=True)
        return await self._ask_until("DrainNode", req, timeout)

    async def leave(self, timeout: float = 3.0) -> bool:
        """Tell the coordinator we are leaving (SIGTERM). Tries each address once."""
        self.stop()
        self._drop_stream()
        # Even when not known to be registered: a registration may have been in flight.
        return await self._ask_until("LeaveNode", coordinator_pb2.LeaveNodeRequest(node_id=self.node_id), timeout)

    async def _ask_until(self, method: str, req, timeout: float) -> bool:
        """Call `method` until it succeeds (True) or `timeout` seconds pass (False); NotFound
        (this node was never registered: nothing to drain or leave) is False at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                await self._link.coordinator.call(method, req, max(0.1, deadline - loop.time()))
                return True
            except NotFound:
                return False
            except LeptonError as err:
                logger.info("%s: %s", method, err.message)
                await asyncio.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def close(self) -> None:
        """Drop the stream; the link is the daemon's to close."""
        self._drop_stream()
