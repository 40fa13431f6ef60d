"""The agent's replica supervision (agent/serving.py) against real health servers on unix
sockets and a fake runner: PENDING until SERVING, READY, UNHEALTHY at once, stopped after
KILL_AFTER_S, reports at once on each change."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lepton.agent import replica_peer, serving
from lepton.agent.serving import ReplicaSupervisor
from lepton.agent.tasks.attempt_env import serve_socket_path
from lepton.agent.tasks.task_spec import RunningTask, RunSpec
from lepton.common.sockets import MAX_UNIX_PATH, UnixTarget
from lepton.v1 import serving_pb2

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class FakeRunner:
    def __init__(self, root: Path):
        self.root = root
        self.live: list[RunningTask] = []
        self.cancelled: list[tuple[str, int, str, float | None]] = []

    def start(self, task_id: str, attempt: int = 1, replica: str = "") -> Path:
        att_dir = self.root / task_id / str(attempt)
        att_dir.mkdir(parents=True)
        spec = RunSpec(task_id=task_id, attempt=attempt, term=1, argv=("x",), replica=replica, replica_generation=2)
        (att_dir / "run.json").write_text(json.dumps({"spec": spec.to_json()}))
        # The attempt's pid: its session, which the replica's listener must be in
        # (agent/replica_peer.py). The health servers here run in this process, which the
        # `setup` fixture makes look like the session leader an attempt is.
        self.live.append(RunningTask(task_id, attempt, 1, os.getpid(), 0))
        return att_dir

    def running(self) -> list[RunningTask]:
        return list(self.live)

    def log_path(self, task_id: str, attempt: int) -> Path:
        return self.root / task_id / str(attempt) / "output.log"

    def cancel(self, task_id: str, attempt: int, *, reason: str = "", grace_s: float | None = None) -> None:
        self.cancelled.append((task_id, attempt, reason, grace_s))


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


async def health_server(socket: Path) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    servicer = health.aio.HealthServicer()
    await servicer.set("", NOT_SERVING)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(UnixTarget(socket).target)
    await server.start()
    return server, servicer


@pytest.fixture
async def setup(tmp_path, monkeypatch):
    # This process poses as the attempt: a session leader, so its own session is its pid.
    # Its real session may be anything, 0 included (a container's init session, as in CI),
    # and the runner never reports a pid of 0.
    real_getsid, me = os.getsid, os.getpid()
    monkeypatch.setattr(replica_peer.os, "getsid", lambda pid: me if pid in (0, me) else real_getsid(pid))
    # A deep data dir: the sockets' paths pass the kernel's 107 bytes (reached through a handle).
    runner, clock, reports = FakeRunner(tmp_path / ("d" * 100) / "tasks"), Clock(), []

    async def report(request):
        reports.append([(r.task_id, r.deployment, r.generation, r.state) for r in request.replicas])

    sup = ReplicaSupervisor("n1", None, runner, clock=clock, report=report,
                            outstanding=lambda task_id: 3 if task_id == "r1" else 0)
    servers = []
    yield runner, clock, reports, sup, servers
    await sup.close()
    for server in servers:
        await server.stop(0)


async def tick(sup: ReplicaSupervisor, clock: Clock, seconds: float = serving.CHECK_S) -> None:
    clock.now += seconds
    await sup.tick()


async def test_pending_until_serving_then_ready_unhealthy_at_once_and_stopped_later(setup):
    runner, clock, reports, sup, servers = setup
    att_dir = runner.start("r1", replica="web")
    assert len(str(serve_socket_path(att_dir, None))) > MAX_UNIX_PATH
    runner.start("plain")  # not a replica: never checked or reported
    await tick(sup, clock)
    assert reports == [[("r1", "web", 2, serving_pb2.REPLICA_PENDING)]]  # no socket yet: loading
    server, status = await health_server(serve_socket_path(att_dir, None))
    servers.append(server)
    await tick(sup, clock)
    assert len(reports) == 1  # NOT_SERVING while it loads: still PENDING, nothing new to say
    await status.set("", SERVING)
    await tick(sup, clock)
    assert reports[-1] == [("r1", "web", 2, serving_pb2.REPLICA_READY)]
    assert sup.report_request().replicas[0].outstanding == 3
    assert sup.local_channel("r1") is not None and sup.local_channel("plain") is None
    await status.set("", NOT_SERVING)
    await tick(sup, clock)
    assert reports[-1] == [("r1", "web", 2, serving_pb2.REPLICA_UNHEALTHY)]  # at once
    await tick(sup, clock, 1.0)
    assert runner.cancelled == []
    await tick(sup, clock, serving.KILL_AFTER_S)
    assert runner.cancelled == [("r1", 1, "replica failed its health checks for 3 s", serving.KILL_GRACE_S)]
    assert sup.local_channel("r1") is None  # being stopped: the router goes elsewhere


async def test_a_replica_that_recovers_before_the_deadline_is_kept(setup):
    runner, clock, reports, sup, servers = setup
    att_dir = runner.start("r1", replica="web")
    server, status = await health_server(serve_socket_path(att_dir, None))
    servers.append(server)
    await status.set("", SERVING)
    await tick(sup, clock)
    await server.stop(0)  # gone: connection refused
    await tick(sup, clock)
    assert reports[-1][0][3] == serving_pb2.REPLICA_UNHEALTHY
    server, status = await health_server(serve_socket_path(att_dir, None))
    servers.append(server)
    await status.set("", SERVING)
    for _ in range(20):  # the channel reconnects within its backoff (at most 1 s)
        await tick(sup, clock, 0.1)
        if reports[-1][0][3] == serving_pb2.REPLICA_READY:
            break
    assert reports[-1][0][3] == serving_pb2.REPLICA_READY
    await tick(sup, clock, serving.KILL_AFTER_S)
    assert runner.cancelled == []


async def test_ended_attempts_are_forgotten_and_reported_gone_then_reports_stop(setup):
    runner, clock, reports, sup, _ = setup
    runner.start("r1", replica="web")
    await tick(sup, clock, serving.SCAN_S)
    assert reports == [[("r1", "web", 2, serving_pb2.REPLICA_PENDING)]]
    await tick(sup, clock, serving.REPORT_S)  # periodic while there is a replica
    assert len(reports) == 2
    runner.live.clear()
    await tick(sup, clock, serving.SCAN_S)
    assert reports[-1] == []  # the leader hears it is gone
    count = len(reports)
    await tick(sup, clock, serving.REPORT_S)
    await tick(sup, clock, serving.REPORT_S)
    assert len(reports) == count  # nothing to say: no more reports


async def test_an_attempt_whose_run_json_is_not_written_yet_is_looked_at_again(setup):
    runner, clock, reports, sup, _ = setup
    att_dir = runner.start("r1", replica="web")
    run_json = (att_dir / "run.json").read_text()
    (att_dir / "run.json").unlink()  # spawned, its record not yet written
    await tick(sup, clock, serving.SCAN_S)
    assert sup.replicas == {} and reports == []
    (att_dir / "run.json").write_text(run_json)
    await tick(sup, clock, serving.SCAN_S)
    assert list(sup.replicas) == ["r1"] and reports == [[("r1", "web", 2, serving_pb2.REPLICA_PENDING)]]


async def test_a_failed_report_is_retried_on_the_next_tick(setup):
    runner, clock, _, _, _ = setup
    calls = []

    async def flaky(request):
        calls.append(len(request.replicas))
        if len(calls) == 1:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    sup = ReplicaSupervisor("n1", None, runner, clock=clock, report=flaky)
    runner.start("r1", replica="web")
    await tick(sup, clock)
    await tick(sup, clock)
    assert calls == [1, 1]
    await tick(sup, clock)
    assert calls == [1, 1]  # taken: the next is the periodic one
    await sup.close()


def test_a_replica_attempt_gets_its_socket_in_its_own_folder_and_others_none(tmp_path):
    from lepton.agent.assignments import run_spec
    from lepton.agent.tasks.attempt_env import SERVE_SOCKET_ENV, AttemptEnv
    from lepton.v1 import tasks_pb2

    a = tasks_pb2.Assignment(task_id="r1", attempt=1, term=1)
    a.spec.argv.append("/bin/true")
    a.spec.env[SERVE_SOCKET_ENV] = "/tmp/elsewhere.sock"  # a user's value never wins for a replica
    a.spec.replica.deployment, a.spec.replica.generation = "web", 4
    spec = run_spec(a)
    assert (spec.replica, spec.replica_generation) == ("web", 4)
    _, env, _ = AttemptEnv(base_env={}).prepare(spec, tmp_path)
    assert env[SERVE_SOCKET_ENV] == str(tmp_path / "serve.sock")
    plain = run_spec(tasks_pb2.Assignment(task_id="p", attempt=1, term=1, spec=tasks_pb2.TaskSpec(argv=["/bin/true"])))
    assert plain.replica == ""
    _, env, _ = AttemptEnv(base_env={}).prepare(plain, tmp_path)
    assert SERVE_SOCKET_ENV not in env
    assert RunSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec  # run.json keeps it


async def test_a_new_leader_hears_at_once(setup):
    runner, clock, reports, _, _ = setup
    listeners = []
    link = type("Link", (), {"on_leader_change": lambda self, f: listeners.append(f)})()

    async def report(request):
        reports.append(len(request.replicas))

    sup = ReplicaSupervisor("n1", link, runner, clock=clock, report=report)
    runner.start("r1", replica="web")
    await tick(sup, clock)
    await tick(sup, clock)
    count = len(reports)  # the change, then nothing new within REPORT_S
    listeners[0]("10.0.0.1:7000", "10.0.0.2:7000")
    await tick(sup, clock)
    assert len(reports) == count + 1
    await sup.close()
