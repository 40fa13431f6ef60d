"""`lepton-agent`: one per machine. Serves gRPC, reports capacity, and if it is a voter,
runs the coordinator in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from lepton.agent import shard_scratch
from lepton.agent.fingerprint import Fingerprinter
from lepton.agent.heartbeat import USAGE_SAMPLE_S, CachedSample, Heartbeater
from lepton.agent.identity import load_or_create_node_id, lock_data_dir, secure_data_dir
from lepton.agent.tasks.task_user import SEARCH_ONLY, TaskUser
from lepton.common.channels import TlsConfig, node_tls
from lepton.common.config import AgentConfig
from lepton.common.durable import write_atomic
from lepton.common.errors import InvalidArgument, Unavailable
from lepton.common.grpc_util import SERVER_OPTIONS, register_service
from lepton.common.logs import set_node_context
from lepton.common.sockets import bind_tcp
from lepton.common.validation import join_host_port, split_host_port
from lepton.common.version import VERSION
from lepton.v1 import agent_pb2, coordinator_pb2

logger = logging.getLogger(__name__)


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (a job's rank 0 may host its store there); 0 when
    none can be bound there."""
    try:
        with bind_tcp(host, 0) as s:
            return s.getsockname()[1]
    except OSError:
        return 0


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fixed = secure_data_dir(self.data_dir)  # refuses one others can write
        if fixed:
            logger.warning("data dir %s: made %d files and folders private (no group or other access)",
                           self.data_dir, fixed)
        self.task_user = TaskUser.resolve(config.task_user) if config.task_user else None
        if self.task_user is None and os.geteuid() == 0:
            logger.warning("tasks run as root (--task-user none): they can read this node's keys, tokens "
                           "and data dir; leave --task-user unset (nobody) or name a user to keep them out")
        if self.task_user is not None:
            self.task_user.check_reachable(self.data_dir)
            os.chmod(self.data_dir, SEARCH_ONLY)  # the task user passes through to its own folder
        self._lock_fd = lock_data_dir(self.data_dir)
        self.node_id = load_or_create_node_id(self.data_dir)
        self.name = config.name or self.node_id
        self.address = config.advertise_address  # fixed up after bind when the port is 0
        self.server: grpc.aio.Server | None = None
        self.tls: TlsConfig | None = None  # set in start() when --tls-dir is given
        self.coordinator = None
        self.link = None  # CoordinatorLink: every call to the leader (set in start())
        self.heartbeater: Heartbeater | None = None
        self.runner = None
        self._scratch_removals: set[asyncio.Future] = set()  # shard scratch folders being removed
        self._torch_attempts: set[tuple[str, int]] = set()  # live attempts of torch jobs (their scratch)
        self.assignments = None
        self.data = None  # DataNode: shard store, side channel, Shards service
        self.router = None  # PredictRouter: the Inference service (set in start())
        self.serving = None  # ReplicaSupervisor: this node's replicas (set in start())
        self.http = None  # HttpEndpoint, with --serve-http-listen
        self.auth = None  # AuthInterceptor, with --auth
        self.fingerprint = Fingerprinter(
            str(self.data_dir),
            cpus=config.cpus,
            memory_bytes=config.memory_bytes,
            fake_gpus=config.fake_gpus,
        )
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._stopped = asyncio.Event()
        self.failed = asyncio.Event()  # set when the log store failed: run_agent exits
        self.failure: Exception | None = None
        self.refusal: Exception | None = None  # the leader refuses this node for good: exit with it
        self._tasks: list[asyncio.Task[None]] = []
        # Metrics only when served: an agent without /metrics (the default) neither imports
        # prometheus_client (~3 MB of its idle RSS) nor feeds the hooks. One registry per
        # agent (not prometheus_client's global one), so agents started in one process in
        # tests never share or collide on metric names.
        self.metrics_registry = None
        self.agent_metrics = None
        if serves_metrics(config.metrics_listen):
            from prometheus_client import CollectorRegistry

            from lepton.agent.metrics import AgentMetrics

            self.metrics_registry = CollectorRegistry()
            self.agent_metrics = AgentMetrics(self.metrics_registry)
        self.metrics_server = None  # MetricsServer while serving /metrics
        self.coordinator_metrics = None  # CoordinatorMetrics on a voter (auth hooks may feed it)

    @property
    def is_voter(self) -> bool:
        """Runs a coordinator and Raft node: a bootstrap voter, or one waiting to be added;
        or, with --state etcd, a coordinator candidate."""
        return (self.config.dev_mode or self.address in self.config.peers or self.config.join_as_voter
                or self.config.uses_etcd)

    def _check_topology(self) -> None:
        peers = self.config.peers
        if len(peers) == 1 and self.address not in peers:
            return  # a worker pointed at a one-voter cluster
        if len(set(peers)) != len(peers):
            raise InvalidArgument(f"--peers lists an address twice: {','.join(peers)}")

    def _usage(self):
        usage = self.fingerprint.usage()
        usage.free_port = free_port(split_host_port(self.address)[0])
        return usage

    def _registration(self) -> coordinator_pb2.RegisterNodeRequest:
        return coordinator_pb2.RegisterNodeRequest(
            node_id=self.node_id,
            name=self.name,
            address=self.address,
            labels=self.config.labels,
            capacity=self.fingerprint.capacity(),
            voter=self.is_voter,
            version=VERSION,
            state_backend="etcd" if self.config.uses_etcd else "raft",
        )

    def _setup_tls(self) -> TlsConfig | None:
        """This node's certificate (issued from the CA when it has none), or None: no TLS."""
        if not self.config.tls_dir:
            return None
        hosts = [split_host_port(self.address)[0]]
        listen_host = split_host_port(self.config.listen)[0]
        if listen_host not in ("0.0.0.0", "::"):
            hosts.append(listen_host)
        return node_tls(self.config.tls_dir, self.node_id, hosts)

    async def start(self) -> None:
        self.tls = self._setup_tls()
        if self.tls is not None:  # what tasks connect with: never this node's key
            from lepton.agent.task_identity import prepare_task_tls

            task_user = self.task_user
            prepare_task_tls(self.tls, self.data_dir,
                             owner=(task_user.uid, task_user.gid) if task_user is not None else None)
        interceptors = []
        if self.config.auth:  # every call authenticated and checked (lepton.agent.auth_setup)
            from lepton.agent.auth_setup import server_interceptor

            self.auth = server_interceptor(self)  # HTTP predictions are checked by it too
            interceptors.append(self.auth)
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        listen = self.config.listen
        check_bindable(listen, "--listen")  # gRPC's own error names neither cause nor flag
        try:
            if self.tls is None:
                port = self.server.add_insecure_port(listen)
            else:  # clients must present a certificate of the cluster CA
                port = self.server.add_secure_port(listen, self.tls.server_credentials())
        except RuntimeError:  # taken between the check and here
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {listen}; choose another address with --listen (LEPTON_LISTEN)")
        self.address = join_host_port(split_host_port(self.address)[0], port)
        self._check_topology()
        role = "voter" if self.is_voter else "worker"
        set_node_context(self.name, role)
        logger.info("effective config: %s", json.dumps(self.config.as_dict(), sort_keys=True))
        logger.info("node id %s, advertising %s as a %s", self.node_id, self.address, role)

        services = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
        # Through register_service, so a malformed request is INVALID_ARGUMENT, not UNKNOWN.
        register_service(self.server, self._health, health_pb2.DESCRIPTOR.services_by_name["Health"])
        if self.is_voter:
            from lepton.coordinator.coordinator import Coordinator

            self.config.advertise = self.address  # the real port, when --listen said 0
            self.coordinator = Coordinator(self.config, self.node_id, tls=self.tls)
            self.coordinator.consensus.add_failure_listener(self._storage_failed)
            services += self.coordinator.add_to_server(self.server)
        from lepton.agent.assignments import AssignmentLoop
        from lepton.agent.link import CoordinatorLink
        from lepton.agent.service import AgentService
        from lepton.agent.service import add_to_server as add_agent_service
        from lepton.agent.tasks.runner import SWEEP_S, TaskRunner

        targets = self.config.peers or self.config.join or [self.address]
        # One link for the heartbeat, the task loop and the data node: one view of the leader.
        self.link = CoordinatorLink(targets, tls=self.tls)
        self.assignments = AssignmentLoop(self.node_id, self.link, str(self.data_dir), tls=self.tls,
                                          shard_key_file=self.config.shard_key_file,
                                          log_max_bytes=self.config.task_log_max_bytes,
                                          node_store=self.task_user is None)
        # Sweep at least as often as the retention (a short one is for tests and small disks).
        from lepton.agent.tasks.lease import AttemptLease

        # Renewed by every answer from the leader; attempts kill themselves once it runs out.
        self.attempt_lease = AttemptLease(self.data_dir, background=True)
        self.runner = TaskRunner(self.data_dir, self._on_task_event, acknowledged_by_caller=True,
                                 lease_path=self.attempt_lease.path if self.attempt_lease.enabled else None,
                                 log_max_bytes=self.config.task_log_max_bytes,
                                 retention_s=self.config.task_retention_s,
                                 sweep_s=min(SWEEP_S, max(1.0, self.config.task_retention_s)),
                                 task_user=self.task_user, task_path=self.config.task_path)
        self.assignments.attach(self.runner)
        self.runner.started_listeners.append(self._track_torch_attempt)
        await self.runner.start()
        # Decrypted shards of attempts that ended while no agent watched (before any new one starts).
        leftovers = shard_scratch.stale(self.data_dir, [(r.task_id, r.attempt) for r in self.runner.running()])
        if leftovers:
            logger.info("removing %d shard scratch folder(s) of ended attempts", len(leftovers))
            self._track_removal(asyncio.get_running_loop().run_in_executor(None, shard_scratch.remove, leftovers))
        add_agent_service(AgentService(self.runner), self.server)
        services.append(agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name)
        from lepton.agent.predict_router import PredictRouter
        from lepton.agent.predict_router import add_to_server as add_inference

        # Predict for every deployment, forwarded to a ready replica (docs/serving.md).
        self.router = PredictRouter(self.node_id, link=self.link, local_channel=self._replica_channel,
                                    local_frames=self._replica_frames)
        services.append(add_inference(self.router, self.server))
        from lepton.agent.serving import ReplicaSupervisor

        # This node's replicas: health checks, reports to the leader (agent/serving.py).
        self.serving = ReplicaSupervisor(self.node_id, self.link, self.runner, task_user=self.task_user,
                                         stats=self.router.stats, outstanding=self.router.outstanding)
        from lepton.agent.data_node import DataNode

        self.data = DataNode(
            self.data_dir, self.node_id, self.config.listen, self.link,
            on_bytes=self.agent_metrics.shard_bytes if self.agent_metrics is not None else None,
            tls=self.tls, shard_key_file=self.config.shard_key_file,
            inventory_interval_s=self.config.shard_inventory_interval_s,
            orphan_grace_s=self.config.shard_orphan_grace_s, reserve_bytes=self.config.shard_reserve_bytes,
        )
        services.append(self.data.add_to_server(self.server))
        register_service(
            self.server,
            reflection.aio.ReflectionServicer(services),
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        )
        self._start_metrics()
        await self.server.start()
        await self._start_http()
        if self.coordinator is not None:
            await self.coordinator.start()  # after the server: Raft peers must reach us
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

        self.heartbeater = Heartbeater(
            self.link,
            self._registration,
            CachedSample(self._usage, USAGE_SAMPLE_S),
            interval_s=self.config.heartbeat_interval_s,
            on_term=lambda _term: self._leader_answered(),
            on_registered=self._registered,
            on_refused=self._refused,
            # While our own coordinator leads, beat into it directly.
            local=self.coordinator.service.beat if self.coordinator is not None else None,
            local_address=self.address,
        )
        self._tasks.append(asyncio.create_task(self.heartbeater.run(), name="heartbeat"))
        self._tasks.append(asyncio.create_task(self.assignments.watch(), name="assignments"))
        self._tasks.append(asyncio.create_task(self.assignments.report(), name="task-reports"))
        self._tasks.append(asyncio.create_task(self.data.inventory.run(), name="shard-inventory"))
        self._tasks.append(asyncio.create_task(self.router.watch(), name="endpoints"))
        self._tasks.append(asyncio.create_task(self.serving.run(), name="replicas"))
        self._write_runtime_file()

    async def _start_http(self) -> None:
        """HTTP/JSON predictions on --serve-http-listen (agent/http_endpoint.py), if asked."""
        listen = self.config.serve_http_listen
        if not listen:
            return
        check_bindable(listen, "--serve-http-listen")
        from lepton.agent.http_endpoint import HttpEndpoint

        host, port = split_host_port(listen)
        ssl_context = self.tls.server_ssl_context() if self.tls is not None else None
        self.http = HttpEndpoint(self.router, host, port, auth=self.auth, ssl_context=ssl_context)
        await self.http.start()

    def _replica_channel(self, task_id: str):
        """The channel to a replica running here (agent/serving.py), or None."""
        return self.serving.local_channel(task_id) if self.serving is not None else None

    def _replica_frames(self, task_id: str):
        """A replica's frames socket here (the router's cheaper way in), or None."""
        return self.serving.local_frames(task_id) if self.serving is not None else None

    def _track_torch_attempt(self, spec) -> None:
        if spec.job_dir:  # a torch job's member: it may decrypt shards into memory
            self._torch_attempts.add((spec.task_id, spec.attempt))

    def _on_task_event(self, event) -> None:
        """The runner's events go to the leader; a torch attempt's end also removes the
        decrypted shards it may have left in memory, killed before its own cleanup ran
        (agent/shard_scratch.py)."""
        key = (event.task_id, event.attempt)
        if event.kind == "exited" and key in self._torch_attempts:
            self._torch_attempts.discard(key)
            self._track_removal(asyncio.get_running_loop().run_in_executor(
                None, shard_scratch.remove_attempt, self.data_dir, *key))
        self.assignments.on_event(event)

    def _track_removal(self, removal: asyncio.Future) -> None:
        self._scratch_removals.add(removal)  # held until done (the loop keeps only weak references)
        removal.add_done_callback(self._scratch_removals.discard)

    def _leader_answered(self) -> None:
        """The leader answered (a heartbeat, a registration): the attempts may run on for
        the lease, sized for the interval it hands out (common/failover.py)."""
        from lepton.common.failover import attempt_lease_s

        heartbeater = self.heartbeater
        interval = heartbeater.interval_s if heartbeater is not None else self.config.heartbeat_interval_s
        self.attempt_lease.renew(attempt_lease_s(interval))

    def _registered(self) -> None:
        self._leader_answered()
        self.data.inventory.wake()  # a returning node's blobs get re-listed

    def _start_metrics(self) -> None:
        """Wire the metric hooks and serve /metrics on `metrics_listen` (empty or port 0:
        not served). A port that cannot be bound is a warning: metrics are not worth a
        dead agent."""
        if self.agent_metrics is None:
            return
        from lepton.agent.metrics import CoordinatorMetrics, start_metrics_server

        runner = self.runner
        self.agent_metrics.track_running(lambda: len(runner.running()))
        from lepton.agent.metrics import ServingCollector

        self.metrics_registry.register(ServingCollector(self.router))  # Predict, per deployment
        # The heartbeater starts after the metrics server; look it up at scrape time.
        self.agent_metrics.track_heartbeat_lag(
            lambda: self.heartbeater.answer_age_s() if self.heartbeater is not None else float("nan"))
        self.agent_metrics.track_heartbeat_interval(
            lambda: self.heartbeater.interval_s if self.heartbeater is not None else float("nan"))
        c = self.coordinator
        if c is not None:
            metrics = CoordinatorMetrics(self.metrics_registry)
            # Scrapes come from the HTTP server's thread; the state belongs to this loop.
            metrics.attach(state=c.state, consensus=c.consensus, liveness=c.liveness,
                           scheduling=c.scheduling, heartbeat_interval_s=self.config.heartbeat_interval_s,
                           loop=asyncio.get_running_loop())
            c.state.tasks.listeners.append(metrics.on_task_change)
            c.liveness.on_heartbeat = metrics.observe_heartbeat
            c.scheduling.on_cycle = metrics.scheduling_cycle.observe
            c.ctx.admission.on_shed = metrics.submissions_shed.inc
            c.ctx.hub.on_sent = metrics.on_assignments_sent
            self.coordinator_metrics = metrics
        host, port = split_host_port(self.config.metrics_listen)
        try:
            self.metrics_server = start_metrics_server(host, port, self.metrics_registry,
                                                       **self._metrics_tls())
        except OSError as err:
            logger.warning("metrics: cannot serve on %s (%s); running without /metrics "
                           "(choose another address with --metrics-listen)",
                           self.config.metrics_listen, err.strerror or err)

    def _metrics_tls(self) -> dict[str, str]:
        """With --tls-dir, /metrics is HTTPS with this node's certificate, and scrapers must
        present a client certificate of the cluster CA (like every gRPC client)."""
        if self.tls is None:
            return {}
        d = Path(self.tls.dir)
        return {"certfile": str(d / f"{self.tls.name}.crt"), "keyfile": str(d / f"{self.tls.name}.key"),
                "client_cafile": str(d / "ca.crt")}

    def _storage_failed(self, err: Exception) -> None:
        """The log store failed (consensus stopped for good): stop looking alive at once,
        then `run_agent` exits (crash-stop; systemd restarts the agent, which re-reads
        the log). No graceful leave: the node's tasks keep running for the restart."""
        logger.critical("log store failed (%s): this voter no longer votes; NOT_SERVING, exiting", err)
        self.failure = err
        if self.agent_metrics is not None:
            self.agent_metrics.storage_failed.set(1)
        for task in self._tasks:
            if task.get_name() == "heartbeat":
                task.cancel()  # or the leader would go on seeing a ready node
        asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self.failed.set()

    def _refused(self, err: Exception) -> None:
        """The leader refuses this node until it is started with other flags (a Raft voter
        of an etcd cluster): exit with the reason rather than ask again forever."""
        logger.critical("registration refused: %s", err)
        self.refusal = err
        self.failed.set()

    async def _set_health(self, status) -> None:
        result = self._health.set("", status)
        if asyncio.iscoroutine(result):
            await result

    def _write_runtime_file(self) -> None:
        """agent.json: how tools (local up, tests) find this agent's real address."""
        doc = {"node_id": self.node_id, "name": self.name, "address": self.address, "pid": os.getpid()}
        if self.metrics_server is not None:
            doc["metrics"] = self.metrics_server.url
        if self.http is not None:
            doc["http"] = self.http.url
        write_atomic(self.data_dir / "agent.json", json.dumps(doc).encode())

    async def _stop_tasks(self) -> None:
        """A graceful stop leaves the cluster, which requeues this node's tasks elsewhere:
        so stop them here first, or they would run twice. (A crash leaves them running;
        the restarted agent re-adopts them.)"""
        running = self.runner.running() if self.runner is not None else []
        if not running:
            return
        from lepton.agent.assignments import AGENT_STOPPING

        if self.heartbeater is not None:
            await self.heartbeater.drain()  # or the leader would place them right back here
        logger.info("stopping %d tasks before leaving", len(running))
        for r in running:
            self.runner.cancel(r.task_id, r.attempt, reason=AGENT_STOPPING)  # requeued, not failed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace_s + 10
        while self.runner.running() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # give the exit reports a moment to reach the leader

    async def stop(self, *, leave: bool = True) -> None:
        """Graceful: leave the cluster (state LEFT, not DOWN), drain RPCs, stop the coordinator.
        `leave=False` (crash-stop): tasks keep running and the node is not marked LEFT."""
        logger.info("stopping")
        if leave:
            await self._stop_tasks()
        if leave and self.heartbeater is not None:
            left = await self.heartbeater.leave()
            logger.info("left the cluster" if left else "could not tell the coordinator we left")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            await self.server.stop(self.config.shutdown_grace_s)
        if self.coordinator is not None:
            await self.coordinator.stop()
        if self.heartbeater is not None:
            self.heartbeater.close()
        if self.runner is not None:
            await self.runner.stop()
        if self.assignments is not None:
            await self.assignments.close()  # code fetches in flight
        if self.data is not None:
            await self.data.close()
        if self.serving is not None:
            await self.serving.close()
        if self.http is not None:
            await self.http.close()
        if self.link is not None:
            await self.link.close()
        if self.metrics_server is not None:
            # In a thread: shutdown() waits out the HTTP server's poll interval (0.5 s).
            await asyncio.to_thread(self.metrics_server.close)
            self.metrics_server = None
        self.fingerprint.close()
        try:
            (self.data_dir / "agent.json").unlink()
        except FileNotFoundError:
            pass
        self._stopped.set()


STOP_SLACK_S = 20.0  # a graceful stop's bound beyond twice the shutdown grace (run_agent)


async def run_agent(config: AgentConfig) -> None:
    os.umask(0o077)  # every file and folder the agent (and its tasks) make: private
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    from lepton.agent.wakeups import install_dump

    install_dump(loop, agent.data_dir)  # LEPTON_COUNT_WAKEUPS=1 only
    await agent.start()
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(agent.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    if agent.refusal is not None:
        await agent.stop(leave=False)
        raise agent.refusal
    if agent.failure is None:
        # Bounded: a step that never ends must not keep a stopped node's process around for
        # ever (a supervisor's SIGKILL would then be the only way out, with no word of why).
        # The bound covers what the steps may take when none is stuck: stopping the tasks
        # (grace + 10 s), leaving (3 s), draining RPCs (grace), closing the parts.
        limit = 2 * config.shutdown_grace_s + STOP_SLACK_S
        try:
            await asyncio.wait_for(asyncio.shield(agent.stop()), limit)
        except TimeoutError:
            _exit_stuck(f"stopping took over {limit:g}s; still running: {_pending_tasks()}")
        return
    try:  # bounded: a sick disk must not keep a node that cannot vote alive
        await asyncio.wait_for(agent.stop(leave=False), config.shutdown_grace_s + 10)
    except Exception:  # noqa: BLE001 - exiting anyway; the line below says why
        logger.exception("crash-stop: stopping cleanly failed")
    raise Unavailable(f"the Raft log store in {agent.data_dir / 'raft'} failed ({agent.failure}); "
                      "stopped without leaving the cluster. Fix the disk (free space), then restart: "
                      "the log is re-read and this voter catches up")


def serves_metrics(metrics_listen: str) -> bool:
    """Whether --metrics-listen asks for /metrics (empty or port 0: not served)."""
    return bool(metrics_listen) and split_host_port(metrics_listen)[1] != 0


def check_bindable(address: str, flag: str) -> None:
    """Raise OSError naming `address`, the reason and `flag` when it cannot be bound now."""
    host, port = split_host_port(address, flag)
    if port == 0:
        return
    try:
        bind_tcp(host, port).close()
    except OSError as err:
        raise OSError(f"cannot listen on {address}: {err.strerror or err}; "
                      f"choose another address with {flag}") from None


def _pending_tasks() -> str:
    """The event loop's unfinished tasks, each with where it waits: what a stuck stop names."""
    parts = []
    for task in asyncio.all_tasks():
        if task is asyncio.current_task() or task.done():
            continue
        frames = task.get_stack(limit=1)
        where = f" at {frames[0].f_code.co_name} ({Path(frames[0].f_code.co_filename).name}:{frames[0].f_lineno})" if frames else ""
        parts.append(f"{task.get_name()}{where}")
    return ", ".join(sorted(parts)) or "nothing (a thread?)"


def _exit_stuck(message: str) -> None:
    """Log why, say it in one line, and end the process now: asyncio.run's own clean-up
    would wait on the same stuck task or worker thread."""
    logger.error("%s", message)
    logging.shutdown()  # flushes the log
    os.write(2, f"lepton-agent: {message}\n".encode())
    os._exit(1)
