"""Models apart from data (issue 17), on a real agent with TLS and auth: `models list|show|rm`,
`data ls` hiding models and checkpoints unless --all, data commands refusing a model's name,
evaluate/predict refusing a dataset's name in one line, and owners of models.

The model is stored as its training job stores it (`recipes.cluster.put_file` with kind
"model" and `model_labels` of a real model file), without running a job: the job itself is
covered by test_ml_cli."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton.client import Client
from tests.integration.cluster import run_ctl, wait_until

torch = pytest.importorskip("torch")

from lepton.workloads.recipes.cluster import model_labels, put_file  # noqa: E402
from lepton.workloads.recipes.models import build_model, read_config, save_model  # noqa: E402

pytestmark = pytest.mark.integration

USERS = {"alice": "user", "bob": "user", "vic": "viewer"}


@pytest.fixture
def cluster(agents, tmp_path):
    """One agent with --tls-dir and --auth; ctl(user, *args) runs lepton-ctl as that user,
    client(user) opens a Client as that user."""
    d = str(tmp_path / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    for name, role in USERS.items():
        run_ctl("certs", "issue", name, "--kind", "user", "--role", role, "--dir", d, server="-", check=True)
    node = agents("solo", "--tls-dir", d, "--auth")

    def ctl(user: str, *args: str, check: bool = False):
        return run_ctl("--tls-dir", d, "--cert-name", user, *args, server=node.address, check=check)

    def client(user: str) -> Client:
        return Client(node.address, tls_dir=d, cert_name=user)

    def ready() -> bool:
        out = ctl("vic", "-o", "json", "nodes", "list")
        return out.returncode == 0 and any(n["state"] == "ready" for n in json.loads(out.stdout))

    wait_until(ready, timeout=60, what="node ready")
    return ctl, client


def one_line_refusal(out, says: str) -> None:
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert len(out.stderr.splitlines()) == 1 and says in out.stderr and "Traceback" not in out.stderr, out.stderr


def names(out) -> dict[str, str]:
    assert out.returncode == 0, out.stderr
    return {d["name"]: d["kind"] for d in json.loads(out.stdout)}


def test_models_apart_from_data(cluster, tmp_path):
    ctl, client = cluster
    np.savez(tmp_path / "d.npz", x=np.ones((40, 4), dtype=np.float32), y=np.zeros(40, dtype=np.int64))
    ctl("alice", "data", "put", str(tmp_path / "d.npz"), "--name", "digits", "--replicas", "1", check=True)
    meta = {"algorithm": "mlp", "task": "classification", "input_shape": [4], "output_dim": 2,
            "num_classes": 2, "target_shape": [], "hidden": 8, "train_loss": 0.25,
            "recipe": "lepton.workloads.recipes.train", "source_dataset": "digits",
            "metrics": {"train_loss": 0.25, "train_accuracy": 0.875},
            "hyperparameters": {"epochs": 3, "batch_size": 16, "lr": 0.05, "world_size": 1}}
    save_model(tmp_path / "model.safetensors", build_model("mlp", [4], 2, hidden=8), meta)
    (tmp_path / "epoch_000001.safetensors").write_bytes(b"checkpoint bytes")
    with client("alice") as c:
        labels = model_labels(read_config(tmp_path / "model.safetensors"), "j-123")
        put_file(c, "digits-mlp", tmp_path / "model.safetensors", replicas=1, kind="model", labels=labels)
        put_file(c, "ckpt-j-123", tmp_path / "epoch_000001.safetensors", replicas=1, kind="checkpoint")
        tasks_before = len(c.tasks())

    # `data ls` lists data only; --all adds models and checkpoints, with their kind.
    assert names(ctl("vic", "-o", "json", "data", "ls")) == {"digits": "data"}
    assert names(ctl("vic", "-o", "json", "data", "ls", "--all")) == {
        "digits": "data", "digits-mlp": "model", "ckpt-j-123": "checkpoint"}
    table = ctl("vic", "data", "ls", "--all", check=True).stdout
    assert "KIND" in table and "checkpoint" in table
    assert "digits-mlp" not in ctl("vic", "data", "ls", check=True).stdout

    # models list / show: recipe, metrics, source dataset, from the labels; anyone may read.
    listed = json.loads(ctl("bob", "-o", "json", "models", "list", check=True).stdout)
    assert [m["name"] for m in listed] == ["digits-mlp"]
    m = listed[0]
    assert (m["algorithm"], m["task"], m["dataset"], m["job"], m["owner"]) == (
        "mlp", "classification", "digits", "j-123", "alice")
    assert m["metrics"] == {"train_loss": 0.25, "train_accuracy": 0.875}
    assert m["recipe"]["epochs"] == 3 and m["recipe"]["hidden"] == 8 and m["classes"] == 2
    shown = ctl("vic", "models", "show", "digits-mlp", check=True).stdout
    assert "trained on dataset digits by job j-123" in shown
    assert "metrics: train_accuracy=0.875 train_loss=0.25" in shown and "epochs=3" in shown
    assert "digits-mlp" in ctl("vic", "models", "list", check=True).stdout

    # Each command says which is which, in one line, before anything runs.
    one_line_refusal(ctl("alice", "models", "show", "digits"), '"digits" is a dataset, not a model')
    one_line_refusal(ctl("alice", "models", "rm", "ckpt-j-123"), '"ckpt-j-123" is a checkpoint, not a model')
    one_line_refusal(ctl("alice", "models", "show", "nope"), 'model "nope" not found')
    one_line_refusal(ctl("alice", "data", "show", "digits-mlp"), '"digits-mlp" is a model, not a dataset')
    one_line_refusal(ctl("alice", "data", "rm", "digits-mlp"), "lepton-ctl models rm digits-mlp")
    one_line_refusal(ctl("alice", "data", "get", "digits-mlp", str(tmp_path / "out.npz")), "is a model")
    one_line_refusal(ctl("alice", "data", "process", "digits-mlp", "--steps", "normalize", "--out", "x"),
                     '"digits-mlp" is a model, not a dataset')
    one_line_refusal(ctl("alice", "data", "split", "digits-mlp", "--fractions", "0.5,0.5", "--out", "a,b"),
                     '"digits-mlp" is a model, not a dataset')
    one_line_refusal(ctl("alice", "evaluate", "digits", "--dataset", "digits"), '"digits" is a dataset, not a model')
    one_line_refusal(ctl("alice", "predict", "digits", "--dataset", "digits", "--out", "p"),
                     '"digits" is a dataset, not a model')
    one_line_refusal(ctl("alice", "predict", "digits-mlp", "--dataset", "ckpt-j-123", "--out", "p"),
                     '"ckpt-j-123" is a checkpoint, not a dataset')
    one_line_refusal(ctl("alice", "train", "--algorithm", "mlp", "--dataset", "digits-mlp", "--out", "m2"),
                     '"digits-mlp" is a model, not a dataset')
    assert not (tmp_path / "out.npz").exists()
    one_line_refusal(ctl("alice", "data", "put", str(tmp_path / "d.npz"), "--name", "digits-mlp", "--replicas", "1"),
                     '"digits-mlp" is a model; remove it before putting a dataset by that name')
    with client("vic") as c:
        assert len(c.tasks()) == tasks_before  # nothing was submitted
        assert c.dataset("digits-mlp").kind == "model"  # data rm left it alone

    # Only the owner removes a model.
    one_line_refusal(ctl("bob", "models", "rm", "digits-mlp"), "belongs to alice")
    removed = json.loads(ctl("alice", "-o", "json", "models", "rm", "digits-mlp", check=True).stdout)
    assert removed["name"] == "digits-mlp"
    empty = ctl("alice", "models", "list", check=True)
    assert empty.stdout == "" and empty.stderr == "no models\n"
    assert names(ctl("vic", "-o", "json", "data", "ls", "--all")) == {"digits": "data", "ckpt-j-123": "checkpoint"}
