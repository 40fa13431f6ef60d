"""The agent's replicas: the attempts of deployments' replica tasks that run on this node.

Each replica (an attempt whose spec has `replica` set) serves on a unix socket in its own
folder (LEPTON_SERVE_SOCKET, agent/tasks/attempt_env.py). Here the agent:

- health-checks every local replica with the standard gRPC health service every CHECK_S:
  PENDING until its first SERVING (it is loading and warming up), then READY; a failed
  check (NOT_SERVING, no answer within CHECK_TIMEOUT_S, connection refused) makes a replica
  that was ready UNHEALTHY at once, out of rotation; after KILL_AFTER_S unhealthy its
  attempt is stopped (SIGKILL soon after SIGTERM: a hung process ignores the TERM), so its
  task fails and the serving loop starts another replica;
- reports the node's replicas (and the Predict router's counters) to the leader with
  `Deployments.ReportReplicas`: at once on a change and when the leader moves, else
  every REPORT_S;
- hands the Predict router a cached channel to a local replica (`local_channel`) and the
  replica's frames socket (`local_frames`, the cheaper way in for Predict: common/frames.py).

Replica attempts are found among the runner's running attempts by their run.json (read
once per attempt), so replicas re-adopted after an agent restart are supervised again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lepton.agent.replica_frames import FramesDialer
from lepton.agent.replica_peer import ImpostorReplica, PinnedSocket
from lepton.agent.tasks.attempt_env import serve_socket_path
from lepton.agent.tasks.task_spec import RunSpec
from lepton.common.durable import read_json, write_atomic
from lepton.common.errors import LeptonError
from lepton.common.frames import frames_path
from lepton.common.grpc_util import CHANNEL_OPTIONS
from lepton.v1 import serving_pb2, serving_pb2_grpc

logger = logging.getLogger(__name__)

CHECK_S = 0.5  # health checks of every local replica
CHECK_TIMEOUT_S = 1.0  # a replica that does not answer its check within this fails it
KILL_AFTER_S = 3.0  # unhealthy this long: the attempt is stopped, the serving loop replaces it
KILL_GRACE_S = 1.0  # SIGTERM -> SIGKILL for such an attempt
# Replicas serve only the caller whose key came first (their agent: workloads/serving/
# replica_key.py, the same literal; agents never import workloads).
REPLICA_KEY_METADATA = "lepton-replica-key"
REPLICA_KEY_FILE = "replica.key"
REPORT_S = 2.0  # reports to the leader at least this often (while there is anything to say)
SCAN_S = 1.0  # the runner's attempts looked through for new replicas
# With no replica here and nothing to report the loop sleeps until the runner starts a
# replica attempt (a listener wakes it); this is only the fallback.
IDLE_S = 30.0
REPORT_TIMEOUT_S = 5.0
UNHEALTHY_REASON = "replica failed its health checks"

PENDING, READY, UNHEALTHY = serving_pb2.REPLICA_PENDING, serving_pb2.REPLICA_READY, serving_pb2.REPLICA_UNHEALTHY


@dataclass
class LocalReplica:
    task_id: str
    attempt: int
    deployment: str
    generation: int
    socket: Path
    session: int = 0  # the attempt's pid: its session, which the listener must be in (replica_peer.py)
    state: int = PENDING
    ready_once: bool = False  # passed a check at least once: failures now mean unhealthy
    unhealthy_since: float | None = None
    stopping: bool = False
    key: str = field(default="", repr=False)  # presented on every call (workloads/serving/replica_key.py)
    channel: Any = None
    health: Any = field(default=None, repr=False)
    pinned: PinnedSocket | None = field(default=None, repr=False)
    frames: FramesDialer | None = field(default=None, repr=False)

    def frames_dialer(self) -> FramesDialer:
        """The Predict router's way in (the frames socket beside the gRPC one), made once."""
        if self.frames is None:
            self.frames = FramesDialer(frames_path(self.socket), key=self.key, session=self.session)
        return self.frames

    async def connect(self) -> bool:
        """The channel to the socket, made once its listener is checked to be of the attempt
        (agent/replica_peer.py) and pinned to that socket; False while the socket is not
        there or not listening yet. Raises ImpostorReplica."""
        if self.channel is not None:
            return True
        try:
            pinned = PinnedSocket(self.socket)
        except OSError:
            return False
        try:
            await pinned.verify(self.session, "its socket")
        except OSError:  # ImpostorReplica is not one
            pinned.close()
            return False
        except BaseException:
            pinned.close()
            raise
        self.pinned = pinned
        self.channel = grpc.aio.insecure_channel(pinned.target, options=CHANNEL_OPTIONS,
                                                 interceptors=[_PresentKey(self.key)] if self.key else None)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        return True

    async def unpin_if_replaced(self) -> None:
        """After a failed check: a socket file that is no longer the pinned one (bound anew,
        or by someone else) gets a new channel at the next check, checked again."""
        if self.pinned is not None and not self.pinned.still_at(self.socket):
            await self._close_channel(None)

    async def close(self, grace: float | None = None) -> None:
        if self.frames is not None:
            self.frames.close()  # calls in flight on it end UNAVAILABLE: the router retries
        await self._close_channel(grace)

    async def _close_channel(self, grace: float | None) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace)
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None


def attempt_key(att_dir: Path) -> str:
    """The key this node presents to the replica of the attempt in `att_dir`: made once,
    kept beside the attempt's records (root's only with a task user; the task works in
    att_dir/work), so a restarted agent presents the key its replica was claimed with.
    Raises OSError."""
    path = att_dir / REPLICA_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    key = secrets.token_hex(16)
    try:
        write_atomic(path, key.encode(), mode=0o600, exclusive=True)
    except FileExistsError:  # made meanwhile
        return path.read_text().strip()
    return key


class _PresentKey(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the attempt's key to every call on its replica's channel."""

    def __init__(self, key: str):
        self._pair = (REPLICA_KEY_METADATA, key)

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._pair)
        return await continuation(details._replace(metadata=metadata), request)


class ReplicaSupervisor:
    """See the module doc. `runner`: the TaskRunner (running(), log_path(), cancel());
    `stats()`: the router's RouterStats; `outstanding(task_id)`: its requests in flight
    there. Used on the agent's event loop."""

    def __init__(self, node_id: str, link: Any, runner: Any, *, task_user: Any = None,
                 stats: Callable[[], Sequence[serving_pb2.RouterStats]] = list,
                 outstanding: Callable[[str], int] = lambda _task_id: 0,
                 clock: Callable[[], float] = time.monotonic, report: Callable[[Any], Any] | None = None):
        self.node_id = node_id
        self._runner = runner
        self._task_user = task_user
        self._stats = stats
        self._outstanding = outstanding
        self._clock = clock
        self._report_call = report if report is not None else self._link_report(link)
        if link is not None:  # a new leader's table starts empty: tell it at once
            link.on_leader_change(lambda _old, _new: self._mark_due())
        self.started_at_ms = int(time.time() * 1000)
        self.replicas: dict[str, LocalReplica] = {}  # task id -> its running attempt here
        self._not_replicas: set[tuple[str, int]] = set()  # attempts seen, not replicas
        self._last_scan = -float("inf")
        self._last_report = -float("inf")
        self._report_due = False  # a change to report (set by scans and checks)
        self._reported_any = False  # the last report said something (an empty one clears it)
        self._wake = asyncio.Event()
        if hasattr(runner, "started_listeners"):
            runner.started_listeners.append(self._on_attempt_started)

    @staticmethod
    def _link_report(link: Any) -> Callable[[Any], Any]:
        from lepton.agent.link import ServiceLink

        deployments = ServiceLink(link, serving_pb2_grpc.DeploymentsStub)
        return lambda request: deployments.call("ReportReplicas", request, timeout=REPORT_TIMEOUT_S)

    # -- for the Predict router ------------------------------------------------------------
    def local_channel(self, task_id: str) -> Any:
        """A channel to replica `task_id` on this node (its socket), or None when no such
        replica runs here."""
        replica = self.replicas.get(task_id)
        if replica is None or replica.stopping:
            return None
        return replica.channel  # None until the supervisor has checked its listener

    def local_frames(self, task_id: str) -> FramesDialer | None:
        """The frames socket of replica `task_id` on this node (common/frames.py), or None
        when no such replica runs here."""
        replica = self.replicas.get(task_id)
        if replica is None or replica.stopping:
            return None
        return replica.frames_dialer()

    # -- the loop --------------------------------------------------------------------------
    def _on_attempt_started(self, spec: Any) -> None:
        if spec.replica:
            self._last_scan = -float("inf")  # find it on the next tick, not a scan later
            self._wake.set()

    def idle(self) -> bool:
        """Nothing to check and nothing to report: the loop may sleep until woken."""
        return not (self.replicas or self._report_due or self._reported_any or self._stats())

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - supervision must go on; the next tick retries
                logger.exception("replica supervision failed; retrying")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_S if self.idle() else CHECK_S)

    async def tick(self) -> None:
        """One round: find replicas, check each, stop the long unhealthy, report if due."""
        now = self._clock()
        if now - self._last_scan >= SCAN_S:
            self._last_scan = now
            self.scan()
        if self.replicas:
            await asyncio.gather(*(self._check(r) for r in list(self.replicas.values())))
        await self.report_if_due()

    def scan(self) -> None:
        """Track the runner's new replica attempts; forget those that ended."""
        pids = {(r.task_id, r.attempt): r.pid for r in self._runner.running() if r.pid}
        running = set(pids)
        for task_id, replica in list(self.replicas.items()):
            if (task_id, replica.attempt) not in running:
                self._forget(task_id)
        self._not_replicas &= running
        for key in running - self._not_replicas:
            if key[0] in self.replicas and self.replicas[key[0]].attempt == key[1]:
                continue
            spec = self._spec_of(*key)
            if spec is None:
                continue  # run.json not written yet: the next scan looks again
            if not spec.replica:
                self._not_replicas.add(key)
                continue
            if key[0] in self.replicas:  # an older attempt's entry
                self._forget(key[0])
            att_dir = self._runner.log_path(*key).parent
            try:
                replica_key = attempt_key(att_dir)
            except OSError as err:
                logger.warning("replica %s: no key for it (%s); looking again", key[0], err)
                continue
            self.replicas[key[0]] = LocalReplica(key[0], key[1], spec.replica, spec.replica_generation,
                                                 serve_socket_path(att_dir, self._task_user), session=pids[key],
                                                 key=replica_key)
            self._report_due = True

    def _spec_of(self, task_id: str, attempt: int) -> RunSpec | None:
        """The attempt's spec from its run.json; None while it cannot be read."""
        try:
            run = read_json(self._runner.log_path(task_id, attempt).parent / "run.json")
            return RunSpec.from_json(run["spec"]) if run else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _forget(self, task_id: str) -> None:
        replica = self.replicas.pop(task_id)
        self._report_due = True
        # Not awaited here: calls in flight on it end with their own errors.
        asyncio.ensure_future(replica.close(grace=1.0))

    async def _check(self, replica: LocalReplica) -> None:
        if replica.stopping:
            return
        try:
            impostor = replica.frames.impostor if replica.frames is not None else ""
            if impostor:
                raise ImpostorReplica(impostor)
            if not await replica.connect():
                return  # not listening yet: still starting (PENDING)
        except ImpostorReplica as err:
            # Another process's socket in the replica's place (a task of the same uid):
            # nothing was sent to it; the replica, unreachable, is replaced.
            self._stop_refused(replica, err.message, "replica socket taken over by another process")
            return
        try:
            # wait_for_ready: a channel in its reconnect backoff (the socket was missing a
            # moment ago) is not a failed check; a hung or gone replica still fails at the
            # timeout.
            answer = await replica.health.Check(health_pb2.HealthCheckRequest(), timeout=CHECK_TIMEOUT_S,
                                                wait_for_ready=True)
            healthy = answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.PERMISSION_DENIED and not replica.stopping:
                # Claimed by another caller before this agent (a task of the same user on
                # its socket): never put it in rotation; its replacement is claimed afresh.
                self._stop_refused(replica, "it refused its agent's key", "replica claimed by another caller")
                return
            healthy = False
            await replica.unpin_if_replaced()
        if self.replicas.get(replica.task_id) is not replica:
            return  # forgotten while checking
        if healthy:
            replica.ready_once = True
            replica.unhealthy_since = None
            self._set(replica, READY)
            return
        if not replica.ready_once:
            return  # still loading: PENDING
        now = self._clock()
        if replica.unhealthy_since is None:
            replica.unhealthy_since = now
            logger.warning("replica %s of %s failed its health check: out of rotation", replica.task_id,
                           replica.deployment)
        self._set(replica, UNHEALTHY)
        if now - replica.unhealthy_since >= KILL_AFTER_S:
            replica.stopping = True
            logger.warning("replica %s of %s unhealthy for %.1f s: stopping it to be replaced",
                           replica.task_id, replica.deployment, now - replica.unhealthy_since)
            self._runner.cancel(replica.task_id, replica.attempt,
                                reason=f"{UNHEALTHY_REASON} for {KILL_AFTER_S:g} s", grace_s=KILL_GRACE_S)

    def _stop_refused(self, replica: LocalReplica, why: str, reason: str) -> None:
        """Out of rotation for good, and its attempt stopped: the serving loop replaces it."""
        replica.stopping = True
        self._set(replica, UNHEALTHY)
        logger.warning("replica %s of %s: %s; stopping it to be replaced", replica.task_id, replica.deployment, why)
        self._runner.cancel(replica.task_id, replica.attempt, reason=reason, grace_s=KILL_GRACE_S)

    def _mark_due(self) -> None:
        if self.replicas or self._reported_any:
            self._report_due = True

    def _set(self, replica: LocalReplica, state: int) -> None:
        if replica.state != state:
            replica.state = state
            self._report_due = True

    # -- reports ---------------------------------------------------------------------------
    def report_request(self) -> serving_pb2.ReportReplicasRequest:
        return serving_pb2.ReportReplicasRequest(
            node_id=self.node_id, started_at_ms=self.started_at_ms, stats=list(self._stats()),
            replicas=[serving_pb2.ReplicaReport(task_id=r.task_id, deployment=r.deployment,
                                                generation=r.generation, state=r.state,
                                                outstanding=self._outstanding(r.task_id))
                      for r in sorted(self.replicas.values(), key=lambda r: r.task_id)])

    async def report_if_due(self) -> bool:
        """Report at once after a change, else every REPORT_S while there is anything to
        say (or the last report said something). Returns whether it sent one; a failure is
        logged and retried on the next tick."""
        now = self._clock()
        request = self.report_request()
        says_something = bool(request.replicas or request.stats)
        periodic = now - self._last_report >= REPORT_S and (says_something or self._reported_any)
        if not (self._report_due or periodic):
            return False
        try:
            await self._report_call(request)
        except (LeptonError, grpc.aio.AioRpcError) as err:
            logger.debug("replica report not taken (%s); retrying", err)
            self._report_due = True
            return False
        self._last_report = now
        self._report_due = False
        self._reported_any = says_something
        return True

    async def close(self) -> None:
        for replica in self.replicas.values():
            await replica.close()
        self.replicas.clear()
