"""A replica's node lost (issue 19): kill -9 of the agent hosting a replica; the serving loop
replaces that replica as soon as the node is declared down, on the node still alive, with a
new task (the lost one is drained and cancelled), instead of waiting for the node's attempts
to be requeued after their lease (the fence wait). The figures (kill -> down -> replacement
ready) are printed: run with -s to see them.

On the same cluster first: another task on the replica's node cannot call Predict on the
replica's sockets, gRPC or frames (only the agent's key is served:
workloads/serving/replica_key.py)."""

from __future__ import annotations

import sys
import time

import pytest

from lepton.client import Client
from tests.integration.cluster import wait_until
from tests.integration.test_serving import (
    REPLICA_CPU,
    digits_model,
    ready_replicas,
    store_model,
    wait_ready,
)

pytestmark = pytest.mark.integration

# Runs as a task: calls Predict on a replica's socket directly, past the agent.
PROBE = r"""
import sys
import grpc
import numpy as np
from lepton.common.sockets import UnixTarget
from lepton.v1 import serving_pb2, serving_pb2_grpc
from lepton.workloads.serving.tensors import to_tensor

target = UnixTarget(sys.argv[1])
with grpc.insecure_channel(target.target) as ch:
    request = serving_pb2.PredictRequest(deployment="web", inputs=to_tensor(np.zeros((1, 64), np.float32)))
    try:
        serving_pb2_grpc.InferenceStub(ch).Predict(request, timeout=20)
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
# The frames socket beside it (common/frames.py), a request frame with no key frame first.
import os, socket
from lepton.common.frames import HEADER, frames_path
os.chdir(os.path.dirname(frames_path(sys.argv[1])))  # a deep folder: past a socket path's 107 bytes
with socket.socket(socket.AF_UNIX) as raw:
    raw.connect(os.path.basename(frames_path(sys.argv[1])))
    payload = request.SerializeToString()
    raw.sendall(HEADER.pack(len(payload), 1, 0) + payload)
    raw.settimeout(20)
    answer = raw.recv(HEADER.size)
status = HEADER.unpack(answer)[2] if len(answer) == HEADER.size else None
frames = {s.value[0]: s.name for s in grpc.StatusCode}.get(status, f"no answer ({answer!r})")
print("PROBE", code, frames, flush=True)
sys.exit(0 if code == frames == "PERMISSION_DENIED" else 3)
"""


@pytest.mark.timeout(600)  # replicas import torch: tens of seconds each on a loaded machine
def test_a_lost_nodes_replica_is_replaced_once_the_node_is_down(agents, tmp_path, tasks_exec_python):
    model, _rows = digits_model(tmp_path / "m.safetensors", seed=0, epochs=5)
    voter = agents("voter")
    worker = agents("worker", "--join", voter.address)
    with Client(voter.address, timeout=30) as c:
        wait_until(lambda: len(c.nodes(states=["ready"])) == 2, timeout=60, what="two ready nodes")
        store_model(c, "digits", model, copies=2)  # a copy on the survivor
        c.create_deployment("web", "digits", replicas=2, cpu=REPLICA_CPU)
        wait_ready(c, "web", 2, [voter, worker], "a replica on each node",
                   nodes=lambda on: on == {voter.node_id, worker.node_id})
        first = {r.task_id for r in ready_replicas(c, "web")}
        lost = next(r.task_id for r in ready_replicas(c, "web") if r.node_id == worker.node_id)

        # Another task on the voter, at the voter's replica's socket: refused.
        [sock] = list(voter.data_dir.glob("tasks/**/serve.sock"))
        probe = c.submit([sys.executable, "-c", PROBE, str(sock)], cpu=0.1)
        done = wait_until(lambda: (t := c.get(probe.id)).state in ("succeeded", "failed") and t, timeout=120,
                          what="the probe task")
        assert done.state == "succeeded", f"the probe reached the replica: {done}"

        killed_at, killed_wall_ms = time.monotonic(), time.time() * 1000
        worker.kill9()
        wait_until(lambda: c.node(worker.node_id).state == "down", timeout=60, what="the worker declared down")
        down_at = time.monotonic()
        wait_ready(c, "web", 2, [voter], "the lost replica replaced on the voter",
                   nodes=lambda on: on == {voter.node_id})
        ready_at = time.monotonic()
        # Replaced by a new task, the lost one drained and cancelled: not requeued once
        # its lease was surely over (the fence wait: the same task, much later).
        assert lost not in {r.task_id for r in ready_replicas(c, "web")}
        assert c.get(lost).state == "cancelled", c.get(lost)
        new = c.get(next(r.task_id for r in ready_replicas(c, "web") if r.task_id not in first))
        print(f"\nnode loss: kill -> down {down_at - killed_at:.1f}s, down -> replacement ready "
              f"{ready_at - down_at:.1f}s, kill -> ready {ready_at - killed_at:.1f}s; the replacement "
              f"submitted {(new.created_at_ms - killed_wall_ms) / 1000:.1f}s after the kill, "
              f"started {(new.started_at_ms - killed_wall_ms) / 1000:.1f}s after")
