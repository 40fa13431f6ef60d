"""The replica process by itself (no agent): loads a local model file, says SERVING only
after warm-up, answers what the batch `predict` writes, refuses bad inputs and keeps
serving, batches concurrent requests, and exits 0 on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lepton.common.frames import frames_path
from lepton.common.sockets import MAX_UNIX_PATH, UnixTarget
from lepton.v1 import serving_pb2, serving_pb2_grpc
from lepton.workloads.recipes.data import write_shard
from lepton.workloads.recipes.models import build_model, save_model
from lepton.workloads.recipes.predict import predict
from lepton.workloads.serving.tensors import from_tensor, to_tensor

FEATURES = 64


def write_model(path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("mlp", [FEATURES], 10, hidden=16)
    save_model(path, model, {"algorithm": "mlp", "task": "classification", "input_shape": [FEATURES],
                             "output_dim": 10, "num_classes": 10, "target_shape": [], "hidden": 16})
    return path


def target(socket: Path) -> str:
    return UnixTarget(socket).target  # the handle stays open for the test's life: fine here


async def wait_serving(socket: Path, proc: subprocess.Popen, deadline_s: float = 120.0) -> list[int]:
    """The health statuses seen until SERVING (the process must stay up meanwhile)."""
    seen: list[int] = []
    async with grpc.aio.insecure_channel(target(socket)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            assert proc.poll() is None, f"replica exited with {proc.returncode}"
            try:
                status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status
            except grpc.aio.AioRpcError:
                status = -1  # not listening yet
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                return seen
            await asyncio.sleep(0.05)
    raise AssertionError(f"not SERVING within {deadline_s} s; saw {seen}")


@pytest.fixture
def replica(tmp_path):
    model = write_model(tmp_path / "model.safetensors")
    deep = tmp_path / ("d" * 100)  # past a unix socket path's 107 bytes: bound through a handle
    deep.mkdir()
    socket = deep / "r.sock"
    env = {**os.environ, "LEPTON_SERVE_SOCKET": str(socket), "LEPTON_TASK_ID": "serve-d-1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lepton.workloads.serving.replica", "--model", "digits", "--deployment", "d",
         "--generation", "3", "--max-batch", "64", "--max-wait-ms", "20", "--cpus", "1.5",
         "--model-file", str(model)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield proc, socket, model
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    proc.stdout.close()


async def test_replica_serves_predict_like_batch_predict_and_survives_bad_input(replica, tmp_path):
    proc, socket, model = replica
    assert len(str(socket)) > MAX_UNIX_PATH
    seen = await wait_serving(socket, proc)
    assert seen[-1] == health_pb2.HealthCheckResponse.SERVING
    x = np.random.default_rng(1).random((40, FEATURES), dtype=np.float32)
    write_shard(tmp_path / "rows.npz", x)
    expected = predict(str(model), [str(tmp_path / "rows.npz")])
    async with grpc.aio.insecure_channel(target(socket)) as ch:
        stub = serving_pb2_grpc.InferenceStub(ch)
        one = await stub.Predict(serving_pb2.PredictRequest(deployment="d", inputs=to_tensor(x)), timeout=30)
        assert (one.replica, one.model, one.generation) == ("serve-d-1", "digits", 3)
        np.testing.assert_array_equal(from_tensor(one.outputs), expected)
        # Bad inputs: INVALID_ARGUMENT with a message, and the replica answers the next call.
        bad = [
            serving_pb2.Tensor(dtype="<f8", shape=[1, FEATURES], data=b"\0" * 8 * FEATURES),
            serving_pb2.Tensor(dtype="<f4", shape=[1, FEATURES + 1], data=b"\0" * 4 * (FEATURES + 1)),
            serving_pb2.Tensor(dtype="<f4", shape=[0, FEATURES]),
            to_tensor(np.zeros((50_000, FEATURES), dtype=np.float32)),  # 12.8 MB: over the cap
        ]
        for tensor in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predict(serving_pb2.PredictRequest(deployment="d", inputs=tensor), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details()
        # Concurrent single rows: answered row by row, some of them in a shared batch.
        answers = await asyncio.gather(*(
            stub.Predict(serving_pb2.PredictRequest(deployment="d", inputs=to_tensor(x[i:i + 1])), timeout=30)
            for i in range(len(x))))
    for i, a in enumerate(answers):
        np.testing.assert_array_equal(from_tensor(a.outputs), expected[i:i + 1])
    assert max(a.batch_rows for a in answers) > 1
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode(errors="replace")
    assert "1 torch thread(s)" in out.decode(errors="replace")  # --cpus 1.5: its whole cpus
    assert not socket.exists()
    assert not Path(frames_path(socket)).exists()


async def test_replica_without_its_socket_variable_says_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LEPTON_SERVE_SOCKET"}
    proc = subprocess.run([sys.executable, "-m", "lepton.workloads.serving.replica", "--model", "m",
                           "--deployment", "d"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "LEPTON_SERVE_SOCKET is not set" in proc.stderr


async def test_a_file_that_is_no_model_ends_the_replica_with_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"PK\x03\x04 a torch.save zip")
    env = {**os.environ, "LEPTON_SERVE_SOCKET": str(tmp_path / "r.sock")}
    proc = subprocess.run([sys.executable, "-m", "lepton.workloads.serving.replica", "--model", "m",
                           "--deployment", "d", "--model-file", str(tmp_path / "bad.safetensors")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: cannot load model m:" in proc.stderr and "pickle" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r.sock").exists()


def test_the_serving_loop_gives_a_replica_its_cpus_for_torch():
    from lepton.coordinator.loops.serving import replica_spec
    from lepton.v1 import tasks_pb2
    from lepton.workloads.serving.replica import parse_args
    from tests.unit.test_deployments import create, world

    w = world()
    create(w, resources=tasks_pb2.Resources(cpu=2.5, memory_bytes=1 << 28))
    argv = list(replica_spec(w.sm.deployments.get("web")).argv)
    assert parse_args(argv[3:]).cpus == 2.5
