"""Leader election on etcd with fencing: one leader key held by a lease.

The leader key's create_revision is the term: etcd revisions only grow, so a later leader
always has a higher term, and every append is guarded by it (a deposed leader can never
append). A leader that cannot renew its lease steps down before etcd can have expired it:
etcd expires a lease TTL after the last keep-alive it *received*, which is after we sent
it, so `sent + TTL - margin` of the last answered keep-alive is a safe deadline. The
keep-alives run on a thread of their own (keepalive.py): a busy event loop cannot cost
the lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable

from aetcd import rpc

from lepton.common.errors import LeptonError
from lepton.coordinator.etcd.connection import CHANNEL_OPTIONS, EtcdConnection, LeaseGone
from lepton.coordinator.etcd.keepalive import KeepAliveThread
from lepton.coordinator.etcd.log import Keys

logger = logging.getLogger(__name__)


class Election:
    """Owns the lease (grant, keep-alive, revoke), the step-down deadline, the campaign
    txn, and what is known of the current leader (`leader_id`, `leader_address`,
    `leader_term`). `on_lost(reason)` is called on the loop when the lease can no longer be
    trusted; `on_granted()` whenever a new lease is ready to campaign with."""

    def __init__(self, conn: EtcdConnection, keys: Keys, node_id: str, address: str,
                 ttl: float, *, timeout: float, on_lost: Callable[[str], None],
                 on_granted: Callable[[], None]):
        self._conn = conn
        self._keys = keys
        self._id = node_id
        self._address = address
        self._ttl = ttl
        self._interval = ttl / 3  # keep-alive period: two can be lost before the deadline
        self._timeout = timeout
        self._on_lost = on_lost
        self._on_granted = on_granted
        self.lease_id = 0
        self.granted_ttl = 0
        self.valid_until = 0.0  # time.monotonic(); the lease may be relied on until then
        self._lock = threading.Lock()  # lease_id and valid_until, shared with the keep-alive thread
        self._keeper: KeepAliveThread | None = None
        self._lease_changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self._stale: list[int] = []  # leases dropped unrevoked: revoked once etcd answers
        self.leader_id = ""
        self.leader_address = ""
        self.leader_term = 0

    # -- leader key ------------------------------------------------------------------
    def observe(self, kv) -> None:
        """The leader key as read or watched (a KeyValue with a value)."""
        try:
            who = json.loads(kv.value)
            self.leader_id, self.leader_address = str(who["id"]), str(who["address"])
        except (ValueError, KeyError, TypeError):
            self.leader_id, self.leader_address = "?", ""
        self.leader_term = kv.create_revision

    def observe_deleted(self) -> None:
        self.leader_id, self.leader_address = "", ""

    async def campaign(self) -> int:
        """One attempt to create the leader key with our lease. Returns the term (the key's
        create_revision) when won, else 0 (and notes who leads). Atomic: one txn.
        Raises Unavailable (etcd unreachable) or LeaseGone (the lease expired meanwhile)."""
        lease = self.lease_id
        if not lease or not self.lease_valid():
            return 0
        k = self._keys.leader
        value = json.dumps({"id": self._id, "address": self._address}).encode()
        req = rpc.TxnRequest(
            compare=[rpc.Compare(key=k, target=rpc.Compare.CREATE, result=rpc.Compare.EQUAL, create_revision=0)],
            success=[rpc.RequestOp(request_put=rpc.PutRequest(key=k, value=value, lease=lease))],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=k))],
        )
        resp = await self._conn.call(self._conn.kv.Txn, req, timeout=self._timeout)
        if resp.succeeded:
            self.leader_id, self.leader_address = self._id, self._address
            self.leader_term = resp.header.revision
            return resp.header.revision
        kvs = resp.responses[0].response_range.kvs
        if kvs:
            self.observe(kvs[0])
        return 0

    async def still_leading(self, term: int) -> bool:
        """A linearizable read of the leader key: is it still the one created at `term`?
        Raises Unavailable."""
        resp = await self._conn.call(self._conn.kv.Range, rpc.RangeRequest(key=self._keys.leader),
                                     timeout=self._timeout)
        return bool(resp.kvs) and resp.kvs[0].create_revision == term

    # -- lease -----------------------------------------------------------------------
    def lease_valid(self) -> bool:
        return bool(self.lease_id) and time.monotonic() < self.valid_until

    def _answered(self, lease: int, sent: float, granted_ttl: int) -> None:
        """A keep-alive (or the grant) of `lease` sent at `sent` was answered; on the
        keep-alive thread or the loop. Extends the deadline; the watchdog on the loop reads
        it when it fires, so a loop that was blocked meanwhile finds the lease renewed."""
        if granted_ttl <= 0:
            try:
                self._loop.call_soon_threadsafe(self._gone, lease)
            except RuntimeError:  # the loop closed meanwhile (shutting down): nothing to tell
                pass
            return
        margin = max(0.2 * granted_ttl, 0.3)  # clock drift and the time the answer took
        with self._lock:
            if lease == self.lease_id:
                self.granted_ttl = granted_ttl
                self.valid_until = max(self.valid_until, sent + granted_ttl - margin)

    def _silent(self, endpoints: set[str]) -> None:
        """On the keep-alive thread: keep-alives to `endpoints` timed out. The watch and the
        appends on the shared connection would only notice after their own timeouts (a
        frozen member answers nothing): if it is on one of them, move it on too."""
        def leave() -> None:
            if self._conn.current in endpoints:
                self._conn.failover(self._conn.generation)
        try:
            self._loop.call_soon_threadsafe(leave)
        except RuntimeError:  # the loop closed meanwhile (shutting down)
            pass

    def _arm_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_later(max(0.0, self.valid_until - time.monotonic()), self._deadline)

    def _deadline(self) -> None:
        self._watchdog = None
        if not self.lease_id:
            return
        if time.monotonic() < self.valid_until:  # renewed meanwhile (by the keep-alive thread)
            self._arm_watchdog()
            return
        self._drop(f"lease not renewed within {self.granted_ttl}s less a margin")

    def _gone(self, lease: int) -> None:
        if lease == self.lease_id:
            self._drop("lease expired on etcd")

    def lease_gone(self) -> None:
        """etcd said our lease is unknown (expired): stop relying on it at once."""
        if self.lease_id:
            self._drop("lease expired on etcd")

    def _drop(self, reason: str) -> None:
        """Forget the lease (a new one is granted next) and tell the owner."""
        with self._lock:
            if self.lease_id:
                self._stale.append(self.lease_id)
            self.lease_id, self.valid_until = 0, 0.0
        if self._keeper is not None:
            self._keeper.keep(0)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._lease_changed.set()
        self._on_lost(reason)

    async def resign(self) -> None:
        """Revoke the lease (deleting the leader key at once: fast handover), best effort
        within a second; a lease not revoked simply expires."""
        lease = self.lease_id
        if not lease:
            return
        self._drop("resigned")
        self._stale.remove(lease)
        try:
            await self._conn.call(self._conn.lease.LeaseRevoke, rpc.LeaseRevokeRequest(ID=lease),
                                  timeout=1.0)
        except LeptonError as err:
            logger.info("etcd: could not revoke lease %x (it will expire): %s", lease, err)

    async def run(self) -> None:
        """Grant a lease and hand it to the keep-alive thread (every TTL/3, off this loop);
        when it is lost, revoke what may linger and grant another. Runs until cancelled."""
        self._loop = asyncio.get_running_loop()
        self._keeper = KeepAliveThread(self._conn.endpoints, self._conn.credentials, CHANNEL_OPTIONS,
                                       self._interval, self._answered, self._silent,
                                       name=f"etcd-keepalive-{self._id}")
        self._keeper.start()
        failures = 0
        try:
            while not self._closed:
                try:
                    while self._stale:  # a late keep-alive may have kept one alive: end it
                        try:
                            await self._conn.call(self._conn.lease.LeaseRevoke, rpc.LeaseRevokeRequest(
                                ID=self._stale[0]), timeout=self._timeout)
                        except LeaseGone:
                            pass  # expired already
                        self._stale.pop(0)
                    if not self.lease_id:
                        sent = time.monotonic()
                        resp = await self._conn.call(self._conn.lease.LeaseGrant, rpc.LeaseGrantRequest(
                            TTL=math.ceil(self._ttl)), timeout=self._timeout)
                        with self._lock:
                            self.lease_id = resp.ID
                        self._answered(resp.ID, sent, resp.TTL)
                        self._arm_watchdog()
                        self._keeper.keep(resp.ID)
                        self._on_granted()
                    failures = 0
                    self._lease_changed.clear()
                    if self.lease_id and not self._closed:
                        await self._lease_changed.wait()
                except LeptonError as err:
                    failures += 1
                    if failures <= 2 or failures % 20 == 0:
                        logger.warning("etcd: lease grant failed (%d in a row): %s", failures, err)
                    await asyncio.sleep(min(self._interval, 0.05 * failures))
        finally:
            self._keeper.stop()

    def close(self) -> None:
        """No more leases (a running `run()` ends); `resign()` still revokes the current one."""
        self._closed = True
        self._lease_changed.set()
        if self._keeper is not None:
            self._keeper.stop()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
