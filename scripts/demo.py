"""`make demo`: the main job, end to end on real local agents.

3 agents elect a coordinator; scikit-learn's digits (shipped inside the package, nothing is
downloaded) are uploaded as shards, preprocessed, cleaned and augmented on the agents,
trained with DDP over 2 agents x 1 rank, evaluated (the accuracy is printed on a line of
its own), used for batch inference, and the cluster is shut down.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CTL = [sys.executable, "-m", "lepton.client.cli"]
T0 = time.monotonic()


def step(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def ctl(*args: str) -> str:
    print(f"$ lepton-ctl {' '.join(args)}", flush=True)
    out = subprocess.run([*CTL, *args], text=True, capture_output=True)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"demo: lepton-ctl {args[0]} failed with exit code {out.returncode}")
    return out.stdout


def digits(tmp: Path) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    x, y = d.data[order].astype(np.float32), d.target[order].astype(np.int64)
    cut = int(0.8 * len(y))
    train, test = tmp / "digits-train.npz", tmp / "digits-test.npz"
    np.savez(train, x=x[:cut], y=y[:cut])
    np.savez(test, x=x[cut:], y=y[cut:])
    step(f"digits: {cut} training rows, {len(y) - cut} test rows, {x.shape[1]} features")
    return train, test


def main() -> int:
    from lepton.client import Algorithm, Client, DataProcessor

    tmp = Path(tempfile.mkdtemp(prefix="lepton-demo-"))
    step("starting 3 local agents (3 voters elect the coordinator)")
    up = ctl("local", "up", "--agents", "3", "--data-dir", str(tmp / "cluster"))
    servers = next(line.split(":", 1)[1].strip() for line in up.splitlines() if line.startswith("servers:"))
    try:
        ctl("--server", servers, "cluster", "status")
        ctl("--server", servers, "nodes", "list")
        train_file, test_file = digits(tmp)
        with Client(servers, timeout=60) as c:
            dp = DataProcessor(c)
            step("uploading the data as shards (2 replicas each)")
            raw = dp.load_data(train_file, name="digits-raw", shards=4)
            test_raw = dp.load_data(test_file, name="digits-test-raw", shards=2)
            step("preprocessing (min-max), cleaning, augmenting (noise) on the agents")
            clean = dp.clean_data(dp.preprocess_data(raw, normalize="minmax", out="digits-pre"),
                                  out="digits-clean")
            train = dp.enhance_data(clean, noise=0.05, out="digits-train")
            test = dp.preprocess_data(test_raw, normalize="minmax", out="digits-test")
            step(f"training set: {train.rows} rows in {len(train.shards)} shards")
            algo = Algorithm(c)
            algo.select_algorithm("mlp")
            algo.configure_parameters(batch_size=32, learning_rate=0.05, epochs=12, nodes=2)
            step("training an MLP with DDP over 2 agents x 1 rank (gloo)")
            model = algo.train_model(train, name="digits-mlp")
            step(f"model stored in the cluster as {model.name!r}")
            metrics = algo.evaluate_model(model, test)
            step(f"evaluation on {test.rows} held-out rows: {metrics}")
            print(f"accuracy: {metrics['accuracy']:.3f}", flush=True)
            preds = algo.predict(model, test, "digits-predictions")
            step(f"batch inference wrote dataset {preds!r}")
        ctl("--server", servers, "data", "ls")
        ctl("--server", servers, "models", "list")
    finally:
        step("shutting the cluster down")
        subprocess.run([*CTL, "local", "down", "--data-dir", str(tmp / "cluster"), "--wipe"])
    step("demo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
