"""Prometheus metrics: one registry per process, served on `/metrics` when `--metrics-listen` asks.

Two kinds of metric live here:

- read at scrape time by `ClusterCollector` from objects handed to it (the state machine,
  consensus, liveness, the scheduling loop): nodes and tasks by state, queue depth, Raft
  term/commit/applied index, heartbeat age. Nothing is imported from the agent; the objects
  are duck-typed (see each `_sample_*`). When `loop` is given, the read runs on that event
  loop (the HTTP server answers from its own thread, and the state is the loop's).
- fed by hooks the code calls (`CoordinatorMetrics.on_task_change`, `observe_heartbeat`,
  `AgentMetrics.shard_bytes`, ...): scheduling latency, heartbeat intervals and lag, shard
  bytes and transfers, auth refusals.

Every voter exports its own view; `lepton_raft_is_leader == 1` picks the leader's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from lepton.common.validation import join_host_port

logger = logging.getLogger(__name__)

# A scrape must not hang on a busy loop; a stale-free partial answer beats none.
SAMPLE_TIMEOUT_S = 2.0
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
HEARTBEAT_BUCKETS = (0.25, 0.5, 1, 1.5, 2, 3, 5, 10, 30)


def _names_by_proto(states: Any) -> dict[int, str]:
    """{proto value: name}, in proto order (the order the samples come out in)."""
    return {s.proto: s.value for s in sorted(states, key=lambda s: s.proto)}


def _node_states() -> dict[int, str]:
    from lepton.common.states import NodeState

    return _names_by_proto(NodeState)


def _task_states() -> dict[int, str]:
    from lepton.common.states import TaskState

    return _names_by_proto(TaskState)


class ClusterCollector:
    """Gauges read from the coordinator's objects at scrape time. Any source may be None
    (a worker has no state machine); a failing source is logged and skipped, not fatal."""

    def __init__(
        self,
        *,
        state: Any = None,
        consensus: Any = None,
        liveness: Any = None,
        scheduling: Any = None,
        heartbeat_interval_s: float = 1.0,
        loop: asyncio.AbstractEventLoop | None = None,
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ):
        self._state = state
        self._consensus = consensus
        self._liveness = liveness
        self._scheduling = scheduling
        self._interval_s = heartbeat_interval_s
        self._loop = loop
        self._wall_ms = wall_ms
        self._node_names = _node_states()
        self._task_names = _task_states()

    def describe(self) -> list[Metric]:
        return []  # no sampling at registration (the sources may not be ready yet)

    def collect(self) -> Iterator[Metric]:
        yield from self._on_loop(self._sample)

    def _on_loop(self, fn: Callable[[], list[Metric]]) -> list[Metric]:
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return fn()
        fut: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as err:  # noqa: BLE001 - handed to the scrape thread
                fut.set_exception(err)

        loop.call_soon_threadsafe(run)
        try:
            return fut.result(timeout=SAMPLE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            logger.warning("metrics: the event loop did not answer within %.1fs", SAMPLE_TIMEOUT_S)
            return []

    def _sample(self) -> list[Metric]:
        out: list[Metric] = []
        for part in (self._sample_nodes, self._sample_tasks, self._sample_raft, self._sample_heartbeats):
            try:
                out += part()
            except Exception:  # noqa: BLE001 - one broken source must not fail the scrape
                logger.exception("metrics: %s failed", part.__name__)
        return out

    def _sample_nodes(self) -> list[Metric]:
        """Needs `state.nodes`: dict of common_pb2.Node."""
        if self._state is None:
            return []
        g = GaugeMetricFamily("lepton_nodes", "Nodes in the cluster state, by state", labels=["state"])
        counts = dict.fromkeys(self._node_names.values(), 0)
        draining = 0
        for node in list(self._state.nodes.values()):
            name = self._node_names.get(node.state, "unspecified")
            counts[name] = counts.get(name, 0) + 1
            draining += bool(node.draining)
        for name, n in sorted(counts.items()):
            g.add_metric([name], n)
        d = GaugeMetricFamily("lepton_nodes_draining", "Nodes marked draining")
        d.add_metric([], draining)
        return [g, d]

    def _sample_tasks(self) -> list[Metric]:
        """Needs `state.tasks.tasks`: dict of tasks_pb2.Task; `scheduling.reasons` optional."""
        table = getattr(self._state, "tasks", None)
        if table is None:
            return []
        g = GaugeMetricFamily("lepton_tasks", "Tasks in the cluster state, by state", labels=["state"])
        counts = dict.fromkeys(self._task_names.values(), 0)
        for task in list(table.tasks.values()):
            name = self._task_names.get(task.state, "unspecified")
            counts[name] = counts.get(name, 0) + 1
        for name, n in sorted(counts.items()):
            g.add_metric([name], n)
        q = GaugeMetricFamily("lepton_scheduling_queue_depth", "Tasks waiting to be placed (pending)")
        q.add_metric([], counts.get("pending", 0))
        out = [g, q]
        reasons = getattr(self._scheduling, "reasons", None)
        if reasons is not None:
            u = GaugeMetricFamily("lepton_scheduling_unschedulable",
                                  "Pending tasks that never fit on any node, as of the last cycle")
            u.add_metric([], sum(1 for r in list(reasons.values()) if str(r).startswith("unschedulable")))
            out.append(u)
        return out

    def _sample_raft(self) -> list[Metric]:
        """Needs `consensus.status()` (ConsensusStatus) and `consensus.is_leader()`."""
        if self._consensus is None:
            return []
        st = self._consensus.status()
        out = []
        for name, doc, value in (
            ("lepton_raft_term", "Current Raft term", st.term),
            ("lepton_raft_commit_index", "Highest log index known committed", st.commit_index),
            ("lepton_raft_applied_index", "Highest log index applied to the state machine", st.applied_index),
            ("lepton_raft_is_leader", "1 on the leader, 0 elsewhere", int(bool(self._consensus.is_leader()))),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            out.append(g)
        lag = GaugeMetricFamily("lepton_raft_voter_lag", "Entries a voter is behind the leader", labels=["voter"])
        for v in st.voters:
            lag.add_metric([v.address or v.id], v.lag)
        out.append(lag)
        check = getattr(self._consensus, "peer_check", None)  # Raft's PeerCheck, when served
        if check is not None:
            refused = CounterMetricFamily("lepton_raft_peer_refused",
                                          "Raft calls refused: not from a member speaking as itself")
            refused.add_metric([], check.refused)
            out.append(refused)
        return out

    def _sample_heartbeats(self) -> list[Metric]:
        """Needs `liveness.last_seen(node_id) -> (wall_ms, usage | None)` and `state.nodes`."""
        if self._liveness is None or self._state is None:
            return []
        now = self._wall_ms()
        ready_like = {k for k, v in self._node_names.items() if v in ("ready", "suspect")}
        ages = []
        for node in list(self._state.nodes.values()):
            if node.state not in ready_like:
                continue
            seen_ms, usage = self._liveness.last_seen(node.id)
            if usage is not None and seen_ms:
                ages.append(max(0.0, (now - seen_ms) / 1000))
        m = GaugeMetricFamily("lepton_heartbeat_age_max_seconds",
                              "Longest time since a live node's last heartbeat (leader only)")
        m.add_metric([], max(ages, default=0.0))
        # The interval agents are told now: the heartbeat budget stretches it in a large cluster.
        interval_s = getattr(self._liveness, "interval_ms", 0) / 1000 or self._interval_s
        late = GaugeMetricFamily("lepton_heartbeat_late_nodes",
                                 "Live nodes silent for more than two heartbeat intervals")
        late.add_metric([], sum(1 for a in ages if a > 2 * interval_s))
        assigned = GaugeMetricFamily("lepton_heartbeat_interval_assigned_seconds",
                                     "The heartbeat interval this voter hands agents (its budget's)")
        assigned.add_metric([], interval_s)
        return [m, late, assigned]


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class CoordinatorMetrics:
    """A voter's metrics. `attach(...)` registers the scrape-time collector; the hooks
    below are called by the code (wire them where noted)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.scheduling_latency = Histogram(
            "lepton_scheduling_latency_seconds",
            "From submission (or requeue) to assignment",
            buckets=LATENCY_BUCKETS, registry=r)
        self.scheduling_cycle = Histogram(
            "lepton_scheduling_cycle_seconds", "Duration of one scheduling cycle",
            buckets=LATENCY_BUCKETS, registry=r)
        self.heartbeat_interval = Histogram(
            "lepton_heartbeat_interval_seconds",
            "Time between consecutive heartbeats of one node, as the leader sees them",
            buckets=HEARTBEAT_BUCKETS, registry=r)
        self.submissions_shed = Counter(
            "lepton_submissions_shed",
            "User submissions the leader shed (admission: RESOURCE_EXHAUSTED with a retry hint)",
            registry=r)
        self.assignment_sets_sent = Counter(
            "lepton_assignment_sets_sent",
            "Assignment messages the leader sent agents: whole sets (each chunk) and deltas",
            ["kind"], registry=r)
        self.assignments_sent = Counter(
            "lepton_assignments_sent", "Assignments and removals those messages carried", registry=r)
        self._collector: ClusterCollector | None = None

    def attach(self, **sources: Any) -> ClusterCollector:
        """Register a ClusterCollector over `sources` (see its arguments). Once only."""
        if self._collector is not None:
            raise RuntimeError("CoordinatorMetrics.attach called twice")
        self._collector = ClusterCollector(**sources)
        self.registry.register(self._collector)
        return self._collector

    def on_task_change(self, task: Any, old_node: str) -> None:
        """A `TaskTable.listeners` hook: observes scheduling latency on each assignment."""
        from lepton.v1 import tasks_pb2

        if task.state != tasks_pb2.TASK_STATE_ASSIGNED or old_node or not task.assigned_at_ms:
            return
        since = task.created_at_ms
        if task.history:  # a requeued attempt waits from when the previous one ended
            since = max(since, task.history[-1].finished_at_ms)
        if since:
            self.scheduling_latency.observe(max(0.0, (task.assigned_at_ms - since) / 1000))

    def on_assignments_sent(self, kind: str, messages: int, entries: int) -> None:
        """`TaskHub.on_sent`: a stream sent `messages` of `kind` ("whole" or "delta")."""
        self.assignment_sets_sent.labels(kind).inc(messages)
        self.assignments_sent.inc(entries)

    def observe_heartbeat(self, node_id: str, interval_s: float | None) -> None:
        """`Liveness.on_heartbeat`: `interval_s` since the node's previous beat, None for its
        first this leadership. Liveness keeps the last beats (and drops them when leadership
        changes), so nothing here grows with the nodes ever seen."""
        if interval_s is not None:
            self.heartbeat_interval.observe(max(0.0, interval_s))

class AgentMetrics:
    """An agent's own metrics (every node): shard traffic, heartbeat lag, tasks, auth."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.shard_bytes_total = Counter(
            "lepton_shard_bytes", "Shard bytes moved by this node", ["direction"], registry=r)
        self.shard_transfers = Counter(
            "lepton_shard_transfers", "Shard transfers by outcome", ["direction", "result"], registry=r)
        # The leader answers every other beat on one stream, not each one: so the lag since
        # its last answer, not a per-beat round trip (which the stream cannot pair up).
        self.heartbeat_lag = Gauge(
            "lepton_agent_heartbeat_lag_seconds",
            "Seconds since the leader last answered this agent's heartbeats (NaN: never)", registry=r)
        self.heartbeat_interval = Gauge(
            "lepton_agent_heartbeat_interval_seconds",
            "The heartbeat interval this agent uses (the leader's, stretched by its budget)", registry=r)
        self.auth_refused = Counter(
            "lepton_auth_refused", "Calls refused by this node's auth interceptor", ["code"], registry=r)
        self.tasks_running = Gauge("lepton_agent_tasks_running", "Task attempts running here", registry=r)
        # Set just before a voter whose log store failed exits (crash-stop): alert on it, and
        # on the process restarting (its health is NOT_SERVING meanwhile).
        self.storage_failed = Gauge(
            "lepton_storage_failed", "1 once this voter's log store failed a write or fsync", registry=r)
        for direction in ("in", "out"):
            self.shard_bytes_total.labels(direction)  # present at 0 from the start

    def shard_bytes(self, direction: str, n: int) -> None:
        """`direction` is "in" (received/stored) or "out" (served). Raises ValueError otherwise."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {direction!r}")
        if n > 0:
            self.shard_bytes_total.labels(direction).inc(n)

    def transfer_done(self, direction: str, ok: bool) -> None:
        self.shard_transfers.labels(direction, "ok" if ok else "failed").inc()

    def track_running(self, count: Callable[[], int]) -> None:
        """Read the number of running tasks at scrape time (e.g. `lambda: len(runner.running())`)."""
        self.tasks_running.set_function(count)

    def track_heartbeat_lag(self, lag_s: Callable[[], float]) -> None:
        """Read the heartbeat lag at scrape time (`Heartbeater.answer_age_s`; any thread)."""
        self.heartbeat_lag.set_function(lag_s)

    def track_heartbeat_interval(self, interval_s: Callable[[], float]) -> None:
        """Read the heartbeat interval in use at scrape time (`Heartbeater.interval_s`)."""
        self.heartbeat_interval.set_function(interval_s)

    def on_auth_event(self, event: Any) -> None:
        """An AuthInterceptor `on_event` hook (chained with the audit one)."""
        if event.code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            self.auth_refused.labels(event.code.name).inc()


class ServingCollector:
    """The Predict router's counters per deployment (agent/predict_router.py), read at scrape
    time: requests, errors by code, latency and batch-rows histograms. The router counts
    requests its clients sent to this agent; a request forwarded here by another agent is
    counted there. `serve show` merges these across agents (coordinator/api/serving_stats)."""

    def __init__(self, router: Any):
        self._router = router

    def describe(self) -> list[Metric]:
        return []  # collected fresh each scrape; the deployments come and go

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import HistogramMetricFamily

        counters = dict(self._router.counters)  # one C-level copy: the loop may add meanwhile
        requests = CounterMetricFamily("lepton_serving_requests", "Predict requests this agent routed",
                                       labels=["deployment"])
        errors = CounterMetricFamily("lepton_serving_errors", "Predict requests that failed, by status code",
                                     labels=["deployment", "code"])
        latency = HistogramMetricFamily("lepton_serving_latency_seconds",
                                        "Predict latency of answered requests, routing and retries included",
                                        labels=["deployment"])
        batch = HistogramMetricFamily("lepton_serving_batch_rows",
                                      "Rows in the replica batch each answered request ran in",
                                      labels=["deployment"])
        from lepton.agent.predict_router import BATCH_ROWS_BUCKETS, LATENCY_BUCKETS_MS

        for name, c in sorted(counters.items()):
            requests.add_metric([name], c.requests)
            for code, n in sorted(dict(c.errors_by_code).items()):
                errors.add_metric([name, code], n)
            latency.add_metric([name], _le_buckets([b / 1000 for b in LATENCY_BUCKETS_MS], c.cumulative_buckets()),
                               c.latency_sum_ms / 1000)
            batch.add_metric([name], _le_buckets(BATCH_ROWS_BUCKETS, c.cumulative_batch_buckets()), c.batch_rows)
        yield from (requests, errors, latency, batch)


def _le_buckets(bounds: Any, cumulative: list[int]) -> list[tuple[str, int]]:
    return [("+Inf" if b == float("inf") else repr(float(b)), n) for b, n in zip(bounds, cumulative, strict=True)]


@dataclass
class MetricsServer:
    host: str
    port: int
    _httpd: Any
    _thread: threading.Thread
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{join_host_port(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(host: str, port: int,
                         registry: CollectorRegistry | None = None, *,
                         certfile: str | None = None, keyfile: str | None = None,
                         client_cafile: str | None = None) -> MetricsServer | None:
    """Serve `registry` on http://host:port/metrics from a daemon thread; port 0: off (None).

    With `certfile`/`keyfile` it serves HTTPS, and with `client_cafile` it demands a client
    certificate from that CA. Loopback by default: metrics name nodes and addresses.
    Raises OSError when the port cannot be bound.
    """
    if port == 0:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"metrics port {port} is out of range")
    from prometheus_client import start_http_server

    kwargs: dict[str, Any] = {}
    if certfile:
        kwargs.update(certfile=certfile, keyfile=keyfile, client_cafile=client_cafile,
                      client_auth_required=bool(client_cafile))
    httpd, thread = start_http_server(port, addr=host, registry=registry or CollectorRegistry(), **kwargs)
    logger.info("serving metrics on %s/metrics", join_host_port(host, port))
    return MetricsServer(host, port, httpd, thread, tls=bool(certfile))
