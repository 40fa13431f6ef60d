"""Predict with a saved model: `python -m lepton.workloads.recipes.predict --model model.safetensors
--output predictions.npy [--shards a.npz,b.npz] [--probabilities]`.

One process (no torch.distributed); shards default to LEPTON_SHARDS and need no labels.
Writes one .npy with a row per input row, in shard order:
  classification: int64 class indices, shape (n,); with --probabilities, float32 softmax
                  probabilities, shape (n, classes)
  regression:     float32 values, shape (n,) or (n, *target_shape)
Prints {"examples": n, "output": path} as JSON. Exit codes: 0 done, 2 bad arguments, model
or data (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from lepton.common.durable import atomic_writer
from lepton.workloads.recipes.data import OUTPUT_MODE, load_shards, parse_shards, shards_from_env
from lepton.workloads.recipes.models import load_model, run_model

__all__ = ["main", "predict", "to_predictions"]


def predict(model_path: str, shards: list[str], *, probabilities: bool = False,
            batch_size: int = 1024) -> np.ndarray:
    """The predictions of the model in `model_path` for every row of `shards` (see the
    module doc). Raises ValueError for data the model cannot take, FileNotFoundError."""
    model, meta = load_model(model_path)
    x, _ = load_shards(shards, need_labels=False)
    if list(x.shape[1:]) != list(meta["input_shape"]):
        raise ValueError(f"the model takes inputs of shape {meta['input_shape']}, the data has {list(x.shape[1:])}")
    return to_predictions(run_model(model, x, batch_size=batch_size), meta, probabilities=probabilities)


def to_predictions(out: torch.Tensor, meta: dict, *, probabilities: bool = False) -> np.ndarray:
    """The model's raw outputs (on CPU, a row per input row) as the predictions the module
    doc describes; the serving replica answers with the same."""
    if meta["task"] == "classification":
        if probabilities:
            return torch.softmax(out, dim=1).numpy().astype(np.float32)
        return out.argmax(dim=1).numpy().astype(np.int64)
    target_shape = [int(d) for d in meta.get("target_shape", [])]
    return out.reshape(len(out), *target_shape).numpy().astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lepton.workloads.recipes.predict")
    p.add_argument("--model", required=True)
    p.add_argument("--output", required=True, help="the .npy file to write")
    p.add_argument("--shards", default=None, help="comma-separated (default: $LEPTON_SHARDS)")
    p.add_argument("--probabilities", action="store_true")
    p.add_argument("--batch-size", type=int, default=1024)
    args = p.parse_args(argv)
    shards = parse_shards(args.shards) if args.shards is not None else shards_from_env()
    try:
        pred = predict(args.model, shards, probabilities=args.probabilities,
                       batch_size=max(1, args.batch_size))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    with atomic_writer(args.output, mode=OUTPUT_MODE) as f:
        np.save(f, pred)
    print(json.dumps({"examples": int(len(pred)), "output": args.output}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
