"""A DDP training script that reads a Lepton dataset without knowing its layout.

    lepton-ctl data put digits.npz --name digits --shards 4      # see make_digits.py
    lepton-ctl run --dataset digits --nodes 2 --nproc-per-node 1 -- python ddp_reader.py

Each rank reads only its own rows (`lepton.workloads.reader`): every row once per epoch
across the ranks, reshuffled each epoch. The reading is the three lines marked below; the
rest is a plain DDP loop (gloo on CPU, nccl on GPUs). Ranks can hold different row counts
(a job gives each rank whole shards), so the loop runs under `Join`, which lets a rank that
ran out of batches shadow the others' gradient all-reduces until every rank is done.

Options: --epochs, --batch-size, --lr, --seed, --classes (labels 0..classes-1), --workers
(DataLoader worker processes), --seen DIR (write each epoch's row ids, taken from feature 0,
to DIR/rank<R>-epoch<E>.json: the integration test checks them).
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  before the group exists: see lepton.workloads.recipes.train
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from lepton.workloads.reader import RowDataset

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--classes", type=int, default=10)
parser.add_argument("--workers", type=int, default=0)
parser.add_argument("--seen", default="", help="folder for the row ids each rank read")
args = parser.parse_args()

dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank = dist.get_rank()
device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
torch.manual_seed(args.seed)

data = RowDataset(shuffle=True, seed=args.seed)                                    # 1: this rank's rows
loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)   # 2: batches, workers

features = int(torch.as_tensor(data[0][0]).numel())
model = DistributedDataParallel(torch.nn.Linear(features, args.classes).to(device))
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
for epoch in range(args.epochs):
    data.set_epoch(epoch)                                                          # 3: a new order
    seen, total, loss = [], 0.0, torch.zeros(())
    with Join([model]):
        for x, y in loader:
            x, y = x.to(device).float().flatten(1), y.to(device).long()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            seen.extend(int(v) for v in x[:, 0].tolist())
    print(f"rank {rank} epoch {epoch + 1}: {len(seen)} rows, mean loss {total / max(1, len(seen)):.4f}", flush=True)
    if args.seen:
        Path(args.seen, f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(seen))
dist.destroy_process_group()
