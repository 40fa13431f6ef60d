"""A same-uid process that swaps its own socket in for a replica's (agent/replica_peer.py):
the agent checks with SO_PEERCRED that the listener is of the replica attempt's session
before it sends anything (its key first of all), keeps its gRPC channel pinned to the
socket it checked, and stops a replica whose socket was taken over so it is replaced."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.agent.replica_frames import FramesDialer
from lepton.agent.replica_peer import ImpostorReplica, PinnedSocket
from lepton.agent.serving import ReplicaSupervisor
from lepton.agent.tasks.attempt_env import serve_socket_path
from lepton.common.frames import frames_path
from lepton.v1 import serving_pb2
from tests.unit.test_replica_supervisor import Clock, FakeRunner, health_server, tick

# The replica: a process in a session of its own (as attempts are spawned), listening.
_LISTENER = """import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(16)
print("listening", flush=True)
time.sleep(120)
"""


@pytest.fixture
def replica_at():
    """start(path) -> the pid of a process in its own session listening on `path`."""
    procs = []

    def start(path: Path) -> int:
        proc = subprocess.Popen([sys.executable, "-c", _LISTENER, str(path)], stdout=subprocess.PIPE,
                                start_new_session=True)
        procs.append(proc)
        assert proc.stdout.readline() == b"listening\n"
        return proc.pid

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def impostor_over(path: Path) -> socket.socket:
    """A listener of this process (another session) renamed over `path`, as a task would."""
    aside = path.with_name(path.name + ".evil")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(aside))
    sock.listen(16)
    sock.setblocking(False)
    os.rename(aside, path)
    return sock


def accepted(listener: socket.socket) -> list[bytes]:
    """What each connection made to `listener` so far sent (nothing waits)."""
    out = []
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return out
        conn.setblocking(False)
        try:
            out.append(conn.recv(4096))
        except BlockingIOError:
            out.append(b"")
        conn.close()


async def test_a_pinned_socket_keeps_reaching_the_checked_listener(tmp_path, replica_at):
    path = tmp_path / "serve.sock"
    pid = replica_at(path)
    pinned = PinnedSocket(path)
    try:
        await pinned.verify(pid, "its socket")
        evil = impostor_over(path)
        assert not pinned.still_at(path)
        await pinned.verify(pid, "its socket")  # through the handle: still the replica
        assert accepted(evil) == []
        fresh = PinnedSocket(path)
        try:
            with pytest.raises(ImpostorReplica, match=r"its socket is served by pid \d+, not by the replica"):
                await fresh.verify(pid, "its socket")
        finally:
            fresh.close()
        evil.close()
    finally:
        pinned.close()


async def test_the_frames_dialer_sends_no_key_to_an_impostor(tmp_path, replica_at):
    path = tmp_path / "serve.sock.frames"
    pid = replica_at(path)
    evil = impostor_over(path)
    dialer = FramesDialer(path, key="s3cret", session=pid)
    with pytest.raises(ImpostorReplica):
        await dialer.connect()
    assert dialer.impostor and accepted(evil) == [b""]  # connected, told nothing
    with pytest.raises(ImpostorReplica):  # and not tried again
        await dialer.connect()
    evil.close()


@pytest.fixture
async def supervisor(tmp_path):
    runner, clock, reports = FakeRunner(tmp_path / "tasks"), Clock(), []

    async def report(request):
        reports.append([(r.task_id, r.state) for r in request.replicas])

    sup = ReplicaSupervisor("n1", None, runner, clock=clock, report=report)
    yield runner, clock, reports, sup
    await sup.close()


async def test_a_replica_whose_socket_is_taken_over_is_stopped_to_be_replaced(supervisor, replica_at):
    runner, clock, reports, sup = supervisor
    att_dir = runner.start("r1", replica="web")
    # The attempt is the listener process's session; a health server of this process
    # (another session) holds the replica's socket path.
    runner.live[-1] = dataclasses.replace(runner.live[-1], pid=replica_at(att_dir / "decoy.sock"))
    server, _ = await health_server(serve_socket_path(att_dir, None))
    try:
        await tick(sup, clock)
        assert runner.cancelled == [("r1", 1, "replica socket taken over by another process", 1.0)]
        assert reports[-1] == [("r1", serving_pb2.REPLICA_UNHEALTHY)]
        assert sup.local_channel("r1") is None
    finally:
        await server.stop(0)


async def test_a_replica_whose_frames_socket_is_taken_over_is_stopped(supervisor, replica_at):
    runner, clock, _, sup = supervisor
    att_dir = runner.start("r1", replica="web")
    sock = serve_socket_path(att_dir, None)
    pid = replica_at(sock)
    runner.live[-1] = dataclasses.replace(runner.live[-1], pid=pid)
    evil = impostor_over(Path(frames_path(sock)))
    await tick(sup, clock)  # the gRPC socket is the replica's: pinned (not serving health)
    with pytest.raises(ImpostorReplica):
        await sup.local_frames("r1").connect()  # the router's first Predict
    await tick(sup, clock)
    assert [c[2] for c in runner.cancelled] == ["replica socket taken over by another process"]
    assert accepted(evil) == [b""]
    evil.close()


async def test_a_replica_refused_at_once_does_not_hold_the_agents_loop():
    """The router retries a replica whose connection fails without a pause (an impostor,
    one being stopped) once per wait, not in a loop that never yields until the deadline."""
    import asyncio

    import numpy as np

    from lepton.agent.predict_router import PredictRouter
    from lepton.common.errors import Unavailable
    from lepton.workloads.serving.tensors import to_tensor

    class Refused:
        absent, tries = False, 0

        def ready(self):
            return None

        async def connect(self):
            self.tries += 1
            raise ImpostorReplica("its frames socket is served by pid 1")

    dialer = Refused()
    router = PredictRouter("nodeA", local_frames=lambda t: dialer)
    es = serving_pb2.EndpointSet(version=1)
    es.deployments["digits"].endpoints.add(task_id="t1", node_id="nodeA", node_address="a:1", generation=1)
    router.set_endpoints(es)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.ensure_future(ticker())
    try:
        with pytest.raises(Unavailable, match="no ready replica"):
            await router.predict("digits", to_tensor(np.ones((1, 3), dtype="<f4")), timeout_s=1.0)
    finally:
        beat.cancel()
    assert ticks >= 5, ticks  # the loop ran other work meanwhile
    assert dialer.tries <= 20, dialer.tries  # once per wait (20 ms doubling), not thousands
