"""lepton-ctl train / evaluate / predict against a real agent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lepton.client import Client
from tests.integration.cluster import run_ctl, wait_until

# Torch workers are started from inside the task: see tasks_exec_python (conftest).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("tasks_exec_python")]


@pytest.mark.timeout(600)  # three torch tasks, then each pre-launch check, on a shared machine
def test_train_evaluate_predict_from_the_command_line(agents, tmp_path):
    node = agents("solo")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int64")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with Client(node.address) as c:
        # The agent is up before its node registers: placing a replica needs it ready.
        wait_until(lambda: any(n.state == "ready" for n in c.nodes()), what="node ready")
        c.put_dataset(tmp_path / "d.npz", "lin", shards=2, replicas=1)
    out = run_ctl("train", "--algorithm", "logreg", "--dataset", "lin", "--epochs", "5",
                  "--lr", "0.1", "--out", "lin-model", server=node.address, timeout=240)
    assert out.returncode == 0, out.stderr
    # The job id at once on stderr, the ranks' epoch losses streamed, the model's name last.
    assert out.stderr.startswith("lepton-ctl: job j-"), out.stderr
    assert out.stdout.strip().splitlines()[-1] == "lin-model"
    assert "[rank 0] epoch 5/5 loss " in out.stdout
    assert "no stored checkpoint" not in out.stdout + out.stderr
    # The job stored a model (and its checkpoints) apart from data, with its recipe and metrics.
    shown = json.loads(run_ctl("-o", "json", "models", "show", "lin-model", server=node.address).stdout)
    assert (shown["algorithm"], shown["dataset"], shown["task"]) == ("logreg", "lin", "classification")
    assert shown["recipe"]["epochs"] == 5 and shown["job"].startswith("j-")
    assert 0.9 < shown["metrics"]["train_accuracy"] <= 1.0 and shown["metrics"]["train_loss"] > 0
    listed = json.loads(run_ctl("-o", "json", "data", "ls", server=node.address).stdout)
    assert [d["name"] for d in listed] == ["lin"]
    every = {d["name"]: d["kind"] for d in json.loads(
        run_ctl("-o", "json", "data", "ls", "--all", server=node.address).stdout)}
    assert every["lin-model"] == "model" and every.get(f"ckpt-{shown['job']}") == "checkpoint", every
    ev = run_ctl("-o", "json", "evaluate", "lin-model", "--dataset", "lin", server=node.address,
                 timeout=240)
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(ev.stdout)
    assert metrics["accuracy"] > 0.9 and metrics["examples"] == 400
    pr = run_ctl("predict", "lin-model", "--dataset", "lin", "--out", "lin-pred", server=node.address,
                 timeout=240)
    assert pr.returncode == 0, pr.stderr
    with Client(node.address) as c:
        assert c.dataset("lin-pred").rows == 400
    bad = run_ctl("evaluate", "no-such-model", "--dataset", "lin", server=node.address, timeout=240)
    assert bad.returncode == 1 and bad.stderr == 'lepton-ctl: model "no-such-model" not found\n'
    # Each pre-launch check answers in one line, before anything runs.
    checks = {
        ("evaluate", "lin", "--dataset", "lin"): '"lin" is a dataset, not a model',
        ("evaluate", "lin-model", "--dataset", "lin-model"): '"lin-model" is a model, not a dataset',
        ("train", "--algorithm", "mlp", "--dataset", "lin-model", "--out", "m2"):
            '"lin-model" is a model, not a dataset',
        ("train", "--algorithm", "mlp", "--dataset", "nope", "--out", "m2"): 'dataset "nope" not found',
        ("train", "--algorithm", "mlp", "--dataset", "lin", "--out", "lin-model"):
            '"lin-model" already exists',
        ("train", "--algorithm", "mlp", "--dataset", "lin", "--nproc-per-node", "3", "--out", "m3"):
            'dataset "lin" has 2 shard(s) for 3 ranks',
    }
    with Client(node.address) as c:
        before = len(c.tasks())
    for argv, says in checks.items():
        refused = run_ctl(*argv, server=node.address, timeout=240)
        assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert says in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    with Client(node.address) as c:
        assert len(c.tasks()) == before  # nothing was submitted
    usage = run_ctl("train", "--algorithm", "nope", "--dataset", "lin", "--out", "m", server=node.address)
    assert usage.returncode == 2
