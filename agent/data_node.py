"""The agent's data plane in one object: shard store, side channel, puller, Shards service.

The daemon makes one `DataNode`, registers it with its gRPC server, and closes it on stop.
The store's quota comes from `LEPTON_SHARD_QUOTA_BYTES` (unset: only the disk limits). With
a shard key file (the cluster secret) new blobs are encrypted at rest (docs/data.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc

from lepton.agent.inventory import InventoryReporter
from lepton.agent.link import CoordinatorLink
from lepton.agent.node_directory import NodeDirectory
from lepton.common.channels import TlsConfig
from lepton.common.errors import InvalidArgument, LeptonError
from lepton.common.served_certs import coordinators_only
from lepton.common.validation import split_host_port
from lepton.dataplane.shard_crypto import ShardCipher
from lepton.dataplane.shard_service import ShardService, add_to_server
from lepton.dataplane.shards import ShardStore
from lepton.dataplane.transfer import ByteCounter, Puller, SideChannel
from lepton.v1 import datasets_pb2 as dpb

logger = logging.getLogger(__name__)

QUOTA_ENV = "LEPTON_SHARD_QUOTA_BYTES"


def quota_from_env(env=os.environ) -> int | None:
    """Raises InvalidArgument for a value that is not a positive integer."""
    raw = env.get(QUOTA_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) <= 0:
        raise InvalidArgument(f"{QUOTA_ENV}={raw!r} is not a positive number of bytes")
    return int(raw)


def load_cipher(shard_key_file: str, tls: TlsConfig | None = None) -> ShardCipher | None:
    """The shard cipher from the cluster secret's file, or None (no encryption at rest).
    Raises InvalidArgument for a missing, unreadable or malformed file. Logs the key id,
    never the secret."""
    if not shard_key_file:
        return None
    from lepton.common import cluster_secret

    cipher = ShardCipher.from_file(shard_key_file)
    if cluster_secret.loosely_readable(shard_key_file):
        logger.warning("shard key file %s can be read by group or others: chmod 600 it", shard_key_file)
    if tls is None:
        # Copies between nodes with this key travel sealed; downloads and nodes without it get plaintext.
        logger.warning("shards are encrypted at rest, but downloads and copies to nodes without this key "
                       "cross the network in plaintext without --tls-dir")
    logger.info("shards are encrypted at rest (AES-256-GCM, key id %s)", cipher.key_id)
    return cipher


class DataNode:
    def __init__(
        self, data_dir: Path, node_id: str, listen: str, link: CoordinatorLink,
        on_bytes: ByteCounter | None = None, tls: TlsConfig | None = None, shard_key_file: str = "",
        inventory_interval_s: float = 300.0, orphan_grace_s: float = 600.0, reserve_bytes: int = 0,
    ):
        self.node_id = node_id
        self._on_bytes = on_bytes  # shard bytes in/out, for metrics
        cipher = load_cipher(shard_key_file, tls=tls)
        # Raises FailedPrecondition when the store was sealed with another key, or without one now.
        self.store = ShardStore(Path(data_dir) / "shards", quota_bytes=quota_from_env(), cipher=cipher,
                                reserve_bytes=reserve_bytes)
        self.side = SideChannel(self.store, split_host_port(listen)[0], on_bytes=on_bytes, tls=tls)
        self.puller = Puller(self.store, on_bytes=on_bytes, tls=tls)
        self._datasets = link.datasets  # the agent's one link to the leader, shared
        self._nodes = NodeDirectory(link.coordinator)  # PullShards sources: node ids, looked up
        self._coordinators_only = coordinators_only(tls, lambda: link.addresses)  # who may order deletes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self.store.on_quarantine = self._on_quarantine
        self.inventory = InventoryReporter(self.store, self._datasets, node_id,
                                           interval_s=inventory_interval_s, grace_s=orphan_grace_s)
        logger.info(
            "shard store %s: %d shards, %d bytes, side channel on port %d",
            self.store.root, len(self.store.list()), self.store.used_bytes, self.side.port,
        )

    def add_to_server(self, server: grpc.aio.Server) -> str:
        self._loop = asyncio.get_running_loop()
        service = ShardService(self.store, self.side, self.puller, self.node_id, on_bytes=self._on_bytes,
                               resolve_nodes=self._nodes.addresses, coordinators_only=self._coordinators_only)
        return add_to_server(service, server)

    def _on_quarantine(self, shard_id: str) -> None:
        # Called from any thread: hop to the loop, then tell the leader the replica is gone.
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._start_report, shard_id)

    def _start_report(self, shard_id: str) -> None:
        task = asyncio.ensure_future(self._report(shard_id))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(self, shard_id: str) -> None:
        req = dpb.DropReplicaRequest(shard_id=shard_id, node_id=self.node_id, reason="corrupt on disk")
        for attempt in range(5):
            try:
                await self._datasets.call("DropReplica", req, timeout=5)
                logger.info("reported corrupt shard %s to the coordinator", shard_id[:12])
                return
            except LeptonError as err:
                logger.info("reporting corrupt shard %s failed: %s", shard_id[:12], err.message)
                await asyncio.sleep(0.2 * 2**attempt)

    async def close(self) -> None:
        for task in list(self._reports):
            task.cancel()
        self.side.close()
        self.puller.close()
