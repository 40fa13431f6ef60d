"""Evaluate a saved model on labelled shards: `python -m lepton.workloads.recipes.evaluate
--model model.safetensors [--shards a.npz,b.npz] [--output metrics.json]`.

One process (no torch.distributed); shards default to LEPTON_SHARDS. Prints one JSON object
on stdout (and writes it to --output when given):
  classification: {"algorithm", "task", "examples", "accuracy", "loss"}  (loss: mean cross-entropy)
  regression:     {"algorithm", "task", "examples", "mse"}
Exit codes: 0 done, 2 bad arguments, model or data (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from lepton.common.durable import write_atomic
from lepton.workloads.recipes.data import (
    OUTPUT_MODE,
    load_shards,
    parse_shards,
    shards_from_env,
    task_of_labels,
)
from lepton.workloads.recipes.models import load_model, run_model

__all__ = ["evaluate", "main"]


def evaluate(model_path: str, shards: list[str], *, batch_size: int = 1024) -> dict[str, Any]:
    """The metrics of the model in `model_path` on `shards` (see the module doc).
    Raises ValueError for a model and data that do not fit, FileNotFoundError."""
    model, meta = load_model(model_path)
    x, y = load_shards(shards)
    assert y is not None
    if list(x.shape[1:]) != list(meta["input_shape"]):
        raise ValueError(f"the model takes inputs of shape {meta['input_shape']}, the data has {list(x.shape[1:])}")
    if task_of_labels(y) != meta["task"]:
        raise ValueError(f"the model does {meta['task']}, the labels are for {task_of_labels(y)}")
    out = run_model(model, x, batch_size=batch_size)
    doc: dict[str, Any] = {"algorithm": meta["algorithm"], "task": meta["task"], "examples": int(len(x))}
    if meta["task"] == "classification":
        target = torch.from_numpy(np.array(y, dtype=np.int64))
        if len(target) and int(target.max()) >= int(meta["output_dim"]):
            raise ValueError(f"label {int(target.max())} is beyond the model's {meta['output_dim']} classes")
        doc["accuracy"] = float((out.argmax(dim=1) == target).float().mean()) if len(target) else 0.0
        doc["loss"] = float(F.cross_entropy(out, target)) if len(target) else 0.0
    else:
        target = torch.from_numpy(np.array(y, dtype=np.float32))
        doc["mse"] = float(F.mse_loss(out.reshape(target.shape), target)) if len(target) else 0.0
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lepton.workloads.recipes.evaluate")
    p.add_argument("--model", required=True)
    p.add_argument("--shards", default=None, help="comma-separated (default: $LEPTON_SHARDS)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    shards = parse_shards(args.shards) if args.shards is not None else shards_from_env()
    try:
        doc = evaluate(args.model, shards, batch_size=max(1, args.batch_size))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    text = json.dumps(doc, sort_keys=True)
    if args.output:
        write_atomic(args.output, (text + "\n").encode(), mode=OUTPUT_MODE)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
