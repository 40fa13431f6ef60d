"""Lepton's built-in training recipes: torchrun-compatible scripts for small models.

Entry points (each runs as `python -m ...`, under torchrun or Lepton's launcher, or alone):
  lepton.workloads.recipes.train     --algorithm {logreg,mlp,cnn}: DDP training, checkpoints, model
  lepton.workloads.recipes.evaluate  a saved model on labelled shards: JSON metrics on stdout
  lepton.workloads.recipes.predict   a saved model on shards: predictions as one .npy file

The shard layout they read is `lepton.workloads.recipes.data` (numpy only, no torch), the model
file format `lepton.workloads.recipes.models`. Importing this package does not import torch.
"""

from __future__ import annotations

ALGORITHMS: tuple[str, ...] = ("logreg", "mlp", "cnn")

__all__ = ["ALGORITHMS"]
