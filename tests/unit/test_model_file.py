"""The model file: safetensors plus a JSON config, no pickle; weights round-trip exactly."""

from __future__ import annotations

import io
import json
import struct

import pytest

torch = pytest.importorskip("torch")

from lepton.workloads.recipes.models import (  # noqa: E402
    MODEL_FORMAT,
    build_model,
    load_model,
    read_config,
    save_model,
)

META = {"algorithm": "cnn", "task": "classification", "input_shape": [1, 8, 8], "output_dim": 3,
        "num_classes": 3, "target_shape": [], "hidden": 16, "train_loss": 0.5,
        "metrics": {"train_loss": 0.5, "train_accuracy": 0.75}, "source_dataset": "digits",
        "recipe": "lepton.workloads.recipes.train", "hyperparameters": {"epochs": 2}}


def test_the_file_is_a_safetensors_header_and_raw_weights_only(tmp_path):
    torch.manual_seed(3)
    model = build_model("cnn", [1, 8, 8], 3, hidden=16)
    path = tmp_path / "m.safetensors"
    save_model(path, model, META)
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])  # the header is plain JSON
    body = len(data) - 8 - size
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    # Every byte after the header belongs to exactly one tensor: nothing else (no pickle) fits.
    spans = sorted(tuple(t["data_offsets"]) for t in tensors.values())
    assert spans[0][0] == 0 and spans[-1][1] == body
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert set(tensors) == set(model.state_dict())
    assert b"\x80\x04" not in data[:8 + size] and not data.startswith(b"PK")
    config = json.loads(header["__metadata__"]["config"])
    assert config == read_config(path) == read_config(data)
    assert config["format"] == MODEL_FORMAT
    assert config["architecture"] == {"name": "cnn", "args": {"input_shape": [1, 8, 8], "output_dim": 3, "hidden": 16}}
    assert config["metrics"]["train_accuracy"] == 0.75 and config["source_dataset"] == "digits"

    loaded, meta = load_model(path)
    assert meta == config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k  # bit for bit
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    assert torch.equal(loaded(x), model(x))


def test_pickles_and_other_files_are_refused_without_unpickling(tmp_path):
    old = tmp_path / "old.pt"
    buf = io.BytesIO()
    torch.save({"format": "lepton-model/1", "state_dict": {}}, buf)
    old.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="torch.save .pickle. model file.*train it again"):
        load_model(old)
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match="not a model file"):
        load_model(junk)
    # A safetensors file that is not a Lepton model (no config), and weights that do not fit.
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=f"not a {MODEL_FORMAT} file"):
        load_model(tmp_path / "plain.safetensors")
    save_model(tmp_path / "m", build_model("logreg", [4], 2), {**META, "algorithm": "logreg", "input_shape": [4],
                                                                "output_dim": 2})
    config = read_config(tmp_path / "m")
    wrong = {**config, "architecture": {"name": "mlp", "args": config["architecture"]["args"]}}
    save_file({k: v.contiguous() for k, v in build_model("logreg", [4], 2).state_dict().items()},
              tmp_path / "wrong", metadata={"format": MODEL_FORMAT, "config": json.dumps(wrong)})
    with pytest.raises(ValueError, match="do not fit the model's architecture"):
        load_model(tmp_path / "wrong")


def test_checkpoints_are_safetensors_with_the_optimizer_state(tmp_path):
    from lepton.workloads.recipes.models import load_checkpoint, save_checkpoint_file

    torch.manual_seed(1)
    model = build_model("mlp", [4], 2, hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()  # momentum buffers now exist
    doc = {"format": "x", "epoch": 3, "train_loss": 0.5, "model": model.state_dict(), "optimizer": opt.state_dict()}
    save_checkpoint_file(tmp_path / "epoch_000003.safetensors", doc)
    data = (tmp_path / "epoch_000003.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    assert json.loads(data[8:8 + size])["__metadata__"]["format"] == "lepton-checkpoint/2"
    back = load_checkpoint(tmp_path / "epoch_000003.safetensors")
    assert (back["epoch"], back["train_loss"]) == (3, 0.5)
    fresh = torch.optim.SGD(build_model("mlp", [4], 2, hidden=8).parameters(), lr=1.0)
    fresh.load_state_dict(back["optimizer"])  # the same structure torch wrote
    assert fresh.param_groups[0]["lr"] == 0.1 and fresh.param_groups[0]["momentum"] == 0.9
    for i, state in opt.state_dict()["state"].items():
        assert torch.equal(back["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)
    buf = io.BytesIO()
    torch.save(doc, buf)
    (tmp_path / "old.pt").write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="not a lepton-checkpoint/2 file"):
        load_checkpoint(tmp_path / "old.pt")
