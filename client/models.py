"""Trained models in the cluster: datasets of kind "model", told apart from data.

    for m in list_models(c): print(m.name, m.algorithm, m.metrics)
    get_model(c, "digits-mlp").recipe     # {"algorithm": "mlp", "epochs": 10, ...}
    delete_model(c, "digits-mlp")

A model is stored by its training job (`lepton.workloads.recipes.cluster`) as one shard
holding its safetensors file, with a summary of its config as the dataset's labels; what
is here reads those labels only, never the weights. Ownership is a dataset's: everyone may
read, only the owner (or an admin) may remove.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from lepton.common.errors import InvalidArgument, NotFound
from lepton.common.validation import check_dataset_name

from .data import DatasetInfo

if TYPE_CHECKING:
    from .client import Client

__all__ = ["ModelInfo", "delete_model", "get_model", "list_models"]


@dataclass
class ModelInfo:
    name: str
    algorithm: str  # "" for a model stored before models had labels
    task: str
    dataset: str  # the dataset it was trained on
    job: str  # the training job
    recipe: dict[str, Any] = field(default_factory=dict)  # algorithm and hyperparameters
    metrics: dict[str, Any] = field(default_factory=dict)  # train_loss, train_accuracy
    input_shape: str = ""
    classes: int = 0
    owner: str = ""
    version: int = 0
    size: int = 0
    created_at_ms: int = 0

    @classmethod
    def from_dataset(cls, ds: DatasetInfo) -> ModelInfo:
        labels = ds.labels
        recipe, metrics = _json(labels.get("recipe")), _json(labels.get("metrics"))
        classes = labels.get("classes", "")
        return cls(ds.name, str(recipe.get("algorithm", "")), labels.get("task", ""),
                   labels.get("dataset", ""), labels.get("job", ""), recipe, metrics,
                   labels.get("input_shape", ""), int(classes) if classes.isdigit() else 0,
                   ds.owner, ds.version, ds.size, ds.created_at_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _json(text: str | None) -> dict[str, Any]:
    """A label's JSON object, or {} (labels are whatever the putter wrote)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def list_models(client: Client) -> list[ModelInfo]:
    return [ModelInfo.from_dataset(d) for d in client.datasets(kind="model")]


def get_model(client: Client, name: str) -> ModelInfo:
    """The model `name`; NotFound 'model "x" not found', or InvalidArgument saying what
    `name` is when it is a dataset or a checkpoint."""
    check_dataset_name(name, "model name")  # a model is a dataset; the refusal names a model
    try:
        ds = client.dataset(name)
    except NotFound:
        raise NotFound(f'model "{name}" not found') from None
    if ds.kind != "model":
        hint = " (train one with lepton-ctl train --out NAME)" if ds.kind == "data" else ""
        raise InvalidArgument(f'"{name}" is a {_noun(ds.kind)}, not a model{hint}')
    return ModelInfo.from_dataset(ds)


def delete_model(client: Client, name: str) -> ModelInfo:
    """Remove the model (refusing a dataset's name, as `get_model`); PermissionDenied
    unless the caller owns it or is an admin."""
    model = get_model(client, name)
    client.delete_dataset(name)
    return model


def _noun(kind: str) -> str:
    return "dataset" if kind == "data" else kind
