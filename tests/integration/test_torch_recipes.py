"""The built-in recipes under Lepton's launcher, with real torch.distributed (gloo on CPU):
2 ranks train exactly like 1 process on the same data; a run killed after epoch 1 resumes
from its checkpoint and ends with the same weights as an uninterrupted one; evaluate and
predict on the result; logreg (regression) and cnn in one process each.

Data: synthetic and separable (scikit-learn is not installed): 6 features, 3 classes given
by the argmax of a fixed linear map. Each rank has its own shard of N rows; the 1-process
reference reads one shard built by interleaving the ranks' shards in blocks of the per-rank
batch (see lepton.workloads.recipes.train's docstring for why that makes the runs equal).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# One worker for the module: the shared 2-rank run (two_rank_model) trains once, not once
# per worker that gets one of its tests.
pytestmark = pytest.mark.xdist_group("torch_recipes")

from lepton.workloads.recipes import evaluate as evaluate_mod  # noqa: E402
from lepton.workloads.recipes import predict as predict_mod  # noqa: E402
from lepton.workloads.recipes import train as train_mod  # noqa: E402
from lepton.workloads.recipes.data import write_shard  # noqa: E402
from lepton.workloads.recipes.models import read_config  # noqa: E402
from lepton.workloads.torch_launcher import LaunchResult, NodeLaunch, run_node  # noqa: E402
from tests.integration.cluster import free_port  # noqa: E402

N, B, EPOCHS = 96, 8, 3  # rows per rank, per-rank batch, epochs
TRAIN = ["--algorithm", "mlp", "--epochs", str(EPOCHS), "--lr", "0.05", "--seed", "7", "--hidden", "16"]
WAIT_S = 180.0
# The recipe, then the names of the threads still alive in the rank once it returned: none
# may be, a thread left running into interpreter exit can abort the rank there (SIGABRT).
TRAIN_THEN_LIST_THREADS = """
import os, sys
from lepton.workloads.recipes import train
code = train.main(sys.argv[1:])
main_tid = str(os.getpid())
left = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task") if t != main_tid)
print("threads left after training:", left, flush=True)
sys.exit(code)
"""


def make_rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    w = np.array([[2.0, -1.0, 0.0], [0.5, 1.5, -1.0], [-1.0, 0.0, 2.0],
                  [0.0, 1.0, 1.0], [1.0, -1.0, 0.5], [0.0, 0.5, -0.5]], dtype=np.float32)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, np.argmax(x @ w, axis=1).astype(np.int64)


def launch(tmp: Path, name: str, args: list[str], *, nproc: int, shards: tuple[tuple[str, ...], ...],
           restart_count: int = 0, checkpoint_dir: str = "") -> LaunchResult:
    spec = NodeLaunch(
        job_id=name, argv=(sys.executable, "-u", "-c", TRAIN_THEN_LIST_THREADS, *args),
        nproc_per_node=nproc, node_rank=0, nnodes=1, master_addr="127.0.0.1", master_port=free_port(),
        log_dir=tmp / "logs" / f"{name}-{restart_count}", restart_count=restart_count, max_restarts=1,
        env={"OMP_NUM_THREADS": "1"}, shards=shards, checkpoint_dir=checkpoint_dir, grace_s=5.0)
    return asyncio.run(asyncio.wait_for(run_node(spec), WAIT_S))


def log_of(tmp: Path, name: str, restart_count: int = 0, rank: int = 0) -> str:
    return (tmp / "logs" / f"{name}-{restart_count}" / f"rank_{rank}.log").read_text()


def all_logs(tmp: Path, name: str, restart_count: int = 0) -> str:
    """Every rank's log: what a failed launch's assertion shows (the failing rank may be any)."""
    return "\n".join(p.read_text() for p in sorted((tmp / "logs" / f"{name}-{restart_count}").glob("rank_*.log")))


def assert_no_threads_left(tmp: Path, name: str, restart_count: int = 0, nproc: int = 2) -> None:
    for rank in range(nproc):
        assert f"[rank {rank}] threads left after training: []" in log_of(tmp, name, restart_count, rank), \
            all_logs(tmp, name, restart_count)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # models are safetensors: never unpickled

    return load_file(path)


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("recipes")
    rng = np.random.default_rng(0)
    (x0, y0), (x1, y1) = make_rows(rng, N), make_rows(rng, N)
    write_shard(d / "rank0.npz", x0, y0)
    write_shard(d / "rank1", x1, y1)  # the .x.npy/.y.npy layout
    blocks = [(a[k * B:(k + 1) * B], b[k * B:(k + 1) * B]) for a, b in ((x0, x1), (y0, y1)) for k in range(N // B)]
    half = N // B
    xi = np.concatenate([np.concatenate(blocks[k]) for k in range(half)])
    yi = np.concatenate([np.concatenate(blocks[half + k]) for k in range(half)])
    write_shard(d / "interleaved.npz", xi, yi)
    x_test, y_test = make_rows(rng, 200)
    write_shard(d / "test.npz", x_test, y_test)
    return d


@pytest.fixture(scope="module")
def two_rank_model(data) -> Path:
    """The uninterrupted 2-rank run (shared by the equality and the resume tests)."""
    out = data / "two.pt"
    result = launch(data, "two", [*TRAIN, "--batch-size", str(B), "--output", str(out)], nproc=2,
                    shards=((str(data / "rank0.npz"),), (str(data / "rank1"),)))
    assert result.ok, (result, all_logs(data, "two"))
    return out


def test_two_ranks_train_like_one_process(data, two_rank_model):
    one = data / "one.pt"
    result = launch(data, "one", [*TRAIN, "--batch-size", str(2 * B), "--output", str(one)], nproc=1,
                    shards=((str(data / "interleaved.npz"),),))
    assert result.ok, (result, all_logs(data, "one"))
    assert_same_weights(two_rank_model, one, atol=1e-5)  # float summation order only
    meta = read_config(two_rank_model)
    assert meta["hyperparameters"]["world_size"] == 2 and meta["algorithm"] == "mlp"
    assert (meta["task"], meta["num_classes"], meta["input_shape"]) == ("classification", 3, [6])
    # Accuracy over both ranks' rows: the same model on the same rows as the 1-process run.
    assert meta["metrics"]["train_accuracy"] == pytest.approx(read_config(one)["metrics"]["train_accuracy"])
    assert 0.5 < meta["metrics"]["train_accuracy"] <= 1.0
    # The logged epoch losses agree too.
    def losses(name: str) -> list[float]:
        return [float(line.split()[-1]) for line in log_of(data, name).splitlines() if " loss " in line]

    assert len(losses("two")) == EPOCHS
    assert losses("two") == pytest.approx(losses("one"), abs=2e-6)  # printed with 6 decimals


def test_killed_run_resumes_from_checkpoint(data, two_rank_model):
    ckpt = data / "ckpt"
    out = data / "resumed.pt"
    args = [*TRAIN, "--batch-size", str(B), "--output", str(out)]
    shards = ((str(data / "rank0.npz"),), (str(data / "rank1"),))
    first = launch(data, "resume", [*args, "--crash-after-epoch", "1"], nproc=2, shards=shards,
                   checkpoint_dir=str(ckpt))
    assert not first.ok and first.failed_rank == 0 and first.failed_code == -9, first
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_000001.safetensors"]
    assert not out.exists()

    second = launch(data, "resume", args, nproc=2, shards=shards, restart_count=1, checkpoint_dir=str(ckpt))
    assert second.ok, (second, all_logs(data, "resume", 1))
    log = log_of(data, "resume", 1)
    assert "resumed from checkpoint: 1 epoch(s) done" in log
    assert "epoch 1/" not in log and f"epoch {EPOCHS}/{EPOCHS}" in log
    # The newest --keep-checkpoints (2) remain; the weights equal the uninterrupted run's.
    assert sorted(p.name for p in ckpt.iterdir()) == [f"epoch_{EPOCHS - 1:06d}.safetensors", f"epoch_{EPOCHS:06d}.safetensors"]
    assert_same_weights(two_rank_model, out, atol=1e-6)
    assert_no_threads_left(data, "resume", 1)


def test_ranks_end_with_no_thread_left_running(data, two_rank_model):
    """DDP imports torch.distributed.nn.functional, whose `group=group.WORLD` defaults pinned
    the world group: destroy_process_group() could not free it, and gloo's threads ran on
    into interpreter exit (the rare SIGABRT of a rank that had finished its work)."""
    assert_no_threads_left(data, "two")


def test_evaluate_and_predict(data, two_rank_model, tmp_path, monkeypatch):
    test_shard = str(data / "test.npz")
    proc = subprocess.run([sys.executable, "-m", "lepton.workloads.recipes.evaluate", "--model",
                           str(two_rank_model), "--shards", test_shard],
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["task"] == "classification" and metrics["examples"] == 200
    assert metrics["accuracy"] > 0.8 and metrics["loss"] > 0

    out = tmp_path / "pred.npy"
    monkeypatch.setenv("LEPTON_SHARDS", test_shard)  # predict's default source of shards
    assert predict_mod.main(["--model", str(two_rank_model), "--output", str(out)]) == 0
    pred = np.load(out)
    y = np.load(test_shard)["y"]
    assert pred.dtype == np.int64 and pred.shape == (200,)
    assert float((pred == y).mean()) == pytest.approx(metrics["accuracy"])


def test_logreg_regression_and_cnn_in_one_process(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LEPTON_SHARDS", "LEPTON_CHECKPOINT_DIR"):
        monkeypatch.delenv(var, raising=False)
    rng = np.random.default_rng(1)
    # Regression: y = x . w + 0.5 (float labels).
    x = rng.normal(size=(128, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32) + 0.5).astype(np.float32)
    write_shard(tmp_path / "reg.npz", x, y)
    model = tmp_path / "logreg.pt"
    assert train_mod.main(["--algorithm", "logreg", "--epochs", "20", "--batch-size", "16", "--lr", "0.05",
                           "--shards", str(tmp_path / "reg.npz"), "--output", str(model)]) == 0
    m = evaluate_mod.evaluate(str(model), [str(tmp_path / "reg.npz")])
    assert m["task"] == "regression" and m["mse"] < 0.05
    pred = predict_mod.predict(str(model), [str(tmp_path / "reg.npz")])
    assert pred.shape == (128,) and pred.dtype == np.float32

    # Images (n, 8, 8): class 1 when the left half is brighter than the right.
    imgs = rng.normal(size=(128, 8, 8)).astype(np.float32)
    labels = (imgs[:, :, :4].mean(axis=(1, 2)) > imgs[:, :, 4:].mean(axis=(1, 2))).astype(np.int64)
    write_shard(tmp_path / "img.npz", imgs, labels)
    model = tmp_path / "cnn.pt"
    ckpt = tmp_path / "cnn-ckpt"
    assert train_mod.main(["--algorithm", "cnn", "--epochs", "2", "--batch-size", "16", "--shards",
                           str(tmp_path / "img.npz"), "--output", str(model), "--checkpoint-dir", str(ckpt)]) == 0
    meta = read_config(model)
    assert meta["input_shape"] == [8, 8] and meta["num_classes"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_000001.safetensors", "epoch_000002.safetensors"]
    proba = predict_mod.predict(str(model), [str(tmp_path / "img.npz")], probabilities=True)
    assert proba.shape == (128, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    # Bad input: the cnn model on tabular data.
    assert evaluate_mod.main(["--model", str(model), "--shards", str(tmp_path / "reg.npz")]) == 2


def test_shard_layouts_and_errors(tmp_path):
    from lepton.workloads.recipes.data import load_shards, read_shard, shards_from_env

    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    write_shard(tmp_path / "a.npz", x, np.array([0, 1, 2, 1]))
    write_shard(tmp_path / "b", x[:2], np.array([3, 0]))
    xs, ys = load_shards([tmp_path / "a.npz", tmp_path / "b"])
    assert xs.dtype == np.float32 and xs.shape == (6, 3) and ys.tolist() == [0, 1, 2, 1, 3, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.x.npy", "b.y.npy"]
    write_shard(tmp_path / "unlabelled.npz", x)
    assert read_shard(tmp_path / "unlabelled.npz", need_labels=False)[1] is None
    assert shards_from_env({"LEPTON_SHARDS": " /a.npz,,/b "}) == ["/a.npz", "/b"]
    write_shard(tmp_path / "reg.npz", x, np.zeros(4, dtype=np.float32))
    write_shard(tmp_path / "wide.npz", np.zeros((2, 5)), np.zeros(2, dtype=np.int64))
    for bad in (["unlabelled.npz"], ["a.npz", "reg.npz"], ["a.npz", "wide.npz"], []):
        with pytest.raises(ValueError):
            load_shards([tmp_path / b for b in bad])
    with pytest.raises(FileNotFoundError):
        read_shard(tmp_path / "missing")
    with pytest.raises(ValueError):
        write_shard(tmp_path / "c.npz", x, np.zeros(3))
