"""Train a built-in model with DDP: `python -m lepton.workloads.recipes.train --algorithm mlp ...`.

Runs under torchrun or Lepton's launcher (torch.distributed's `env://` variables: RANK,
WORLD_SIZE, MASTER_ADDR...), or alone as one process when RANK is unset. Backend: nccl when
CUDA is available (device cuda:LOCAL_RANK), else gloo on CPU; --backend overrides.

Data: each rank reads its own shards (LEPTON_SHARDS, or --shards; layout in
`lepton.workloads.recipes.data`). Labels' dtype picks the task: integer -> classification
(cross-entropy; classes = the largest label on any rank + 1), float -> regression (MSE).
Features are used as they are: normalise them beforehand.

Batching, and why W ranks equal one process:
- --batch-size is per rank (torchrun's convention); the global batch is W x batch-size.
- A rank cuts its rows, in shard order, into contiguous batches of exactly batch-size rows.
  Every rank takes the same number of steps per epoch, the smallest count any rank has
  (rows beyond it are not used: drop-last); a rank with less than one batch is an error.
- Shuffling permutes the order of the batches each epoch, with the same permutation on every
  rank (seeded by --seed and the epoch). The rows of a batch stay together.
- DDP averages the ranks' gradients, each the mean over batch-size rows, so one step is a
  step on the mean loss over the W x batch-size rows of the W ranks' k-th batches.
Hence W ranks with batch-size b train exactly (to float summation order) like one process
with batch-size W x b on one shard whose k-th block of W x b rows is rank 0's k-th batch,
then rank 1's, ... The models have no dropout, and the initial weights come from --seed
(DDP broadcasts rank 0's anyway).

Checkpoints: after each epoch rank 0 writes `epoch_<NNNNNN>.safetensors` (model and
optimizer state, epochs completed; `models.save_checkpoint_file`: no pickle) atomically
into the checkpoint dir (--checkpoint-dir, default LEPTON_CHECKPOINT_DIR; none: no
checkpoints) and keeps the newest --keep-checkpoints. At
start rank 0 loads the newest readable one and broadcasts it, so only rank 0's node needs
the dir; training resumes at the next epoch with the same batch order an uninterrupted run
would have had, so a resumed run ends with the same weights.

Output: rank 0 writes the model file (`lepton.workloads.recipes.models`) to --output.
Exit codes: 0 done, 2 bad arguments or data (message on stderr), other: a crash.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: this module's functions take
# `group=group.WORLD` as a default argument, evaluated on import. DDP imports it lazily,
# after init_process_group, and those ten defaults then pin the world group for ever:
# destroy_process_group() cannot free it, so gloo's threads (and rank 0's TCPStore
# server thread) stay alive through interpreter exit, where a rank can abort (SIGABRT).
import torch.distributed.nn.functional  # noqa: F401
from torch import nn

from lepton.workloads.recipes import ALGORITHMS
from lepton.workloads.recipes.data import load_shards, parse_shards, shards_from_env, task_of_labels
from lepton.workloads.recipes.models import (
    CHECKPOINT_FORMAT,
    build_model,
    load_checkpoint,
    save_checkpoint_file,
    save_model,
)

logger = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^epoch_(\d{6,})\.safetensors$")


class UsageError(Exception):
    """Bad arguments or data: exit code 2, one line on stderr."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lepton.workloads.recipes.train", description=__doc__.split("\n")[0])
    p.add_argument("--algorithm", required=True, choices=ALGORITHMS)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hidden", type=int, default=64, help="hidden width (mlp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-shuffle", action="store_true", help="keep the batch order fixed")
    p.add_argument("--shards", default=None, help="comma-separated shard paths (default: $LEPTON_SHARDS)")
    p.add_argument("--checkpoint-dir", default=None, help="default: $LEPTON_CHECKPOINT_DIR")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--output", default=None, help="the model file rank 0 writes at the end")
    p.add_argument("--source-dataset", default="", help="the dataset's name, recorded in the model")
    p.add_argument("--backend", default=None, choices=("gloo", "nccl"))
    p.add_argument("--dist-timeout-s", type=float, default=600.0)
    # Fault injection for tests: rank 0 SIGKILLs itself once epoch N's checkpoint is saved.
    p.add_argument("--crash-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "hidden", "keep_checkpoints"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    return args


# ---- distributed plumbing -------------------------------------------------------------

class Dist:
    """Rank, world size and device; collectives that are no-ops in a single process."""

    def __init__(self, backend: str | None, timeout_s: float):
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = backend
        if self.distributed:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=self.device if backend == "nccl" else None)

    def all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        """Destroy the process group, which joins gloo's threads: none may be left running
        into interpreter exit (see the torch.distributed.nn.functional import)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


# ---- checkpoints ----------------------------------------------------------------------

def checkpoint_paths(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(epochs completed, path) of the checkpoints in `ckpt_dir`, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), ckpt_dir / name) for name in os.listdir(ckpt_dir)
             if (m := _CKPT_RE.match(name))]
    return sorted(found, reverse=True)


def load_latest_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint that reads back whole, or None."""
    for epoch, path in checkpoint_paths(ckpt_dir):
        try:
            doc = load_checkpoint(path)
        except Exception as err:  # unreadable: try the one before
            logger.warning("skipping checkpoint %s: %s", path, err)
            continue
        if doc.get("epoch") == epoch:
            return doc
        logger.warning("skipping checkpoint %s: not a %s file", path, CHECKPOINT_FORMAT)
    return None


def save_checkpoint(ckpt_dir: Path, doc: dict[str, Any], keep: int) -> Path:
    """Write `epoch_<N>.safetensors`, then drop all but the newest `keep`. Raises OSError."""
    path = ckpt_dir / f"epoch_{doc['epoch']:06d}.safetensors"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint_file(path, doc)
    for _, old in checkpoint_paths(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


# ---- training -------------------------------------------------------------------------

def _targets(y: np.ndarray, task: str) -> torch.Tensor:
    if task == "classification":
        return torch.from_numpy(np.array(y, dtype=np.int64))  # a copy: shards may be read-only mmaps
    return torch.from_numpy(np.array(y, dtype=np.float32))


def batch_order(steps: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The batch indices of one epoch, the same on every rank and across restarts."""
    if not shuffle:
        return list(range(steps))
    return np.random.default_rng([seed, epoch]).permutation(steps).tolist()


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training; returns the final model's metadata (on every rank).
    Raises UsageError for bad data or arguments."""
    d = Dist(args.backend, args.dist_timeout_s)
    try:
        return _train(args, d)
    finally:
        d.close()


def _train(args: argparse.Namespace, d: Dist) -> dict[str, Any]:
    shards = parse_shards(args.shards) if args.shards is not None else shards_from_env()
    x, y = load_shards(shards)
    assert y is not None
    task = task_of_labels(y)
    input_shape = list(x.shape[1:])

    # Every rank must agree on the task and feature shape; classes come from all ranks.
    dims = [float(task == "classification"), float(len(input_shape)), *map(float, input_shape[:4])]
    dims += [0.0] * (6 - len(dims))
    lo, hi = d.all_reduce(dims, dist.ReduceOp.MIN), d.all_reduce(dims, dist.ReduceOp.MAX)
    if lo != hi:
        raise UsageError("ranks disagree on the task (label dtype) or the feature shape")
    if task == "classification":
        if y.min() < 0:
            raise UsageError("class labels must be >= 0")
        output_dim = int(d.all_reduce([float(y.max())], dist.ReduceOp.MAX)[0]) + 1
        target_shape: list[int] = []
    else:
        target_shape = list(y.shape[1:])
        output_dim = int(np.prod(target_shape)) if target_shape else 1
    steps = int(d.all_reduce([float(len(x) // args.batch_size)], dist.ReduceOp.MIN)[0])
    if steps < 1:
        raise UsageError(f"a rank has fewer rows than one batch of {args.batch_size}")

    torch.manual_seed(args.seed)
    model = build_model(args.algorithm, input_shape, output_dim, hidden=args.hidden).to(d.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()

    ckpt_value = (args.checkpoint_dir if args.checkpoint_dir is not None
                  else os.environ.get("LEPTON_CHECKPOINT_DIR", ""))
    ckpt_dir = Path(ckpt_value) if ckpt_value else None
    start_epoch, last_loss = 0, float("nan")
    ckpt = load_latest_checkpoint(ckpt_dir) if (ckpt_dir is not None and d.rank == 0) else None
    ckpt = d.broadcast(ckpt)
    if ckpt is not None:
        if ckpt.get("algorithm") != args.algorithm or list(ckpt.get("input_shape", [])) != input_shape \
                or ckpt.get("output_dim") != output_dim:
            raise UsageError(f"the checkpoint in {ckpt_dir} is for another model "
                             f"({ckpt.get('algorithm')}, input {ckpt.get('input_shape')})")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, last_loss = int(ckpt["epoch"]), float(ckpt.get("train_loss", float("nan")))
        if d.rank == 0:
            print(f"resumed from checkpoint: {start_epoch} epoch(s) done", flush=True)

    net: nn.Module = model
    if d.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    yt = _targets(y, task)
    b = args.batch_size
    for epoch in range(start_epoch, args.epochs):
        net.train()
        total = 0.0
        for k in batch_order(steps, args.seed, epoch, not args.no_shuffle):
            xb = torch.from_numpy(np.array(x[k * b:(k + 1) * b])).to(d.device)  # copy: see _targets
            yb = yt[k * b:(k + 1) * b].to(d.device)
            optimizer.zero_grad(set_to_none=True)
            out = net(xb)
            loss = loss_fn(out, yb) if task == "classification" else loss_fn(out.reshape(yb.shape), yb)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        last_loss = d.all_reduce([total / steps])[0] / d.world_size
        if d.rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs} loss {last_loss:.6f}", flush=True)
            if ckpt_dir is not None:
                save_checkpoint(ckpt_dir, {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "algorithm": args.algorithm,
                    "input_shape": input_shape, "output_dim": output_dim, "train_loss": last_loss,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                }, args.keep_checkpoints)
            if args.crash_after_epoch is not None and epoch + 1 == args.crash_after_epoch:
                print(f"crash injected after epoch {epoch + 1}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    metrics = {"train_loss": last_loss}
    if task == "classification":
        metrics["train_accuracy"] = _accuracy(model, x, y, d)
    meta: dict[str, Any] = {
        "algorithm": args.algorithm, "task": task, "input_shape": input_shape,
        "output_dim": output_dim, "num_classes": output_dim if task == "classification" else 0,
        "target_shape": target_shape, "hidden": args.hidden, "train_loss": last_loss,
        "recipe": "lepton.workloads.recipes.train", "metrics": metrics,
        "source_dataset": args.source_dataset,
        "hyperparameters": {
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "momentum": args.momentum, "weight_decay": args.weight_decay, "seed": args.seed,
            "world_size": d.world_size, "shuffle": not args.no_shuffle,
        },
    }
    if d.rank == 0 and args.output:
        save_model(args.output, model, meta)
        print(f"model written to {args.output}", flush=True)
    return meta


@torch.no_grad()
def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, d: Dist, batch_size: int = 4096) -> float:
    """The trained model's accuracy over every rank's rows (all of them, drop-last aside)."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.array(x[i:i + batch_size])).to(d.device)
        correct += int((model(xb).argmax(dim=1).cpu() == torch.from_numpy(np.array(y[i:i + batch_size]))).sum())
    hits, rows = d.all_reduce([float(correct), float(len(x))])
    return hits / rows if rows else 0.0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
