"""The recipes as cluster tasks: models and predictions live in the data plane.

    python -m lepton.workloads.recipes.cluster train --model-name M --algorithm mlp ...
    python -m lepton.workloads.recipes.cluster evaluate --model M --dataset D
    python -m lepton.workloads.recipes.cluster predict --model M --dataset D --out P

`train` runs under a torch job (every rank); rank 0 stores the final model (the safetensors
file `models.save_model` writes) as dataset M of kind "model": the file's bytes as one uint8
column, so any agent can fetch it, verified, like any shard, and its config's summary as the
dataset's labels (`model_labels`: what `lepton-ctl models list|show` print without fetching
the file). `evaluate` and `predict` are single tasks that fetch the model and the dataset,
and print JSON / store dataset P.
The cluster is found through LEPTON_SERVER, which agents set for every task.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def _client():
    from lepton.client import Client

    servers = os.environ.get("LEPTON_SERVER", "")
    if not servers:
        raise SystemExit("LEPTON_SERVER is not set: run this as a Lepton task")
    # With TLS on, the agent also sets LEPTON_TLS_DIR and LEPTON_CERT_NAME for its tasks.
    # A job rides out a coordinator restart: the whole budget, not the CLI's quick 2 s.
    return Client(servers, timeout=60, connect_timeout=60, tls_dir=os.environ.get("LEPTON_TLS_DIR") or None,
                  cert_name=os.environ.get("LEPTON_CERT_NAME") or None)


def put_file(client, name: str, path: Path, *, replicas: int = 2, kind: str = "data",
             labels: dict[str, str] | None = None) -> None:
    """Store a file's bytes as dataset `name` (one shard, one uint8 column) of `kind`."""
    from lepton.common.errors import FailedPrecondition
    from lepton.dataplane import shard_format as fmt
    from lepton.v1 import datasets_pb2 as dpb

    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, 1)
    recs = fmt.make_records(data, None)
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "0.npy"
        sid, size = fmt.write_shard(recs, shard)
        meta = dpb.Shard(id=sid, size=size, **fmt.describe(recs))
        put = functools.partial(client.put_shards, name, [meta], {sid: shard}, source=path.name,
                                kind=kind, labels=labels)
        try:
            put(replicas=replicas)
        except FailedPrecondition:  # fewer ready nodes than replicas: one copy beats none
            if replicas == 1:
                raise
            put(replicas=1)


def model_labels(config: dict[str, Any], job_id: str = "") -> dict[str, str]:
    """A model config's summary as dataset labels: its recipe (algorithm and
    hyperparameters, JSON), metrics (JSON), source dataset, task, input shape, classes and
    the job that trained it. A value past the labels' limit is left out (the file has all)."""
    from lepton.common.validation import MAX_LABEL_VALUE

    recipe = {"algorithm": config["algorithm"], "hidden": config.get("hidden"),
              **config.get("hyperparameters", {})}
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in config.get("metrics", {}).items()}
    labels = {
        "recipe": json.dumps(recipe, sort_keys=True, separators=(",", ":")),
        "metrics": json.dumps(metrics, sort_keys=True, separators=(",", ":")),
        "dataset": config.get("source_dataset", ""),
        "task": config.get("task", ""),
        "input_shape": "x".join(str(d) for d in config.get("input_shape", [])),
        "classes": str(config.get("num_classes", 0)),
        "job": job_id,
    }
    return {k: v for k, v in labels.items() if v and len(v) <= MAX_LABEL_VALUE}


def get_file(client, name: str, out: Path) -> Path:
    """The bytes `put_file` stored under `name`, written to `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        arrays = Path(tmp) / "m.npz"
        client.get_dataset(name, arrays)
        with np.load(arrays) as z:
            out.write_bytes(np.ascontiguousarray(z["x"]).tobytes())
    return out


def get_shards(client, name: str, tmp: Path) -> list[str]:
    """Every shard of dataset `name`, fetched into `tmp`; their paths in order."""
    out = tmp / "data"
    client.download_shards(name, out)
    return [str(p) for p in sorted(out.glob("shard-*.npy"))]


def cmd_train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="cluster train", add_help=False)
    p.add_argument("--model-name", required=True)
    p.add_argument("--source-dataset", default="")
    args, rest = p.parse_known_args(argv)
    from lepton.client.facade import MODEL_FILE
    from lepton.workloads.recipes import train
    from lepton.workloads.recipes.models import read_config

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / MODEL_FILE
        code = train.main([*rest, "--source-dataset", args.source_dataset, "--output", str(model)])
        if code == 0 and os.environ.get("RANK", "0") == "0":
            labels = model_labels(read_config(model), os.environ.get("LEPTON_JOB_ID", ""))
            with _client() as client:
                put_file(client, args.model_name, model, kind="model", labels=labels)
            print(f"stored model {args.model_name} ({model.stat().st_size} bytes)", flush=True)
    return code


def _model_and_dataset_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    return p


@contextlib.contextmanager
def _fetched(args: argparse.Namespace) -> Iterator[tuple[Any, Path, Path, list[str]]]:
    """(client, scratch folder, model file, shard paths): `--model` and `--dataset` fetched
    into a scratch folder that is gone afterwards."""
    with tempfile.TemporaryDirectory() as tmp, _client() as client:
        model = get_file(client, args.model, Path(tmp) / "model.safetensors")
        yield client, Path(tmp), model, get_shards(client, args.dataset, Path(tmp))


def cmd_evaluate(argv: list[str]) -> int:
    args = _model_and_dataset_parser("cluster evaluate").parse_args(argv)
    from lepton.workloads.recipes import evaluate

    with _fetched(args) as (_, _, model, shards):
        return evaluate.main(["--model", str(model), "--shards", ",".join(shards)])


def cmd_predict(argv: list[str]) -> int:
    p = _model_and_dataset_parser("cluster predict")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from lepton.workloads.recipes import predict

    with _fetched(args) as (client, tmp, model, shards):
        preds = tmp / "predictions.npy"
        os.environ["LEPTON_SHARDS"] = ",".join(shards)
        code = predict.main(["--model", str(model), "--output", str(preds)])
        if code:
            return code
        client.put_dataset(preds, args.out, replicas=1)  # derived data: one copy
        print(json.dumps({"predictions": args.out, "rows": int(len(np.load(preds)))}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict}
    if not args or args[0] not in commands:
        print(f"usage: python -m lepton.workloads.recipes.cluster {{{','.join(commands)}}} ...",
              file=sys.stderr)
        return 2
    return commands[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
