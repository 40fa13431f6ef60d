"""A small training script for the README's tour: plain Python and numpy, run unmodified
by `lepton-ctl run --working-dir . -- python train.py` (and by each rank of a job).

It fits y = 3x + 1 by gradient descent and prints one loss line per epoch. `--epochs`
sets how long it runs (half a second an epoch), `--lr` and `--bs` the usual knobs.
"""

import argparse
import os
import time

import numpy as np
from losses import mse  # a module beside this file: shipped with it, importable as here

parser = argparse.ArgumentParser()
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--bs", type=int, default=32)
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

rng = np.random.default_rng(int(os.environ.get("RANK", "0")))
x = rng.normal(size=512)
y = 3 * x + 1 + rng.normal(scale=0.1, size=512)
w = b = 0.0
where = f"rank {os.environ['RANK']} " if "RANK" in os.environ else ""
for epoch in range(args.epochs):
    for start in range(0, len(x), args.bs):
        xb, yb = x[start:start + args.bs], y[start:start + args.bs]
        err = w * xb + b - yb
        w -= args.lr * float(np.mean(err * xb))
        b -= args.lr * float(np.mean(err))
    print(f"{where}epoch {epoch + 1} loss {mse(w * x + b, y):.4f}", flush=True)
    time.sleep(0.5)
