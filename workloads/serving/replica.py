"""A deployment's replica: one model, loaded once, answering Predict over a private socket.

    python -m lepton.workloads.serving.replica --model M --deployment S --generation G \
        --max-batch B --max-wait-ms W [--cpus C] [--model-file PATH]

Started by the coordinator's serving loop as a task (TaskSpec.replica set); its agent
passes the socket's path in LEPTON_SERVE_SOCKET (in the attempt's private folder). Steps:
fetch model M (a dataset of kind "model") through the data plane with the task's own
credential (`--model-file` reads a local file instead: tests, benchmarks), load it once with
the recipes' loader (safetensors, no pickle) on cuda:0 when the task was given a GPU and
torch sees one, else on the CPU, then serve `lepton.v1.Inference/Predict` and the standard
gRPC health service on `unix:$LEPTON_SERVE_SOCKET`. Health says NOT_SERVING while loading
and SERVING only after one warm-up prediction went through the batcher.

Predict answers what `lepton.workloads.recipes.predict` writes for the same rows (class
indices, int64, for a classifier; float32 values for regression), from batches of up to
--max-batch rows gathered within --max-wait-ms (batcher.py). Bad inputs are
INVALID_ARGUMENT (tensors.py) and never reach a batch. SIGTERM: NOT_SERVING, no new calls,
the calls in flight finish, exit 0.
This process never imports lepton.agent: it is a task like any other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from lepton.common.errors import Internal, LeptonError, Unavailable
from lepton.common.frames import frames_path
from lepton.common.grpc_util import (
    MAX_MESSAGE_BYTES,
    SERVER_OPTIONS,
    register_service,
    rpc_boundary,
)
from lepton.common.sockets import UnixTarget
from lepton.v1 import serving_pb2, serving_pb2_grpc
from lepton.workloads.serving.batcher import Batcher, BatcherClosed
from lepton.workloads.serving.frame_server import FrameServer
from lepton.workloads.serving.replica_key import KeyGate, no_dumping
from lepton.workloads.serving.tensors import INPUT_DTYPE, MAX_ROWS, check_inputs, to_tensor

logger = logging.getLogger("lepton.replica")

SOCKET_ENV = "LEPTON_SERVE_SOCKET"
# Room above the largest request a forwarding agent passes (it applies MAX_MESSAGE_BYTES), so
# the size checks in tensors.py, not gRPC's, answer an oversized one.
_SERVER_OPTIONS = [(k, MAX_MESSAGE_BYTES + (1 << 20)) if k.startswith("grpc.max_") else (k, v)
                   for k, v in SERVER_OPTIONS]
STOP_GRACE_S = 5.0  # calls in flight at SIGTERM get this long (the task's grace kills after)


def pick_device() -> str:
    """cuda:0 when the task was given a GPU (CUDA_VISIBLE_DEVICES names one) and torch sees
    it; else cpu."""
    import torch

    if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() and torch.cuda.is_available():
        return "cuda:0"
    return "cpu"


class Model:
    """A loaded model and the function a batch goes through."""

    def __init__(self, path: str | os.PathLike[str], device: str):
        import torch

        from lepton.workloads.recipes.models import load_model

        self.module, self.config = load_model(path, device=device)
        self.device = device
        self.input_shape = [int(d) for d in self.config["input_shape"]]
        self._torch = torch

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The predictions for rows `x` (see the module doc); runs in the batcher's thread."""
        from lepton.workloads.recipes.predict import to_predictions

        torch = self._torch
        with torch.inference_mode():
            # np.array: a copy, as the request's buffer is read-only (torch warns on those).
            out = self.module(torch.from_numpy(np.array(x, dtype=INPUT_DTYPE)).to(self.device))
            return to_predictions(out.cpu(), self.config)


class InferenceService(serving_pb2_grpc.InferenceServicer):
    """Predict; UNAVAILABLE until `loaded()` (the router only sends to a READY replica)."""

    def __init__(self, *, replica: str, model_name: str, generation: int):
        self._batcher: Batcher | None = None
        self._input_shape: list[int] = []
        self._answer = {"replica": replica, "model": model_name, "generation": generation}

    def loaded(self, batcher: Batcher, model: Model) -> None:
        self._batcher = batcher
        self._input_shape = model.input_shape

    def start_predict(self, request: serving_pb2.PredictRequest) -> asyncio.Future:
        """Check the request and queue it in the batcher: the future of (rows, batch rows).
        Raises LeptonError (UNAVAILABLE while loading or stopping, INVALID_ARGUMENT)."""
        batcher = self._batcher
        if batcher is None:
            raise Unavailable("the replica is still loading its model")
        x = check_inputs(request.inputs, self._input_shape)
        try:
            return batcher.submit(x)
        except BatcherClosed as err:  # the router tries another replica
            raise Unavailable(str(err)) from None

    def answer(self, future: asyncio.Future) -> serving_pb2.PredictResponse:
        """The response for a finished `start_predict`. Raises LeptonError."""
        try:
            y, rows = future.result()
        except BatcherClosed as err:
            raise Unavailable(str(err)) from None
        except LeptonError:
            raise
        except Exception as err:  # noqa: BLE001 - the model failed on these rows: say so, keep serving
            # INTERNAL, not UNAVAILABLE: the router retries UNAVAILABLE on every other replica,
            # and rows that break the model break it there too.
            logger.warning("prediction failed: %s", err)
            raise Internal(f"the model failed on this request: {err}") from None
        return serving_pb2.PredictResponse(outputs=to_tensor(y), batch_rows=rows, **self._answer)

    @rpc_boundary
    async def Predict(self, request: serving_pb2.PredictRequest, context: Any) -> serving_pb2.PredictResponse:
        future = self.start_predict(request)
        with contextlib.suppress(Exception):  # answer() says what it was
            await future
        return self.answer(future)


def fetch_model(name: str, out: Path) -> Path:
    """Model `name` from the cluster (the task's own credential and LEPTON_SERVER), to `out`."""
    from lepton.workloads.recipes.cluster import _client, get_file

    with _client() as client:
        return get_file(client, name, out)


async def serve(args: argparse.Namespace) -> int:
    socket_path = os.environ.get(SOCKET_ENV, "")
    if not socket_path:
        print(f"error: {SOCKET_ENV} is not set: run this as a deployment's replica task", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    service = InferenceService(replica=os.environ.get("LEPTON_TASK_ID", ""), model_name=args.model,
                               generation=args.generation)
    # --claim-key: only the agent that claimed it may call it, on either socket (replica_key.py).
    gate = KeyGate() if args.claim_key else None
    server = grpc.aio.server(options=_SERVER_OPTIONS, interceptors=[gate] if gate is not None else None)
    register_service(server, health_servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])
    register_service(server, service, serving_pb2.DESCRIPTOR.services_by_name["Inference"])
    frames = FrameServer(service, key_ok=gate.admits if gate is not None else None)
    try:
        target = _bind(server, socket_path)
    except OSError as err:
        print(f"error: cannot serve on {socket_path}: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        await frames.start(frames_path(socket_path))
    except OSError as err:
        target.close()
        print(f"error: cannot serve on {frames_path(socket_path)}: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        await server.start()  # health answers NOT_SERVING while the model loads
        try:
            model = await asyncio.to_thread(_load, args)
        except (ValueError, FileNotFoundError, LeptonError) as err:
            print(f"error: cannot load model {args.model}: {err}", file=sys.stderr, flush=True)
            await server.stop(0)
            return 2
        # A CPU model's cost is its CPU time; a GPU's call waits on the device: wall time.
        batcher = Batcher(model, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
                          cost_clock=time.thread_time if model.device == "cpu" else time.perf_counter)
        try:
            await batcher.predict(np.zeros([1, *model.input_shape], dtype=INPUT_DTYPE))  # warm-up
        except Exception as err:  # noqa: BLE001 - a model that cannot predict never serves
            print(f"error: model {args.model} failed its warm-up prediction: {err}", file=sys.stderr, flush=True)
            await server.stop(0)
            return 2
        service.loaded(batcher, model)
        print(f"replica of {args.deployment} (generation {args.generation}): model {args.model} on "
              f"{model.device}, max batch {batcher.max_batch}, window {args.max_wait_ms} ms, "
              f"{model._torch.get_num_threads()} torch thread(s): warmed up, serving",
              flush=True)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await stop.wait()
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        frames.drain()  # new requests: UNAVAILABLE (the agent tries another replica)
        await server.stop(STOP_GRACE_S)  # refuses new calls; those in flight finish
        await batcher.close()
    finally:
        await frames.close()  # after the batcher: the answers it finished are sent first
        Path(socket_path).unlink(missing_ok=True)
        target.close()
    print(f"replica stopped after {batcher.batches} batches ({batcher.rows} rows)", flush=True)
    return 0


def _bind(server: grpc.aio.Server, socket_path: str) -> UnixTarget:
    """Listen on the socket (a previous attempt's file removed first); a deep data dir's
    path is bound through a handle on its folder. Raises OSError."""
    Path(socket_path).unlink(missing_ok=True)
    target = UnixTarget(socket_path)
    try:
        bound = server.add_insecure_port(target.target)
    except RuntimeError as err:  # newer grpc raises where older ones return 0
        bound = 0
        why = str(err)
    else:
        why = "the address is not usable"
    if not bound:
        target.close()
        raise OSError(why)
    return target


def _load(args: argparse.Namespace) -> Model:
    if args.cpus > 0:
        # Torch's default is a thread per core of the machine: on a busy node that pool
        # waits on itself (a 32-row batch of the digits MLP took 21 ms with 2 threads, 1.5
        # ms with 1, on 2 shared cores). Process-wide, so the batcher's thread has it too.
        import torch

        torch.set_num_threads(max(1, int(args.cpus)))
    device = pick_device()
    if args.model_file:
        return Model(args.model_file, device)
    with tempfile.TemporaryDirectory() as tmp:
        return Model(fetch_model(args.model, Path(tmp) / "model.safetensors"), device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lepton.workloads.serving.replica")
    p.add_argument("--model", required=True, help="the model's name (a dataset of kind model)")
    p.add_argument("--deployment", required=True)
    p.add_argument("--generation", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=1, help="rows per model call at most (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=0.0, help="how long a batch waits to fill")
    p.add_argument("--model-file", default="", help="a local model file instead of fetching --model")
    p.add_argument("--cpus", type=float, default=0.0,
                   help="the replica's CPU allotment: torch's threads (at least 1; 0: torch's default)")
    p.add_argument("--claim-key", action="store_true",
                   help="serve only the caller whose key came first: its agent (replica_key.py)")
    args = p.parse_args(argv)
    if args.max_batch < 1 or args.max_batch > MAX_ROWS or args.max_wait_ms < 0 or args.max_wait_ms > 10_000:
        p.error(f"--max-batch must be 1..{MAX_ROWS} and --max-wait-ms 0..10000")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.claim_key:
        no_dumping()  # before its agent's key reaches this process's memory
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
