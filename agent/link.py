"""The agent's one link to the coordinator: every call it makes goes to the leader through it.

The heartbeat, the assignment watcher and event reporter, and the data node (inventory,
dropped replicas) share one `CoordinatorLink`, so they share one view of where the leader
is: when one of them learns that the leader moved (a follower's NotLeader names it, or the
address stopped answering), the others aim there too, and `on_leader_change` listeners hear
of it (a stream open at the old address is dropped by its owner).

Addresses come from --peers/--join (or the agent's own address in dev mode); a leader
named by a follower is added to them. One channel per address, one stub per service and
address, all closed by `close()`.

Several callers fail at once when a leader dies. Each failure re-aims the link only if the
link still points at the address that failed (`failed(err, address)`), so three callers
seeing one dead leader move it one step, not three.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from lepton.common.channels import TlsConfig, make_channel
from lepton.common.errors import LeptonError, NotLeader, from_rpc_error
from lepton.common.failover import MAX_BACKOFF_S, MIN_BACKOFF_S  # noqa: F401 - re-exported to callers
from lepton.v1 import coordinator_pb2_grpc, datasets_pb2_grpc

logger = logging.getLogger(__name__)

# Callers retry a failed call after a jittered exponential backoff between MIN_BACKOFF_S and
# MAX_BACKOFF_S: capped low, as the new leader's failover grace counts on it (common/failover).

# Failures that say "try elsewhere": the server is gone, hung, or not the leader.
_REAIM_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)

LeaderListener = Callable[[str, str], None]  # (old address, new address)


class CoordinatorLink:
    """Follows the leader for all of one agent's calls. Used on one event loop."""

    def __init__(self, addresses: list[str], *, tls: TlsConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not addresses:
            raise ValueError("no coordinator addresses")
        self._tls = tls
        self._clock = clock
        self._addresses = list(dict.fromkeys(addresses))
        self._current = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[tuple[type, str], Any] = {}
        self._listeners: list[LeaderListener] = []
        self._last_answer = 0.0  # clock() of the last answer from the leader; 0: none yet
        self.coordinator = ServiceLink(self, coordinator_pb2_grpc.CoordinatorStub)
        self.datasets = ServiceLink(self, datasets_pb2_grpc.DatasetsStub)

    @property
    def address(self) -> str:
        """Where calls go now: the leader, as far as this agent knows."""
        return self._addresses[self._current]

    @property
    def addresses(self) -> list[str]:
        return list(self._addresses)

    def on_leader_change(self, listener: LeaderListener) -> Callable[[], None]:
        """Call `listener(old, new)` (on the loop) whenever `address` changes. Returns a
        function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def answered(self) -> None:
        """The leader answered (a call succeeded, a stream message arrived)."""
        self._last_answer = self._clock()

    def answer_age_s(self) -> float:
        """Seconds since the leader last answered any caller; inf before the first answer."""
        return self._clock() - self._last_answer if self._last_answer else float("inf")

    def skip(self, address: str | None = None) -> None:
        """`address` (default: the current one) stopped answering: aim at the next one,
        unless another caller has already moved the link away from it."""
        if address is not None and address != self.address:
            return
        self._aim((self._current + 1) % len(self._addresses))

    def failed(self, rpc_err: grpc.aio.AioRpcError, address: str) -> LeptonError:
        """Map a call to `address` that failed; re-aim when that server is gone or is not
        the leader (to the leader it names, else the next address)."""
        return self.refused(from_rpc_error(rpc_err), address)

    def refused(self, err: LeptonError, address: str) -> LeptonError:
        """`address` answered with `err` (here, or in-process for this voter's own
        coordinator); re-aim as `failed` does. Returns `err`."""
        if err.code not in _REAIM_CODES:
            return err
        if isinstance(err, NotLeader) and err.leader:
            if err.leader not in self._addresses:
                self._addresses.append(err.leader)
            self._aim(self._addresses.index(err.leader))
        else:
            self.skip(address)
        return err

    def _aim(self, index: int) -> None:
        old = self.address
        self._current = index
        new = self.address
        if new == old:
            return
        logger.debug("coordinator link: %s -> %s", old, new)
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                logger.exception("leader-change listener failed")

    def stub(self, stub_class: type, address: str) -> Any:
        """A `stub_class` on the one channel to `address`."""
        stub = self._stubs.get((stub_class, address))
        if stub is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = make_channel(address, tls=self._tls)
            stub = self._stubs[(stub_class, address)] = stub_class(channel)
        return stub

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._stubs.clear()
        for channel in channels:
            await channel.close()


class ServiceLink:
    """One gRPC service's calls through a CoordinatorLink (`link.coordinator`, `link.datasets`)."""

    def __init__(self, link: CoordinatorLink, stub_class: type):
        self.link = link
        self._stub_class = stub_class

    async def call(self, method: str, request, timeout: float):
        """One attempt at the current address; on failure, re-aim and raise a LeptonError."""
        address = self.link.address
        try:
            response = await getattr(self.link.stub(self._stub_class, address), method)(request, timeout=timeout)
        except grpc.aio.AioRpcError as rpc_err:
            raise self.link.failed(rpc_err, address) from None
        self.link.answered()
        return response

    def open_stream(self, method: str, request=None) -> tuple[Any, str]:
        """A stream to the current address (bidi without `request`, server stream with it),
        and that address: report its failure with `link.failed(err, address)`."""
        address = self.link.address
        method_callable = getattr(self.link.stub(self._stub_class, address), method)
        return (method_callable() if request is None else method_callable(request)), address
