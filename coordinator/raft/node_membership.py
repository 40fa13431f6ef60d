"""`RaftConsensus`'s half for changing the voter set: `add_voter` / `remove_voter`.

The rules live in the core (`membership.py`); this side checks the request, makes sure the
new server answers as a Raft node before the leader starts replicating to it, hands the
request to the core on the Raft loop and waits until the configuration is committed.
Voters are named by their advertised host:port, which is also their Raft id.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import grpc

from lepton.common.channels import TlsConfig, make_channel
from lepton.common.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    LeptonError,
    NotFound,
    NotLeader,
    Unavailable,
)
from lepton.common.validation import check_address
from lepton.coordinator.raft.membership import ADD, REMOVE
from lepton.coordinator.raft.messages import Role
from lepton.coordinator.raft.peer_auth import peer_metadata

if TYPE_CHECKING:
    from lepton.coordinator.raft.core import RaftCore

logger = logging.getLogger(__name__)

_ABORT = "abort"
PROBE_TIMEOUT_S = 3.0


class VoterChanges:
    """Mixed into `RaftConsensus`, whose attributes it uses (declared below)."""

    node_id: str
    peer_key: bytes | None
    _tls: TlsConfig | None
    _wakeup: asyncio.Event
    _member_ops: deque[tuple[str, str, asyncio.Future[None] | None]]
    _change_waiters: list[tuple[str, str, asyncio.Future[None]]]

    if TYPE_CHECKING:

        def _require_running(self) -> RaftCore: ...
        def raft_members(self) -> set[str]: ...
        async def _wait(self, fut: asyncio.Future, timeout: float, what: str) -> object: ...

    async def add_voter(self, address: str, *, timeout: float) -> None:
        """Make the Raft node advertising `address` a voter: it first catches up as a
        learner, then a configuration entry adds it. Returns once that entry is committed.

        Raises InvalidArgument (not HOST:PORT), NotLeader, AlreadyExists, FailedPrecondition
        (a change in progress; the node unreachable, not running Raft, or not catching up:
        nothing changed), DeadlineExceeded / Unavailable (outcome unknown: look at status).
        """
        check_address(address, "voter address")
        core = self._leader_core()
        if address in core.voters:
            raise AlreadyExists(f"{address} is already a voter")
        _check_idle(core)
        await self._probe(address)
        await self._submit_change(ADD, address, timeout)

    async def remove_voter(self, address: str, *, timeout: float) -> None:
        """Remove voter `address` (the leader itself included: it steps down once the
        change commits). Returns once the configuration entry is committed.

        Raises InvalidArgument, NotLeader, NotFound, FailedPrecondition (a change in
        progress, or the last voter), DeadlineExceeded / Unavailable (outcome unknown).
        """
        check_address(address, "voter address")
        core = self._leader_core()
        if address not in core.voters:
            raise NotFound(f"{address} is not a voter (voters: {', '.join(core.voters)})")
        _check_idle(core)
        await self._submit_change(REMOVE, address, timeout)

    def probe_info(self) -> tuple[int, int, bool]:
        """(term, last log index, is a voter): what the `Raft.Probe` RPC answers."""
        core = self._require_running()
        return core.term, core.last_index(), core.is_voter

    async def vouch_for(self, address: str) -> bool:
        """Whether a member we know counts `address` among its members: the Raft peer
        check asks when a proven sender is missing from our configuration (we may have
        missed the change that added it). Any member's yes counts: members are trusted."""
        from lepton.v1 import raft_pb2, raft_pb2_grpc

        for member in sorted(self.raft_members() - {self.node_id, address}):
            channel = make_channel(member, tls=self._tls)
            try:
                resp = await raft_pb2_grpc.RaftStub(channel).Probe(
                    raft_pb2.RaftProbeRequest(to_id=member), timeout=PROBE_TIMEOUT_S,
                    metadata=peer_metadata(self.node_id, self.peer_key))
            except grpc.aio.AioRpcError:
                continue  # down, or it does not know us either: ask the next
            finally:
                await channel.close()
            if address in resp.members:
                return True
        return False

    # -- internals -------------------------------------------------------------------
    def _leader_core(self) -> RaftCore:
        core = self._require_running()
        if core.role is not Role.LEADER:
            raise NotLeader(f"{self.node_id} is not the leader", leader=core.leader_address())
        return core

    async def _probe(self, address: str) -> None:
        """Fail fast, changing nothing, when `address` does not answer as a Raft node."""
        from lepton.v1 import raft_pb2, raft_pb2_grpc

        channel = make_channel(address, tls=self._tls)
        try:
            stub = raft_pb2_grpc.RaftStub(channel)
            await stub.Probe(raft_pb2.RaftProbeRequest(to_id=address), timeout=PROBE_TIMEOUT_S,
                             metadata=peer_metadata(self.node_id, self.peer_key))
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise FailedPrecondition(
                    f"{address} runs no Raft node: start that agent with --join-as-voter"
                ) from None
            if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED):
                raise FailedPrecondition(f"{address} refused: {err.details()}") from None
            raise FailedPrecondition(f"cannot reach a Raft node at {address} ({code.name})") from None
        finally:
            await channel.close()

    async def _submit_change(self, op: str, target: str, timeout: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._member_ops.append((op, target, fut))
        self._wakeup.set()
        try:
            await self._wait(fut, timeout, f"voter change ({op} {target}) not committed")
        except DeadlineExceeded:
            # Still catching up: give up on it, so it cannot complete behind our back.
            self._member_ops.append((_ABORT, target, None))
            self._wakeup.set()
            raise
        logger.info("raft %s: voter change committed: %s %s", self.node_id, op, target)

    def _run_member_ops(self, core: RaftCore) -> None:
        """On the Raft loop, between Readies: hand requests to the core, settle waiters."""
        while self._member_ops:
            op, target, fut = self._member_ops.popleft()
            if op == _ABORT:
                if core.pending_change() == (ADD, target):
                    core.abort_change("the request timed out")
                continue
            if fut is None or fut.done():
                continue
            try:
                if op == ADD:
                    core.add_voter(target, target)
                else:
                    core.remove_voter(target)
            except LeptonError as err:
                fut.set_exception(err)
                continue
            self._change_waiters.append((op, target, fut))
        if self._change_waiters:
            self._change_waiters = [w for w in self._change_waiters if not _settle(core, *w)]

    def _fail_changes(self, err: Exception) -> None:
        for _, _, fut in self._change_waiters:
            if not fut.done():
                fut.set_exception(err)
        self._change_waiters = []
        for _, _, fut in self._member_ops:
            if fut is not None and not fut.done():
                fut.set_exception(err)
        self._member_ops.clear()


def _check_idle(core: RaftCore) -> None:
    if core.pending_change() is not None or core.config_index > core.commit_index:
        raise FailedPrecondition("a voter change is already in progress; retry when it is done")


def _settle(core: RaftCore, op: str, target: str, fut: asyncio.Future[None]) -> bool:
    """Resolve `fut` if the change is decided; True when it is."""
    if fut.done():
        return True
    if core.role is not Role.LEADER:
        fut.set_exception(Unavailable("leadership was lost during the voter change; outcome unknown"))
        return True
    if core.pending_change() == (op, target):
        return False  # the learner is still catching up, or the rules make it wait
    if (target in core.voters) != (op == ADD):
        fut.set_exception(FailedPrecondition(core.change_error or f"{op} {target} was abandoned"))
        return True
    if core.config_index <= core.commit_index:
        fut.set_result(None)
        return True
    return False
