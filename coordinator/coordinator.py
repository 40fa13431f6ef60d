"""Wires the coordinator inside a voter agent: log store, consensus, state, liveness, API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

import grpc

from lepton.common.channels import TlsConfig
from lepton.common.config import AgentConfig
from lepton.common.durable import write_atomic
from lepton.common.errors import FailedPrecondition
from lepton.coordinator.api.service import CoordinatorContext, CoordinatorService, add_to_server
from lepton.coordinator.consensus import Consensus, SingleVoterConsensus
from lepton.coordinator.loops.liveness import Liveness, LivenessTimings
from lepton.coordinator.loops.scheduling import SchedulingLoop
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.coordinator.storage.log_store import FileLogStore, LogStore, MemoryLogStore

logger = logging.getLogger(__name__)

# In the data dir of an etcd candidate: where its state lives, so that a later start as a
# Raft voter (which would begin a second, empty history) is refused.
STATE_BACKEND_FILE = "state-backend.json"


def backend_name(config: AgentConfig) -> str:
    """"etcd", "raft" (several voters, or one waiting to be added) or "single" (one voter)."""
    if config.uses_etcd:
        return "etcd"
    return "single" if len(config.peers) <= 1 and not config.join_as_voter else "raft"


def check_state_backend(config: AgentConfig) -> None:
    """Refuse a data dir whose state lives in the other backend: an etcd candidate on a Raft
    voter's log, or a Raft voter on an etcd candidate's data dir. Records etcd's endpoints and
    prefix for the next start. Raises FailedPrecondition naming what to do."""
    data_dir = Path(config.data_dir)
    marker = data_dir / STATE_BACKEND_FILE
    if config.uses_etcd:
        raft = data_dir / "raft"
        if (raft / "hardstate").exists() or (raft / "snapshot").exists():
            raise FailedPrecondition(
                f"{data_dir} holds a built-in Raft log ({raft}): this node was a Raft voter, and --state etcd "
                "would start a separate history; use a fresh --data-dir (move the state with lepton-ctl "
                "snapshot save and snapshot restore --etcd), or start it without --state etcd"
            )
        doc = {"backend": "etcd", "endpoints": config.etcd_endpoints, "prefix": config.etcd_prefix}
        write_atomic(marker, (json.dumps(doc) + "\n").encode())
        return
    try:
        doc = json.loads(marker.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as err:
        raise FailedPrecondition(f"cannot read {marker}: {err}") from None
    raise FailedPrecondition(
        f"{data_dir} belongs to an etcd candidate (prefix {doc.get('prefix')!r} at "
        f"{','.join(doc.get('endpoints', []))}): start it with --state etcd://{','.join(doc.get('endpoints', []))}, "
        f"or as a Raft voter with a fresh --data-dir"
    )


def wall_ms() -> int:
    return int(time.time() * 1000)


class Coordinator:
    """The coordinator role of one voter. `start()` replays state before serving."""

    def __init__(self, config: AgentConfig, node_id: str, *, tls: TlsConfig | None = None):
        self.config = config
        self.tls = tls  # mTLS for Raft and coordinator->agent channels; None: plaintext
        self.node_id = node_id
        self.state = ClusterStateMachine()
        check_state_backend(config)
        # etcd keeps the log: nothing of it on this node's disk (`_term_of` then asks consensus).
        self.store: LogStore = MemoryLogStore() if config.uses_etcd else FileLogStore(Path(config.data_dir) / "raft")
        self.consensus: Consensus = self._make_consensus(config, node_id)
        self.liveness = Liveness(
            self.state,
            self._propose,
            LivenessTimings(config.suspect_after_s, config.down_after_s, config.failover_grace_s,
                            config.heartbeat_interval_s, config.max_heartbeats_per_s),
            monotonic=time.monotonic,
            wall_ms=wall_ms,
            self_id=node_id,
            cycle_interval_s=config.liveness_interval_s,
        )
        self.ctx = CoordinatorContext(
            self.state,
            self.consensus,
            self.liveness,
            wall_ms=wall_ms,
            max_spec_bytes=config.max_spec_bytes,
        )
        self.ctx.admission.max_tasks = config.max_submit_inflight
        self.ctx.state_backend = backend_name(config)
        self.ctx.etcd_endpoints, self.ctx.etcd_prefix = config.etcd_endpoints, config.etcd_prefix
        self.service = CoordinatorService(self.ctx)
        if tls is not None:  # a node registers only an address it serves (node restriction)
            from lepton.common.served_certs import ServedCertificates

            self.ctx.served = ServedCertificates(tls)
        self.scheduling = SchedulingLoop(
            self.state,
            self._propose,
            is_leader=self.consensus.is_leader,
            term=self.consensus.term,
            wall_ms=wall_ms,
            free_port=self._free_port,
        )
        self.ctx.scheduling = self.scheduling
        from lepton.coordinator.loops.replication import AgentPool, ReplicationLoop

        self.agent_pool = AgentPool(tls=tls)
        self.replication = ReplicationLoop(
            self.state, self._propose, self.agent_pool, is_leader=self.consensus.is_leader
        )
        self.state.add_listener(self.replication.wake)
        from lepton.coordinator.loops.reconcile import Reconciler

        self.reconciler = Reconciler(
            self.state, self._propose, self.agent_pool, is_leader=self.consensus.is_leader,
            term=self.consensus.term, monotonic=time.monotonic,
        )
        self.state.add_listener(self.reconciler.on_node_change)
        self.consensus.add_leadership_listener(self.reconciler.on_leadership)
        self.consensus.add_leadership_listener(self.liveness.on_leadership)
        self.consensus.add_leadership_listener(self.scheduling.wake)
        self.consensus.add_leadership_listener(self.ctx.hub.wake_all)
        self.state.tasks.listeners.append(self.ctx.hub.on_task_change)
        self.state.tasks.listeners.append(self.scheduling.on_task_change)
        self.state.add_listener(self.scheduling.wake)
        self._tasks: list[asyncio.Task[None]] = []
        from lepton.coordinator.api.security_api import AuditBatcher, Bootstrap

        self.audit = AuditBatcher(self._propose, self.consensus.is_leader)  # the interceptor's on_event
        self.bootstrap = Bootstrap(self.ctx, Path(config.data_dir), auth=getattr(config, "auth", False))
        self.consensus.add_leadership_listener(self.bootstrap.on_leadership)
        from lepton.coordinator.loops.gc import GarbageCollector, Retention

        self.gc = GarbageCollector(
            self.state, self._propose,
            Retention(config.gc_keep_finished, config.gc_max_age_s, config.gc_history, config.gc_interval_s),
            is_leader=self.consensus.is_leader, wall_ms=wall_ms,
        )
        self.ctx.gc = self.gc
        from lepton.coordinator.api.endpoints import EndpointTable
        from lepton.coordinator.loops.serving import ServingLoop

        # The leader's table of replica reports and the endpoint sets routers watch (soft
        # state); also the routers' counters (ServingStats) for serve show.
        self.endpoints = EndpointTable(self.state, require_leader=self.ctx.require_leader)
        self.endpoints.listen(self.state, self.consensus)
        self.serving = ServingLoop(self.state, self._propose, is_leader=self.consensus.is_leader,
                                   monotonic=time.monotonic, endpoints=self.endpoints,
                                   pending_reason=lambda task_id: self.scheduling.reasons.get(task_id, ""))
        self.consensus.add_leadership_listener(self.serving.on_leadership)
        self.state.tasks.listeners.append(
            lambda task, _node: self.serving.wake() if task.spec.HasField("replica") else None)
        self.state.deployments.listeners.append(self.serving.wake)  # it sleeps while there are none

    def _make_consensus(self, config: AgentConfig, node_id: str) -> Consensus:
        """One voter: a local log. Several: Raft, with each voter known by its advertised
        address (stable, and known to every peer before any node id is). --state etcd: the
        log and the election live in etcd (lepton.coordinator.etcd), every candidate alike."""
        me = config.advertise_address
        if config.uses_etcd:
            from lepton.coordinator.etcd.consensus import EtcdConsensus
            from lepton.coordinator.etcd.tls import EtcdTls

            tls = EtcdTls(config.etcd_ca, config.etcd_cert or None, config.etcd_key or None) if config.etcd_ca else None
            return EtcdConsensus(
                node_id, me, config.etcd_endpoints, config.etcd_prefix, self.state,
                tls=tls, lease_ttl=config.etcd_lease_ttl, snapshot_every=config.snapshot_every,
                cluster=config.cluster_name,
            )
        if len(config.peers) <= 1 and not config.join_as_voter:
            return SingleVoterConsensus(
                node_id, me, self.store, self.state, snapshot_every=config.snapshot_every
            )
        from lepton.coordinator.raft.messages import Config as RaftConfig
        from lepton.coordinator.raft.node import RaftConsensus

        return RaftConsensus(
            me,
            # --join-as-voter: no bootstrap voters; the leader's log brings the voter set.
            {addr: addr for addr in config.peers},
            self.store,
            self.state,
            config=RaftConfig(
                heartbeat_interval=config.raft_heartbeat_s,
                election_timeout=config.election_timeout_s,
            ),
            snapshot_every=config.snapshot_every,
            tls=self.tls,
            peer_key=self._peer_key(config),
            contacts=config.join,
        )

    def _peer_key(self, config: AgentConfig) -> bytes | None:
        """The key that proves our Raft calls without TLS (`raft.peer_auth`); None with
        TLS (certificates prove them) unless a peer secret is given anyway. Raises
        FailedPrecondition for --auth without TLS and without a peer secret: a worker's node
        token would otherwise be enough to write the Raft log."""
        from lepton.common import cluster_secret
        from lepton.coordinator.raft.peer_auth import peer_key

        if config.peer_secret_file:
            return peer_key(cluster_secret.read(config.peer_secret_file, what="peer secret file"))
        if getattr(config, "auth", False) and self.tls is None:
            raise FailedPrecondition(
                "--auth without --tls-dir on a multi-voter cluster: give every voter the same "
                "--peer-secret-file (make it with lepton-ctl secret init --out FILE; workers must not have it)"
            )
        return None

    def _free_port(self, node_id: str) -> int:
        _, usage = self.liveness.last_seen(node_id)
        return usage.free_port if usage is not None else 0

    async def _propose(self, cmd):
        return await self.ctx.commit(cmd)

    def _term_of(self, index: int) -> int:
        """The term of the log entry at `index` (the snapshot's, when compacted)."""
        snap = self.store.snapshot()
        if snap is not None and snap.index == index:
            return snap.term
        try:
            return self.store.term_at(index)
        except Exception:  # noqa: BLE001 - compacted or not yet known: the current term
            return self.consensus.term()

    def add_to_server(self, server: grpc.aio.Server) -> list[str]:
        """Register the coordinator's services; returns their names (for reflection)."""
        add_to_server(self.service, server)
        names = ["lepton.v1.Coordinator"]
        from lepton.coordinator.api.dataset_api import DatasetService
        from lepton.coordinator.api.dataset_api import add_to_server as add_datasets

        names.append(add_datasets(DatasetService(self.ctx, self.agent_pool, self.reconciler), server))
        from lepton.coordinator.api.security_api import SecurityService
        from lepton.coordinator.api.security_api import add_to_server as add_security

        names.append(add_security(SecurityService(self.ctx, self._term_of), server))
        from lepton.coordinator.api.serving_api import DeploymentService
        from lepton.coordinator.api.serving_api import add_to_server as add_deployments

        names.append(add_deployments(DeploymentService(self.ctx, self.serving, self.endpoints), server))
        if self.ctx.state_backend == "raft":  # etcd candidates speak no Raft: nothing new to reach
            from lepton.coordinator.raft.transport import add_raft_servicer

            add_raft_servicer(server, self.consensus, tls=self.tls, peer_key=self.consensus.peer_key)
            names.append("lepton.v1.Raft")
        return names

    async def start(self) -> None:
        await self.consensus.start()
        self._tasks = [
            asyncio.create_task(self.liveness.run(), name="liveness"),
            asyncio.create_task(self.scheduling.run(), name="scheduling"),
            asyncio.create_task(self.replication.run(), name="replication"),
            asyncio.create_task(self.reconciler.run(), name="reconcile"),
            asyncio.create_task(self.audit.run(), name="audit"),
            asyncio.create_task(self.gc.run(), name="gc"),
            asyncio.create_task(self.serving.run(), name="serving"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.agent_pool.close()
        await self.consensus.stop()
