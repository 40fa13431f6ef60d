"""`EtcdConsensus`: the `Consensus` contract on an existing etcd v3 cluster.

Candidates campaign for one leader key (election.py); the leader appends batches of
commands as log keys in txns fenced by its term (here); every candidate applies the log
through one watch (log.py), so a new leader is warm; the leader snapshots into etcd and
compacts (snapshot.py). etcd provides durability on a majority: a txn that returned
committed is fsync'd on a majority of etcd members.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque

import grpc
from aetcd import rpc

from lepton.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LeptonError,
    NotLeader,
    Unavailable,
)
from lepton.common.validation import MAX_ENTRY_BYTES
from lepton.coordinator.consensus import (
    Consensus,
    ConsensusStatus,
    StateMachine,
    VoterStatus,
    await_within,
)
from lepton.coordinator.etcd.connection import Compacted, EtcdConnection, LeaseGone
from lepton.coordinator.etcd.election import Election
from lepton.coordinator.etcd.log import (
    Keys,
    LogApplier,
    append_refusal,
    append_request,
    claim_prefix,
    frame,
    framed_size,
    unframe,
)
from lepton.coordinator.etcd.snapshot import Snapshotter
from lepton.coordinator.etcd.tls import EtcdTls
from lepton.coordinator.etcd.watch_probe import WatchProbe

logger = logging.getLogger(__name__)

ETCD_REQUEST_LIMIT = 1536 << 10  # etcd's --max-request-bytes default
_TXN_OVERHEAD = 8 << 10  # the key, the two compares, protobuf framing
MAX_BATCH_BYTES = ETCD_REQUEST_LIMIT - _TXN_OVERHEAD
# One command must fit one txn under etcd's default request limit (Raft's own limit,
# MAX_ENTRY_BYTES, is larger): raise both together with etcd's --max-request-bytes.
DEFAULT_MAX_COMMAND_BYTES = min(MAX_ENTRY_BYTES, MAX_BATCH_BYTES - 64)
# Group commit under load (_linger): wait up to this long (and no longer than the last txn
# took) for more proposals, unless this many are queued already.
GROUP_LINGER_S = 0.005
LINGER_UNTIL_QUEUED = 64
START_WITHIN = 15.0  # seconds start() keeps trying to reach etcd
MEMBERS_EVERY = 5.0  # seconds between refreshes of the etcd member list for status()


class EtcdConsensus(Consensus):
    """Leader election, log and snapshots in etcd under `prefix` (e.g. /lepton/<cluster>).

    `endpoints` are etcd client addresses ("host:port"); `tls` the CA and client
    certificate to reach them. `lease_ttl` (seconds, rounded up to etcd's whole seconds) bounds
    failover: a dead leader's key expires after it. `cluster` (the --cluster-name) is
    recorded in `<prefix>/meta` by the first candidate; one of another cluster is refused
    at start. All methods run on one event loop.
    """

    def __init__(self, node_id: str, address: str, endpoints: list[str], prefix: str,
                 state_machine: StateMachine, *, tls: EtcdTls | None = None,
                 lease_ttl: float = 2.0, snapshot_every: int = 10_000,
                 max_command_bytes: int = DEFAULT_MAX_COMMAND_BYTES, cluster: str = ""):
        super().__init__()
        if not 1 <= lease_ttl <= 60:
            raise InvalidArgument(f"etcd lease TTL {lease_ttl}s must be between 1 and 60 seconds")
        if not endpoints:
            raise InvalidArgument("no etcd endpoints given")
        self._id = node_id
        self._address = address
        self._cluster = cluster
        self._endpoints = list(endpoints)
        self._keys = Keys(prefix)
        self._sm = state_machine
        self._tls = tls
        self._ttl = lease_ttl
        self._snapshot_every = snapshot_every
        self._max_command = max_command_bytes
        self._max_batch = max(MAX_BATCH_BYTES, framed_size(max_command_bytes, 1))
        self._timeout = max(2.0 * lease_ttl, 5.0)  # per etcd call
        # An append asks again after this: a txn forwarded to an etcd leader that just died
        # hangs until etcd's own request timeout (~7 s); asking again is idempotent.
        self._append_timeout = float(math.ceil(lease_ttl))
        self._started = False  # start() succeeded and stop() has not run
        self._running = False  # started, and no loop has failed
        self._leading_term = 0  # non-zero while leading and caught up
        self._queue: deque[tuple[bytes, asyncio.Future[object]]] = deque()
        self._queued_in_flight = False  # proposals came while the last txn was in flight (_linger)
        self._last_append_took = 0.0
        self._wakeup = asyncio.Event()  # the writer: proposals queued
        self._campaign_wakeup = asyncio.Event()  # the leader key went away, a lease came
        self._tasks: list[asyncio.Task] = []
        self._snapshot_task: asyncio.Task | None = None
        self._members: list[VoterStatus] = []
        self._conn: EtcdConnection | None = None
        self._applier: LogApplier | None = None
        self._election: Election | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Load the latest snapshot and the log after it from etcd into the state machine,
        then start campaigning. Raises Unavailable naming the endpoints when etcd cannot be
        reached within START_WITHIN seconds, FailedPrecondition for unreadable TLS files,
        a prefix that holds another cluster's state, or a stored entry the state machine
        raised on."""
        conn = self._conn = EtcdConnection(self._endpoints, self._tls)
        self._applier = LogApplier(conn, self._keys, self._sm, timeout=self._timeout)
        self._election = Election(conn, self._keys, self._id, self._address, self._ttl,
                                  timeout=self._timeout, on_lost=self._lease_lost,
                                  on_granted=self._campaign_wakeup.set)
        self._snapshots = Snapshotter(conn, self._keys, self._applier, timeout=self._timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WITHIN
        while True:
            try:
                await claim_prefix(conn, self._keys, self._cluster, timeout=self._timeout)
                revision = await self._applier.load()
                break
            except Compacted:
                continue
            except FailedPrecondition:
                await conn.close()
                raise
            except Unavailable as err:
                if loop.time() > deadline:
                    await conn.close()
                    raise Unavailable(f"cannot start: {err}") from None
                await asyncio.sleep(0.2)
            except Exception as err:  # noqa: BLE001 - the state machine raised on a stored entry
                # A candidate that cannot take the stored state must not campaign; the agent
                # says why in one line (the traceback is in the log at DEBUG).
                await conn.close()
                at = self._sm.applied_index
                logger.error("etcd consensus %s: loading the stored state failed after index %d: %r",
                             self._id, at, err, exc_info=logger.isEnabledFor(logging.DEBUG))
                raise FailedPrecondition(f"cannot start: loading the cluster state from etcd failed "
                                         f"after index {at}: {type(err).__name__}: {err}") from None
        self._started = self._running = True
        # Each loop's coroutine is made inside its task: a stop() before the task ran leaves
        # no coroutine never awaited.
        for loop_fn, name in ((self._election.run, "lease"), (lambda: self._watch_loop(revision + 1), "watch"),
                              (self._campaign_loop, "campaign"), (self._write_loop, "writer"),
                              (self._members_loop, "members")):
            self._tasks.append(asyncio.create_task(self._fail_stop(loop_fn), name=f"etcd-{name}-{self._id}"))
        logger.info("etcd consensus %s: loaded to index %d from %s under %s", self._id,
                    self._sm.applied_index, conn.described, self._keys.prefix.decode())

    async def stop(self) -> None:
        """Stop campaigning; if leading, revoke the lease (the leader key goes at once, so
        another candidate takes over without waiting for the TTL). Pending proposals fail
        with Unavailable (outcome unknown)."""
        if not self._started:
            return
        self._started = self._running = False
        self._step_down("stopping", Unavailable(f"etcd consensus {self._id} is stopping"))
        tasks = self._tasks + ([self._snapshot_task] if self._snapshot_task else [])
        for task in tasks:
            task.cancel()
        self._election.close()
        await self._election.resign()
        # Closing the channel ends every call a cancelled task may still be waiting on.
        await self._conn.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _fail_stop(self, loop_fn) -> None:
        """Run one of our loops; a bug in it (or a state machine that raised) stops this
        node for good, as a failed log store stops Raft: the failure listeners hear it and
        the process restarts, rather than lingering with a dead loop."""
        try:
            await loop_fn()
        except Exception as err:  # noqa: BLE001 - anything else is a bug; stop loudly
            logger.critical("etcd consensus %s: a loop failed; no longer a candidate: %s", self._id, err, exc_info=True)
            self._running = False
            self._step_down(f"failed: {err}", Unavailable(f"etcd consensus {self._id} failed: {err}"))
            self._notify_failure(err)
            await self._election.resign()

    # -- Consensus -------------------------------------------------------------------
    async def propose(self, command: bytes, *, timeout: float) -> object:
        """Append `command` in the next group-commit txn. Raises InvalidArgument when it
        is over `max_command_bytes` (before anything is appended), plus the contract's."""
        if len(command) > self._max_command:
            raise InvalidArgument(f"the command is {len(command)} bytes; a log entry holds at most {self._max_command}")
        if not self._running:
            raise Unavailable(f"etcd consensus {self._id} is not running")
        if not self._leading_term:
            raise NotLeader(f"{self._id} is not the leader", leader=self._election.leader_address)
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._queue.append((command, fut))
        self._wakeup.set()
        return await await_within(fut, timeout, "command not committed")

    async def read_barrier(self, *, timeout: float) -> None:
        """A linearizable read of the leader key: still ours, same create_revision. Every
        write acknowledged before the call was appended by this leader (or applied while it
        caught up on winning) and applied before its acknowledgement, so nothing more to
        wait for. Raises NotLeader, DeadlineExceeded."""
        term = self._leading_term
        if not self._running or not term:
            leader = self._election.leader_address if self._election else ""
            raise NotLeader(f"{self._id} is not the leader", leader=leader)
        try:
            mine = await asyncio.wait_for(self._election.still_leading(term), timeout)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"leadership not confirmed within {timeout:.3g}s") from None
        except LeptonError as err:
            raise NotLeader(f"leadership not confirmed: {err}") from None
        if not mine or self._leading_term != term:
            self._step_down("the leader key is no longer ours")
            raise NotLeader("leadership was lost", leader=self._election.leader_address)

    def is_leader(self) -> bool:
        """True once this node holds the leader key and has applied the log up to it, and
        its lease is still valid (a loop blocked past the deadline runs the watchdog late)."""
        return self._running and bool(self._leading_term) and self._election.lease_valid()

    def leader(self) -> tuple[str, str]:
        e = self._election
        if not self._running or e is None or not e.leader_id:
            return "", ""
        if e.leader_id == self._id and not self._leading_term:
            # A key still naming us after we stepped down (cut off from etcd, or not yet
            # expired there) is stale: naming ourselves would send clients back here forever.
            return "", ""
        return e.leader_id, e.leader_address

    def term(self) -> int:
        """The current leader key's create_revision (0 before any was seen)."""
        return self._leading_term or (self._election.leader_term if self._election else 0)

    def status(self) -> ConsensusStatus:
        """Voters are the etcd members (refreshed every MEMBERS_EVERY seconds; role leader
        or follower from etcd's Status, match index and lag 0: etcd keeps those)."""
        leader_id, leader_address = self.leader()
        applier = self._applier
        applied = self._sm.applied_index
        return ConsensusStatus(
            term=self.term(), leader_id=leader_id, leader_address=leader_address,
            commit_index=max(applier.last_index if applier else 0, applied),
            applied_index=applied, voters=list(self._members),
        )

    async def add_voter(self, address: str, *, timeout: float) -> None:
        raise FailedPrecondition("voters are etcd members here; manage them with etcdctl")

    async def remove_voter(self, address: str, *, timeout: float) -> None:
        raise FailedPrecondition("voters are etcd members here; manage them with etcdctl")

    # -- leadership ------------------------------------------------------------------
    def _lease_lost(self, reason: str) -> None:
        self._step_down(reason)
        self._campaign_wakeup.set()

    def _step_down(self, reason: str, err: Exception | None = None) -> None:
        """Stop leading at once: queued proposals were never appended; those in a txn have
        an unknown outcome. Then let the lease go (in the background) so another leads."""
        term = self._leading_term
        if not term:
            return
        self._leading_term = 0
        if self._election.leader_id == self._id:
            self._election.observe_deleted()  # our key is gone or about to be: no one known
        for _, fut in self._queue:
            if not fut.done():
                fut.set_exception(err or Unavailable(f"leadership was lost ({reason}); the command was not committed"))
        self._queue.clear()
        self._applier.fail_waiters(err or Unavailable(f"leadership was lost ({reason}); outcome unknown"))
        logger.warning("etcd consensus %s: no longer leading term %d: %s", self._id, term, reason)
        self._notify_leadership(False, term)
        if self._running and self._election.lease_id:
            task = asyncio.create_task(self._election.resign(), name=f"etcd-resign-{self._id}")
            self._tasks.append(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        if task in self._tasks:
            self._tasks.remove(task)

    async def _campaign_loop(self) -> None:
        """Campaign whenever there is no leader (the watch tells), and once per TTL anyway
        (the txn is cheap and also refreshes who leads, should the watch have missed it)."""
        election = self._election
        while self._running:
            timed_out = False
            try:
                await asyncio.wait_for(self._campaign_wakeup.wait(), self._ttl if election.lease_id else 0.2)
            except asyncio.TimeoutError:
                timed_out = True
            self._campaign_wakeup.clear()
            if not self._running:
                return
            if self._leading_term or not election.lease_valid():
                continue
            if election.leader_id and not timed_out:
                continue
            try:
                term = await election.campaign()
                if term:
                    await self._take_office(term)
            except LeaseGone:
                election.lease_gone()
            except LeptonError as err:
                logger.info("etcd consensus %s: campaign failed: %s", self._id, err)

    async def _take_office(self, term: int) -> None:
        """We hold the leader key of `term`: catch up on the log (a read made after the win
        sees every append of earlier terms), then serve."""
        try:
            while True:
                try:
                    await self._applier.load()
                    break
                except Compacted:
                    continue
        except LeptonError as err:  # holding the key without serving would block everyone
            logger.warning("etcd consensus %s: won term %d but could not catch up (%s); resigning",
                           self._id, term, err)
            await self._election.resign()
            return
        e = self._election
        if not self._running or not e.lease_valid() or e.leader_term != term or e.leader_id != self._id:
            return  # lost it while catching up (the watch saw our key go)
        self._leading_term = term
        logger.info("etcd consensus %s: leading term %d at index %d", self._id, term, self._sm.applied_index)
        self._notify_leadership(True, term)
        self._wakeup.set()

    # -- the log ---------------------------------------------------------------------
    async def _write_loop(self) -> None:
        """Group commit: one txn in flight; what queues meanwhile goes in the next one."""
        while self._running:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and self._leading_term:
                await self._linger()
                term = self._leading_term  # read after the linger: leadership may have changed
                if not term:
                    break
                batch = self._take_batch()
                if not batch:
                    continue
                first = self._sm.applied_index + 1
                for offset, (_, fut) in enumerate(batch):
                    self._applier.waiters[first + offset] = fut
                started = asyncio.get_running_loop().time()
                await self.append(term, first, [data for data, _ in batch])
                self._last_append_took = asyncio.get_running_loop().time() - started
                self._queued_in_flight = bool(self._queue)

    async def _linger(self) -> None:
        """Under load, wait a little for more proposals before the next txn: etcd's cost is
        mostly per txn (an fsync on each member, one watch event per candidate), and with
        one txn in flight 16 clients made batches of ~3.6 entries; a 5 ms linger makes them
        ~8 (docs/operations.md has the same-run figures). Load means proposals queued while
        the last txn was in flight: one caller at a time (its next proposal comes after
        its answer) never waits."""
        if not self._queued_in_flight or len(self._queue) >= LINGER_UNTIL_QUEUED:
            return
        await asyncio.sleep(min(GROUP_LINGER_S, self._last_append_took))

    def _take_batch(self) -> list[tuple[bytes, asyncio.Future[object]]]:
        batch, size = [], framed_size(0, 0)
        while self._queue:
            data, fut = self._queue[0]
            if fut.done():  # timed out or cancelled before it was appended: never append
                self._queue.popleft()
                continue
            if batch and size + framed_size(len(data), 1) > self._max_batch:
                break
            self._queue.popleft()
            batch.append((data, fut))
            size += framed_size(len(data), 1) - framed_size(0, 0)
        return batch

    async def append(self, term: int, first: int, entries: list[bytes]) -> bool:
        """Put one batch at `first` in a txn that succeeds only while the leader key of
        `term` exists and the index is free. True when committed (and then applied).
        An answer lost with the connection (etcd unreachable, a member killed) is asked
        again at the same index while we lead: the index guard makes that idempotent, and a
        refusal tells whether the earlier try landed. A fenced txn ends this leadership."""
        value = frame(entries)
        request = append_request(self._keys, term, first, value)
        while True:
            try:
                resp = await self._conn.call(self._conn.kv.Txn, request, timeout=self._append_timeout)
                break
            except InvalidArgument as err:  # etcd's request limit is lower than ours: nothing appended
                self._fail_range(first, len(entries), err)
                return False
            except LeptonError as err:
                if self._leading_term != term or not self._running:
                    return False  # stepped down meanwhile: its waiters know the outcome is unknown
                logger.info("etcd consensus %s: append at %d: %s; asking again", self._id, first, err)
                await asyncio.sleep(0.05)
        mine, committed = True, bool(resp.succeeded)
        if not resp.succeeded:
            mine, committed = append_refusal(resp, term, value)
        if not mine and self._leading_term == term:
            self._step_down("fenced: the leader key is no longer ours")
        if not committed:
            self._fail_range(first, len(entries), Unavailable("leadership was lost; the command was not committed"))
            if self._leading_term == term:
                self._step_down(f"log index {first} was taken by another writer")
            return False
        self._applier.apply_batch(first, entries)  # committed: apply even if deposed meanwhile
        self._maybe_snapshot(term)
        return True

    def _fail_range(self, first: int, count: int, err: Exception) -> None:
        for index in range(first, first + count):
            fut = self._applier.waiters.pop(index, None)
            if fut is not None and not fut.done():
                fut.set_exception(err)

    def _maybe_snapshot(self, term: int) -> None:
        snap = self._applier.snapshot
        if self._snapshot_task is not None and not self._snapshot_task.done():
            return
        index = self._sm.applied_index
        if index - (snap.index if snap else 0) < self._snapshot_every or self._leading_term != term:
            return
        data = self._sm.snapshot()  # taken now, at a batch boundary; written in the background
        self._snapshot_task = asyncio.create_task(self._write_snapshot(term, index, data),
                                                  name=f"etcd-snapshot-{self._id}")

    async def _write_snapshot(self, term: int, index: int, data: bytes) -> None:
        try:
            await self._snapshots.write(term, index, data)
        except LeptonError as err:
            logger.warning("etcd consensus %s: snapshot at %d not written: %s", self._id, index, err)

    # -- the watch -------------------------------------------------------------------
    async def _watch_loop(self, revision: int) -> None:
        """Apply log batches and follow the leader key from `revision` on; reopen on errors,
        reload from the snapshot when etcd compacted past us or a batch is missing."""
        conn = self._conn
        while self._running:
            generation = conn.generation
            call = conn.watch.Watch()
            probe = WatchProbe(call, self._ttl, lambda silent, g=generation: self._watch_stalled(g, silent))
            prober: asyncio.Task | None = None
            try:
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=self._keys.watch_start, range_end=self._keys.watch_end, start_revision=revision)))
                prober = asyncio.create_task(probe.run(), name=f"etcd-watch-probe-{self._id}")
                while True:
                    resp = await call.read()
                    probe.heard()
                    if resp is grpc.aio.EOF:
                        raise ConnectionError("watch stream ended")
                    if resp.compact_revision or resp.canceled:
                        prober.cancel()  # the stream is not read while reloading
                        revision = await self._reload()
                        break
                    for event in resp.events:
                        revision = event.kv.mod_revision + 1
                        if not self._on_event(event):
                            prober.cancel()
                            revision = await self._reload()
                            raise ConnectionError("reloaded")
            except asyncio.CancelledError:
                if not conn.superseded(generation):
                    raise
            except grpc.aio.AioRpcError as err:
                conn.error(err, generation)
                await asyncio.sleep(0.1)
            except (LeptonError, ConnectionError, asyncio.InvalidStateError):
                await asyncio.sleep(0.05)  # the last: the stream's channel was closed (failover)
            finally:
                if prober is not None:
                    prober.cancel()
                call.cancel()

    def _watch_stalled(self, generation: int, silent: float) -> None:
        """The watch heard nothing for `silent` seconds, probes included: leave its endpoint
        (closing the channel ends the stream; the loop reopens it on the next endpoint)."""
        if generation == self._conn.generation:
            logger.warning("etcd consensus %s: the watch on %s answered nothing for %.1fs; moving to another endpoint",
                           self._id, self._conn.current, silent)
        self._conn.failover(generation)

    async def _reload(self) -> int:
        """load() until it works; returns the revision to watch from."""
        while True:
            try:
                return await self._applier.load() + 1
            except LeptonError as err:
                logger.info("etcd consensus %s: reloading: %s", self._id, err)
                await asyncio.sleep(0.2)

    def _on_event(self, event) -> bool:
        kv, election = event.kv, self._election
        if kv.key == self._keys.leader:
            if event.type == rpc.Event.PUT:
                if kv.create_revision >= election.leader_term:
                    election.observe(kv)
                if self._leading_term and kv.create_revision > self._leading_term:
                    self._step_down("another leader key appeared")  # (an older one is a late event)
            elif kv.mod_revision > election.leader_term:  # not a stale deletion of an older key
                election.observe_deleted()
                if self._leading_term:
                    self._step_down("the leader key was deleted (lease expired or revoked)")
                self._campaign_wakeup.set()
            return True
        if event.type == rpc.Event.PUT and kv.key.startswith(self._keys.log):
            first = self._keys.log_index(kv.key)
            if first <= self._sm.applied_index:
                # Batches are applied whole, so this one was: the leader's echo of its own
                # append (applied when the txn answered). Not decoded again.
                return True
            try:
                entries = unframe(kv.value)
            except ValueError as err:
                logger.error("etcd consensus %s: skipping %r: %s", self._id, kv.key, err)
                return True
            return self._applier.apply_batch(first, entries)
        return True

    # -- status ----------------------------------------------------------------------
    async def _members_loop(self) -> None:
        conn = self._conn
        while self._running:
            try:
                members = await conn.call(conn.cluster.MemberList, rpc.MemberListRequest(), timeout=self._timeout)
                status = await conn.call(conn.maintenance.Status, rpc.StatusRequest(), timeout=self._timeout)
                self._members = [
                    VoterStatus(m.name or f"{m.ID:x}", m.clientURLs[0].split("://")[-1] if m.clientURLs else "",
                                "leader" if m.ID == status.leader else "learner" if m.isLearner else "follower", 0, 0)
                    for m in members.members
                ]
            except LeptonError as err:
                logger.debug("etcd member list: %s", err)
            await asyncio.sleep(MEMBERS_EVERY)
