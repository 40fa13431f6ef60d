"""Online serving throughput and latency: the digits MLP under 16 concurrent clients.

In one run, each for --seconds with --clients callers sending one row per request:
  (a) in_process     the model called directly, one call at a time (the ceiling);
  (b) grpc_baseline  a minimal grpc.aio server around the same model (another process,
                     the model called inline, no batching): the baseline;
  (c) lepton         a real agent (one voter) serving a deployment, called through the
                     agent's Inference.Predict: 1 and 2 replicas, batching off and on.
Prints one JSON object: requests_per_s, p50_ms, p99_ms, errors per variant, and the ratios
the targets are about (issue 19), each Lepton variant against the baseline measured right
before it (the baseline server runs all along): lepton with 1 replica >= 0.5x the baseline's requests/s and
p99 <= 2x its p99; with batching on it should beat the baseline. Each run also has
server_cpu_ms_per_request: the CPU time the serving side spent per answered request (the
baseline server; the agent and the deployment's replicas), which a loaded machine moves far
less than requests/s: the cost of the path itself.

    python benchmarks/serve.py [--seconds 5] [--clients 16] [--skip-lepton] [--gpus 0]

The model is an untrained digits-shaped MLP (64 inputs, two hidden layers of 64, 10
classes): serving costs the same whatever the weights. Absolute figures depend on the
machine and its load; compare variants of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit, free_port  # noqa: E402

INPUT_DIM = 64
CLASSES = 10
BATCH_ON = {"max_batch": 32, "max_wait_ms": 2}


def make_model(path: Path) -> Path:
    """An untrained digits MLP in the recipes' model format."""
    import torch

    from lepton.workloads.recipes.models import build_model, save_model

    torch.manual_seed(0)
    model = build_model("mlp", [INPUT_DIM], CLASSES)
    save_model(path, model, {"algorithm": "mlp", "task": "classification", "input_shape": [INPUT_DIM],
                             "output_dim": CLASSES, "num_classes": CLASSES, "target_shape": [], "hidden": 64})
    return path


def rows(n: int = 1):
    import numpy as np

    return np.random.default_rng(n).random((n, INPUT_DIM), dtype=np.float32)


class CpuMeter:
    """CPU seconds (user + system) the processes `pids()` names spent between `start()` and
    `stop()`; a process gone meanwhile counts up to its last sample. `by_pid` after `stop()`."""

    def __init__(self, pids):
        self._pids = pids
        self._first: dict[int, float] = {}
        self.by_pid: dict[int, float] = {}

    @staticmethod
    def _cpu(pid: int) -> float | None:
        import psutil

        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return None
        return t.user + t.system

    def start(self) -> None:
        self._first = {pid: c for pid in self._pids() if (c := self._cpu(pid)) is not None}

    def stop(self) -> float:
        self.by_pid = {pid: max(0.0, (self._cpu(pid) or first) - first) for pid, first in self._first.items()}
        return sum(self.by_pid.values())


def measured(meter: CpuMeter, run) -> dict:
    """`run()`'s summary with the server side's CPU per answered request."""
    meter.start()
    out = run()
    cpu_s = meter.stop()
    out["server_cpu_ms_per_request"] = round(cpu_s * 1000 / out["requests"], 4) if out["requests"] else None
    return out


def replica_pids(deployment: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "lepton.workloads.serving.replica" in cmd and deployment in cmd:
            found.append(proc.pid)
    return found


def summary(latencies_s: list[float], errors: int, seconds: float) -> dict:
    ms = sorted(x * 1000 for x in latencies_s)
    if not ms:
        return {"requests_per_s": 0.0, "p50_ms": None, "p99_ms": None, "errors": errors, "requests": 0}
    return {"requests_per_s": round(len(ms) / seconds, 1), "p50_ms": round(statistics.median(ms), 3),
            "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3), "errors": errors,
            "requests": len(ms)}


# -- (a) the model in-process ---------------------------------------------------------------
def in_process(model_path: Path, seconds: float) -> dict:
    from lepton.workloads.serving.replica import Model

    model = Model(model_path, "cpu")
    x = rows()
    model(x)  # warm-up
    latencies, end = [], time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        model(x)
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, 0, seconds)


# -- (b) a minimal grpc.aio server around the same model -----------------------------------
async def baseline_server(model_path: str, port: int) -> None:
    """`--baseline-server`: Inference.Predict calling the model inline, nothing else."""
    import grpc

    from lepton.v1 import serving_pb2, serving_pb2_grpc
    from lepton.workloads.serving.replica import Model
    from lepton.workloads.serving.tensors import check_inputs, to_tensor

    model = Model(model_path, "cpu")

    class Servicer(serving_pb2_grpc.InferenceServicer):
        async def Predict(self, request, context):
            y = model(check_inputs(request.inputs, model.input_shape))
            return serving_pb2.PredictResponse(outputs=to_tensor(y), batch_rows=len(y))

    server = grpc.aio.server()
    serving_pb2_grpc.add_InferenceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# -- the load: N concurrent callers of one address -----------------------------------------
async def load(address: str, deployment: str, clients: int, seconds: float, timeout_s: float = 10.0) -> dict:
    import grpc

    from lepton.client.predict import to_tensor
    from lepton.v1 import serving_pb2, serving_pb2_grpc

    request = serving_pb2.PredictRequest(deployment=deployment, inputs=to_tensor(rows()))
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.InferenceStub(channel)
        await stub.Predict(request, timeout=60)  # connected and warm
        end = time.perf_counter() + seconds

        async def caller() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < end:
                try:
                    await stub.Predict(request, timeout=timeout_s)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(caller() for _ in range(clients)))
    return summary(latencies, errors, seconds)


class BaselineServer:
    """(b) in its own process for the whole run, so it can be measured again right beside
    each Lepton variant (on a shared machine the load drifts between minutes)."""

    def __init__(self, model_path: Path):
        self.address = f"127.0.0.1:{free_port()}"
        self._proc = subprocess.Popen([sys.executable, __file__, "--baseline-server", str(model_path),
                                       "--port", self.address.rsplit(":", 1)[1]], stdout=subprocess.PIPE, text=True)
        if self._proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the baseline server did not start")

    def measure(self, clients: int, seconds: float) -> dict:
        return measured(CpuMeter(lambda: [self._proc.pid]),
                        lambda: asyncio.run(load(self.address, "digits", clients, seconds)))

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


# -- (c) Lepton -----------------------------------------------------------------------------
def lepton(model_path: Path, clients: int, seconds: float, gpus: int, baseline: BaselineServer) -> dict:
    """Each variant's figures, with the baseline measured just before it (`baseline_alongside`)."""
    from lepton.client import Client
    from lepton.common.channels import make_channel
    from lepton.v1 import serving_pb2, serving_pb2_grpc, tasks_pb2
    from lepton.workloads.recipes.models import read_config

    agent = Agent("--cpus", "8", *(["--fake-gpus", "0"] if not gpus else []), name="serve-bench")
    out: dict[str, dict] = {}
    try:
        with Client(agent.address, timeout=60) as client:
            upload_when_ready(client, model_path)
        assert read_config(model_path)["task"] == "classification"
        channel = make_channel(agent.address, aio=False, token="")
        deployments = serving_pb2_grpc.DeploymentsStub(channel)
        for replicas in (1, 2):
            for batching, knobs in (("off", {"max_batch": 1, "max_wait_ms": 0}), ("on", BATCH_ON)):
                name = f"bench-{replicas}r-{batching}"
                spec = serving_pb2.DeploymentSpec(
                    name=name, model="digits-mlp", replicas=replicas, pack=True,
                    resources=tasks_pb2.Resources(cpu=0.5, memory_bytes=256 << 20, gpus=gpus), **knobs)
                deployments.CreateDeployment(serving_pb2.CreateDeploymentRequest(spec=spec), timeout=30)
                wait_ready(deployments, name, replicas)
                beside = baseline.measure(clients, seconds)
                meter = CpuMeter(lambda name=name: [agent.proc.pid, *replica_pids(name)])
                run = measured(meter, lambda name=name: asyncio.run(load(agent.address, name, clients, seconds)))
                if run["requests"]:  # where the serving side's CPU went
                    agent_s = meter.by_pid.get(agent.proc.pid, 0.0)
                    run["agent_cpu_ms_per_request"] = round(agent_s * 1000 / run["requests"], 4)
                    run["replicas_cpu_ms_per_request"] = round(
                        (sum(meter.by_pid.values()) - agent_s) * 1000 / run["requests"], 4)
                run["baseline_alongside"] = beside
                run["rps_over_baseline"] = ratio(run["requests_per_s"], beside["requests_per_s"])
                run["p99_over_baseline"] = ratio(run["p99_ms"], beside["p99_ms"])
                run["cpu_per_request_over_baseline"] = ratio(run["server_cpu_ms_per_request"],
                                                             beside["server_cpu_ms_per_request"])
                out[f"{replicas}_replica{'s' if replicas > 1 else ''}_batching_{batching}"] = run
                deployments.DeleteDeployment(serving_pb2.DeleteDeploymentRequest(name=name), timeout=30)
                wait_gone(deployments, name)
        channel.close()
    finally:
        agent.stop()
    return out


def upload_when_ready(client, model_path: Path, timeout_s: float = 120.0) -> None:
    """The model into the cluster, once the agent's node is ready to hold it (a busy
    machine can take a while to mark a fresh agent ready)."""
    from lepton.common.errors import FailedPrecondition
    from lepton.workloads.recipes.cluster import put_file

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            put_file(client, "digits-mlp", model_path, replicas=1, kind="model")
            return
        except FailedPrecondition:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_ready(deployments, name: str, replicas: int, timeout_s: float = 180.0) -> None:
    from lepton.v1 import serving_pb2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dep = deployments.GetDeployment(serving_pb2.GetDeploymentRequest(name=name), timeout=10)
        if sum(r.state == serving_pb2.REPLICA_READY for r in dep.replicas) >= replicas:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{name}: {replicas} replicas not ready within {timeout_s:g}s ({dep.message})")


def wait_gone(deployments, name: str, timeout_s: float = 60.0) -> None:
    import grpc

    from lepton.v1 import serving_pb2

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            deployments.GetDeployment(serving_pb2.GetDeploymentRequest(name=name), timeout=10)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return
        time.sleep(0.2)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=5.0, help="load time per variant")
    p.add_argument("--clients", type=int, default=16, help="concurrent callers")
    p.add_argument("--skip-lepton", action="store_true", help="only (a) and (b)")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per replica in (c) (a machine with one)")
    p.add_argument("--baseline-server", default="", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_server:
        asyncio.run(baseline_server(args.baseline_server, args.port))
        return
    with tempfile.TemporaryDirectory(prefix="lepton-serve-bench-") as tmp:
        model_path = make_model(Path(tmp) / "digits-mlp.safetensors")
        doc: dict = {"clients": args.clients, "seconds": args.seconds, "model": "digits mlp 64-64-64-10",
                     "cpus": os.cpu_count()}
        doc["in_process"] = in_process(model_path, args.seconds)
        baseline = BaselineServer(model_path)
        try:
            doc["grpc_baseline"] = base = baseline.measure(args.clients, args.seconds)
            runs = lepton(model_path, args.clients, args.seconds, args.gpus, baseline) if not args.skip_lepton else {}
        finally:
            baseline.close()
        doc["ratios"] = {"baseline_rps_over_in_process": ratio(base["requests_per_s"],
                                                               doc["in_process"]["requests_per_s"])}
        if runs:
            doc["lepton"] = runs
            one = runs["1_replica_batching_off"]
            best_on = max((r for k, r in runs.items() if k.endswith("batching_on")), key=lambda r: r["rps_over_baseline"] or 0)
            doc["ratios"].update({  # each against the baseline measured beside it
                "lepton_1_replica_rps_over_baseline": one["rps_over_baseline"],
                "lepton_1_replica_p99_over_baseline": one["p99_over_baseline"],
                "lepton_1_replica_cpu_per_request_over_baseline": one["cpu_per_request_over_baseline"],
                "lepton_batching_on_best_rps_over_baseline": best_on["rps_over_baseline"],
            })
            r = doc["ratios"]
            doc["targets_met"] = {
                "1_replica_rps_ge_0.5x": (r["lepton_1_replica_rps_over_baseline"] or 0) >= 0.5,
                "1_replica_p99_le_2x": (r["lepton_1_replica_p99_over_baseline"] or 99) <= 2.0,
                "batching_on_beats_baseline": (r["lepton_batching_on_best_rps_over_baseline"] or 0) > 1.0,
            }
        emit(doc)


if __name__ == "__main__":
    main()
