"""The built-in models and the model file the recipes write and read.

Model file: safetensors (https://github.com/huggingface/safetensors), no pickle anywhere:
  8 bytes     little-endian length N of the header
  N bytes     the header, JSON: each tensor's dtype, shape and offsets, and `__metadata__`
              {"format": "lepton-model/2", "config": <the config, JSON text>}
  the rest    the weights (the state_dict's tensors, raw little-endian)
Config (JSON; `read_config` reads it without torch):
  format           "lepton-model/2"
  architecture     {"name": "logreg" | "mlp" | "cnn", "args": {"input_shape", "output_dim",
                   "hidden"}}: what `build_model` takes, so loading builds the model from it
  algorithm        = architecture.name
  task             "classification" | "regression"
  input_shape      list[int], one example's shape (x.shape[1:])
  output_dim       classes (classification) or targets (regression)
  num_classes      = output_dim for classification, 0 for regression
  target_shape     list[int], one label's shape ([] for (n,) labels)
  hidden           the hidden width
  recipe           the recipe module that trained it ("lepton.workloads.recipes.train")
  hyperparameters  dict: epochs, batch_size, lr, momentum, weight_decay, seed, world_size
  metrics          dict: train_loss (the last epoch's mean), train_accuracy (classification)
  train_loss       = metrics.train_loss
  source_dataset   the dataset it was trained on ("" when trained on local shards)
Files of the first format (`torch.save`, "lepton-model/1") are refused: retrain.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lepton.common.durable import write_atomic
from lepton.workloads.recipes import ALGORITHMS
from lepton.workloads.recipes.data import OUTPUT_MODE

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "build_model",
    "load_checkpoint",
    "load_model",
    "read_config",
    "run_model",
    "save_checkpoint_file",
    "save_model",
]

logger = logging.getLogger(__name__)

MODEL_FORMAT = "lepton-model/2"
CHECKPOINT_FORMAT = "lepton-checkpoint/2"
MAX_HEADER = 1 << 20  # a few tensors' entries and the config: far below this


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


def save_model(path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the model file (see the module doc) atomically; `meta` is the config without
    format and architecture. Raises OSError."""
    from safetensors.torch import save

    config = {"format": MODEL_FORMAT, "architecture": {"name": meta["algorithm"], "args": {
        "input_shape": list(meta["input_shape"]), "output_dim": int(meta["output_dim"]),
        "hidden": int(meta.get("hidden", 64))}}, **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata={"format": MODEL_FORMAT, "config": json.dumps(config, sort_keys=True)})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=OUTPUT_MODE)


def read_config(data: bytes | str | os.PathLike[str]) -> dict[str, Any]:
    """The config of a model file (its bytes or its path), from the safetensors header alone
    (the weights are not read). Raises ValueError for anything but a Lepton model file,
    FileNotFoundError."""
    if not isinstance(data, bytes):
        with open(data, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            data = head + f.read(min(size, MAX_HEADER))
    size = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    if not 2 <= size <= MAX_HEADER or len(data) < 8 + size or data[8:9] != b"{":
        if data[:2] == b"PK":  # torch.save's zip: never unpickled here
            raise ValueError(f"a torch.save (pickle) model file: models are {MODEL_FORMAT} "
                             f"(safetensors) now; train it again")
        raise ValueError("not a model file (no safetensors header)")
    try:
        header = json.loads(data[8:8 + size])
        meta = header["__metadata__"]
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, not {MODEL_FORMAT}")
        config = json.loads(meta["config"])
        arch = config["architecture"]
        if not isinstance(arch["args"], dict) or config.get("format") != MODEL_FORMAT:
            raise ValueError("a malformed architecture")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a {MODEL_FORMAT} file: {err}") from err
    return config


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(the model in eval mode on `device`, its config): built from the config's
    architecture, then the weights loaded. Raises FileNotFoundError, ValueError for a
    file that is not a Lepton model or whose weights do not fit its architecture."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = Path(path).read_bytes()
    try:
        config = read_config(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    arch = config["architecture"]
    try:
        args = arch["args"]
        model = build_model(arch["name"], [int(d) for d in args["input_shape"]], int(args["output_dim"]),
                            hidden=int(args.get("hidden", 64)))
        model.load_state_dict(load(data), strict=True)
    except (ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path}: the weights do not fit the model's architecture: {err}") from err
    return model.to(device).eval(), config


def save_checkpoint_file(path: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Write a training checkpoint as safetensors, atomically: `doc["model"]` (a state_dict)
    as tensors `model.<key>`, `doc["optimizer"]` (an optimizer's state_dict) as tensors
    `optimizer.<param index>.<name>` with its param_groups and non-tensor state as JSON in
    the metadata, and the rest of `doc` (JSON values: epoch, train_loss...) as `meta`."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in doc["model"].items()}
    other: dict[str, dict[str, Any]] = {}
    for index, state in doc["optimizer"]["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(index), {})[name] = value
    meta = {k: v for k, v in doc.items() if k not in ("model", "optimizer")}
    write_atomic(path, save(tensors, metadata={
        "format": CHECKPOINT_FORMAT, "meta": json.dumps(meta),
        "param_groups": json.dumps(doc["optimizer"]["param_groups"]), "optimizer_other": json.dumps(other),
    }), mode=OUTPUT_MODE)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `save_checkpoint_file` wrote, as the same dict. Raises ValueError for another
    file (a torch.save one included: never unpickled), OSError."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"not a {CHECKPOINT_FORMAT} file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iteration
        doc = json.loads(metadata["meta"])
        state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in json.loads(metadata["optimizer_other"]).items()}
        doc["model"] = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        doc["optimizer"] = {"state": state, "param_groups": json.loads(metadata["param_groups"])}
    except (SafetensorError, KeyError, TypeError) as err:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} file: {err}") from err
    return doc


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
