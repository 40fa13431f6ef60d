"""An attacker of the replica's uid at a real replica's sockets (agent/replica_peer.py): a
socket of its own renamed over the replica's frames socket before the agent's first
Predict gets nothing from the agent (not the replica key, not a request); the agent stops
that replica and the serving loop replaces it. Killing a replica (which the same uid can
always do) costs a replica's start: it is replaced too, and Predict answers again."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import threading

import grpc
import numpy as np
import pytest

from lepton.agent.tasks.attempt_env import serve_socket_path
from lepton.client import Client
from lepton.common.frames import frames_path
from lepton.v1 import serving_pb2, serving_pb2_grpc, tasks_pb2
from tests.integration.cluster import wait_until

pytest.importorskip("torch")

from lepton.workloads.serving.tensors import from_tensor, to_tensor  # noqa: E402
from tests.integration.test_serving_replica import FEATURES, ready_replica, store_model  # noqa: E402

pytestmark = [pytest.mark.timeout(900), pytest.mark.integration, pytest.mark.xdist_group("edges_replica_socket")]


class Impostor:
    """A listener of this process renamed over `path`; records what each connection sends."""

    def __init__(self, path: str):
        # Bound where the path is short (a socket's path has at most 107 bytes), then moved.
        aside = os.path.join(tempfile.mkdtemp(prefix="ev-"), "s")  # the agents' temp dir too
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(aside)
        self.sock.listen(16)
        self.received: list[bytes] = []
        os.rename(aside, path)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            data = b""
            try:
                while chunk := conn.recv(65536):
                    data += chunk
            except OSError:
                pass
            self.received.append(data)
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_swapped_socket_gets_nothing_and_a_killed_replica_is_replaced(agents, tmp_path, tasks_exec_python):
    node = agents("solo")
    with Client(node.address) as client:
        wait_until(lambda: any(n.state == "ready" for n in client.nodes()), timeout=60, what="node ready")
        store_model(client, tmp_path, "digits-mlp")
    channel = grpc.insecure_channel(node.address)
    deployments = serving_pb2_grpc.DeploymentsStub(channel)
    inference = serving_pb2_grpc.InferenceStub(channel)
    deployments.CreateDeployment(serving_pb2.CreateDeploymentRequest(spec=serving_pb2.DeploymentSpec(
        name="digits", model="digits-mlp", replicas=1, resources=tasks_pb2.Resources(cpu=0.5))), timeout=30)
    x = np.random.default_rng(5).random((4, FEATURES), dtype=np.float32)
    request = serving_pb2.PredictRequest(deployment="digits", inputs=to_tensor(x))

    def answers() -> bool:
        try:
            return from_tensor(inference.Predict(request, timeout=10).outputs).shape[0] == 4
        except grpc.RpcError:
            return False  # no ready replica yet, or the one tried was refused

    def att_dir(task_id: str):  # its current attempt's folder (an attempt fenced under load is rerun)
        with Client(node.address) as client:
            return node.data_dir / "tasks" / task_id / str(client.get(task_id).attempt)

    first = wait_until(lambda: ready_replica(deployments, "digits"), timeout=240, what="a READY replica")
    folder = att_dir(first.task_id)
    key = (folder / "replica.key").read_text().strip()
    impostor = Impostor(frames_path(serve_socket_path(folder, None)))
    try:
        # The first Predict opens the frames connection: the listener is not the replica's,
        # so the agent sends nothing on it and stops the replica; a new task replaces it.
        second = wait_until(lambda: answers() and ready_replica(deployments, "digits", not_task=first.task_id),
                            timeout=300, interval=0.5, what="Predict answered by a replacement")
        assert impostor.received and all(not data for data in impostor.received), impostor.received
        assert not any(key.encode() in data for data in impostor.received)
        log = node.log_path.read_text(errors="replace")
        assert f"replica {first.task_id} of digits: its frames socket is served by pid" in log, log[-3000:]
    finally:
        impostor.close()

    # Killed (the same uid may): the attempt fails, the serving loop starts another.
    run = json.loads((att_dir(second.task_id) / "run.json").read_text())
    os.killpg(run["pid"], signal.SIGKILL)
    wait_until(lambda: answers() and ready_replica(deployments, "digits", not_task=second.task_id),
               timeout=300, interval=0.5, what="Predict answered by the killed replica's replacement")
    channel.close()
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
