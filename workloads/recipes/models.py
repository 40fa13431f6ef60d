"""The built-in models and the model file the recipes write and read.

Model file (`torch.save` of a dict, loadable with `weights_only=True`):
  format           "lepton-model/1"
  algorithm        "logreg" | "mlp" | "cnn"
  task             "classification" | "regression"
  input_shape      list[int], one example's shape (x.shape[1:])
  output_dim       classes (classification) or targets (regression)
  num_classes      = output_dim for classification, 0 for regression
  target_shape     list[int], one label's shape ([] for (n,) labels)
  hidden           the hidden width
  hyperparameters  dict: epochs, batch_size, lr, momentum, weight_decay, seed, world_size
  train_loss       the mean training loss of the last epoch
  state_dict       the weights (CPU tensors)
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton.common.durable import atomic_writer
from lepton.workloads.recipes import ALGORITHMS
from lepton.workloads.recipes.data import OUTPUT_MODE

__all__ = ["MODEL_FORMAT", "build_model", "load_model", "run_model", "save_atomic", "save_model"]

logger = logging.getLogger(__name__)

MODEL_FORMAT = "lepton-model/1"


class _AddChannel(nn.Module):
    """(n, h, w) images to (n, 1, h, w)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


def build_model(algorithm: str, input_shape: Sequence[int], output_dim: int, *, hidden: int = 64) -> nn.Module:
    """A freshly initialised model (from torch's current RNG state).
    logreg: one linear layer on the flattened input. mlp: two hidden ReLU layers of width
    `hidden`. cnn: two 3x3 conv layers (16, 32 channels), a 2x2 max-pool when the image is
    at least 4x4, global average pooling and a linear head; input (c, h, w) or (h, w).
    Raises ValueError for an unknown algorithm or a shape it cannot take."""
    shape = tuple(int(d) for d in input_shape)
    if output_dim < 1 or hidden < 1:
        raise ValueError(f"output_dim and hidden must be >= 1, not {output_dim}, {hidden}")
    if algorithm == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), output_dim))
    if algorithm == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(shape), hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, output_dim),
        )
    if algorithm == "cnn":
        if len(shape) not in (2, 3):
            raise ValueError(f"cnn takes images of shape (c, h, w) or (h, w), not {shape}")
        layers: list[nn.Module] = []
        if len(shape) == 2:
            layers.append(_AddChannel())
            shape = (1, *shape)
        channels, h, w = shape
        layers += [nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU()]
        if h >= 4 and w >= 4:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, output_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """torch.save through `atomic_writer`: a reader sees the old file or the whole new one,
    also after a crash. Raises OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, mode=OUTPUT_MODE) as f:
        torch.save(obj, f)


def save_model(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the model file (see the module doc) atomically. Raises OSError."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"format": MODEL_FORMAT, **meta, "state_dict": state}, path)


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(the model in eval mode on `device`, its metadata without the weights).
    Raises FileNotFoundError, ValueError for a file that is not a Lepton model."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not a readable model file: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a {MODEL_FORMAT} file")
    meta = {k: v for k, v in doc.items() if k != "state_dict"}
    model = build_model(meta["algorithm"], meta["input_shape"], int(meta["output_dim"]),
                        hidden=int(meta.get("hidden", 64)))
    model.load_state_dict(doc["state_dict"])
    return model.to(device).eval(), meta


@torch.no_grad()
def run_model(model: nn.Module, x: np.ndarray, *, batch_size: int = 1024,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """The model's raw outputs (logits, or regression values) for every row of x, on CPU."""
    outs = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.array(x[i:i + batch_size])).to(device)  # a copy: x may be a read-only mmap
        outs.append(model(xb).cpu())
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)
