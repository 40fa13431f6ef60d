"""A deployment's replica on a real agent (issue 19): the serving loop starts it as a task,
its agent reports it READY only after its warm-up, Predict through the agent answers what
the batch `predict` writes, bad inputs are INVALID_ARGUMENT with a message while the replica
keeps serving, and a replica whose health checks fail (SIGSTOP) leaves rotation and is
replaced by a new task.

The model is a digits-shaped MLP (64 features, 10 classes) stored as a training job stores
one (`recipes.cluster.put_file`, kind model), without running a job: training is covered by
test_ml_cli.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import grpc
import numpy as np
import pytest

from lepton.client import Client
from lepton.v1 import serving_pb2, serving_pb2_grpc, tasks_pb2
from tests.integration.cluster import wait_until

torch = pytest.importorskip("torch")

from lepton.workloads.recipes.cluster import model_labels, put_file  # noqa: E402
from lepton.workloads.recipes.data import write_shard  # noqa: E402
from lepton.workloads.recipes.models import build_model, read_config, save_model  # noqa: E402
from lepton.workloads.recipes.predict import predict  # noqa: E402
from lepton.workloads.serving.tensors import from_tensor, to_tensor  # noqa: E402

pytestmark = pytest.mark.integration

FEATURES, CLASSES = 64, 10
READY, UNHEALTHY = serving_pb2.REPLICA_READY, serving_pb2.REPLICA_UNHEALTHY


def store_model(client: Client, folder: Path, name: str) -> Path:
    torch.manual_seed(7)
    meta = {"algorithm": "mlp", "task": "classification", "input_shape": [FEATURES], "output_dim": CLASSES,
            "num_classes": CLASSES, "target_shape": [], "hidden": 32, "source_dataset": "digits"}
    path = folder / "model.safetensors"
    save_model(path, build_model("mlp", [FEATURES], CLASSES, hidden=32), meta)
    put_file(client, name, path, replicas=1, kind="model", labels=model_labels(read_config(path)))
    return path


def replicas(stub, name: str) -> list[serving_pb2.Replica]:
    return list(stub.GetDeployment(serving_pb2.GetDeploymentRequest(name=name), timeout=10).replicas)


def ready_replica(stub, name: str, *, not_task: str = "") -> serving_pb2.Replica | None:
    return next((r for r in replicas(stub, name) if r.state == READY and r.task_id != not_task), None)


def output_of(agent, task_id: str) -> str:
    path = agent.data_dir / "tasks" / task_id / "1" / "output.log"
    return path.read_text(errors="replace") if path.exists() else ""


def predict_request(x: np.ndarray) -> serving_pb2.PredictRequest:
    return serving_pb2.PredictRequest(deployment="digits", inputs=to_tensor(x))


def test_replica_ready_after_warmup_answers_like_predict_refuses_bad_input_and_is_replaced(
        agents, tmp_path, tasks_exec_python):
    node = agents("solo")
    with Client(node.address) as client:
        wait_until(lambda: any(n.state == "ready" for n in client.nodes()), timeout=60, what="node ready")
        model = store_model(client, tmp_path, "digits-mlp")
    channel = grpc.insecure_channel(node.address)
    deployments = serving_pb2_grpc.DeploymentsStub(channel)
    inference = serving_pb2_grpc.InferenceStub(channel)
    deployments.CreateDeployment(serving_pb2.CreateDeploymentRequest(spec=serving_pb2.DeploymentSpec(
        name="digits", model="digits-mlp", replicas=1, max_batch=16, max_wait_ms=5,
        resources=tasks_pb2.Resources(cpu=0.5))), timeout=30)

    first = wait_until(lambda: ready_replica(deployments, "digits"), timeout=180, what="a READY replica")
    # READY only after the warm-up: the replica prints its line just before saying SERVING.
    assert "warmed up, serving" in output_of(node, first.task_id)
    assert first.node_id == node.node_id and first.model == "digits-mlp" and first.generation == 1

    x = np.random.default_rng(3).random((25, FEATURES), dtype=np.float32)
    write_shard(tmp_path / "rows.npz", x)
    expected = predict(str(model), [str(tmp_path / "rows.npz")])

    def answers_right() -> bool:
        try:
            got = inference.Predict(predict_request(x), timeout=10)
        except grpc.RpcError:
            return False  # the agent's router may not have the endpoint set yet
        np.testing.assert_array_equal(from_tensor(got.outputs), expected)
        return True

    wait_until(answers_right, timeout=30, what="Predict through the agent")

    bad = {
        "dtype": serving_pb2.Tensor(dtype="<f8", shape=[2, FEATURES], data=b"\0" * 16 * FEATURES),
        "shape": serving_pb2.Tensor(dtype="<f4", shape=[2, 8, 8], data=b"\0" * 8 * FEATURES),
        "no rows": serving_pb2.Tensor(dtype="<f4", shape=[0, FEATURES]),
        # 12.8 MB: over the cap (the router's, which is the replica's: tensors.MAX_INPUT_BYTES)
        "at most": to_tensor(np.zeros((50_000, FEATURES), dtype=np.float32)),
    }
    for says, tensor in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            inference.Predict(serving_pb2.PredictRequest(deployment="digits", inputs=tensor), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (says, err.value.details())
        assert says in err.value.details(), err.value.details()
        # ... and the replica keeps serving.
        got = inference.Predict(predict_request(x[:3]), timeout=10)
        np.testing.assert_array_equal(from_tensor(got.outputs), expected[:3])

    # A hung replica (SIGSTOP: its socket still accepts, nothing answers) fails its checks:
    # UNHEALTHY, out of rotation, then stopped by its agent; the serving loop replaces it.
    run = json.loads((node.data_dir / "tasks" / first.task_id / "1" / "run.json").read_text())
    os.killpg(run["pid"], signal.SIGSTOP)
    try:
        seen: list[int] = []

        def old_one_out() -> bool:
            states = {r.task_id: r.state for r in replicas(deployments, "digits")}
            if first.task_id in states and (not seen or seen[-1] != states[first.task_id]):
                seen.append(states[first.task_id])
            return first.task_id not in states or states[first.task_id] not in (READY, UNHEALTHY)

        wait_until(old_one_out, timeout=60, interval=0.05, what="the hung replica to be stopped")
        assert UNHEALTHY in seen, seen
        assert seen.index(UNHEALTHY) == len(seen) - 1 or READY not in seen[seen.index(UNHEALTHY):], seen
        second = wait_until(lambda: ready_replica(deployments, "digits", not_task=first.task_id),
                            timeout=180, what="a new READY replica")
        assert second.task_id != first.task_id
        with Client(node.address) as client:
            old = client.find_task(first.task_id)
        assert old.state in ("failed", "cancelled", "succeeded"), old  # ended, not running
        wait_until(answers_right, timeout=30, what="Predict through the replacement")
    finally:
        try:
            os.killpg(run["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    channel.close()
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
