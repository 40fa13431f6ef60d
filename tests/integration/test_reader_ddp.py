"""Issue 17: examples/ddp_reader.py, run with `lepton-ctl run --dataset` on 2 real agents
(gloo on CPU), reads every row exactly once per epoch across its ranks."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lepton.client import Client
from tests.integration.cluster import run_ctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("tasks_exec_python")]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ddp_reader.py"
ROWS, EPOCHS = 301, 2


@pytest.mark.timeout(300)
def test_example_reads_each_row_once_per_epoch_across_ranks(agents, tmp_path):
    voter = agents("node-a")
    agents("node-b", "--join", voter.address)
    x = np.random.default_rng(1).normal(size=(ROWS, 6)).astype(np.float32)
    x[:, 0] = np.arange(ROWS)  # the row's id, which the script records
    np.savez(tmp_path / "rows.npz", x=x, y=np.arange(ROWS) % 3)
    with Client(voter.address, timeout=60) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 2, what="2 nodes")
        # 3 shards on 2 ranks: rank 0 reads shards 0 and 2, rank 1 shard 1 (uneven: Join).
        c.put_dataset(tmp_path / "rows.npz", "rows", shards=3)
    seen = tmp_path / "seen"
    seen.mkdir(mode=0o777)
    seen.chmod(0o777)  # the workers may run as the task user
    out = run_ctl("run", "--dataset", "rows", "--nodes", "2", "--nproc-per-node", "1", "--cpu", "0.5", "--",
                  sys.executable, str(EXAMPLE), "--epochs", str(EPOCHS), "--classes", "3",
                  "--batch-size", "16", "--workers", "2", "--seen", str(seen),
                  server=voter.address, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    orders = []
    for epoch in range(EPOCHS):
        per_rank = [json.loads((seen / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert Counter(per_rank[0] + per_rank[1]) == Counter(range(ROWS)), epoch  # each row once
        assert sorted(len(ids) for ids in per_rank) == [101, 200]  # whole shards (100+100, 101), none padded
        orders.append(per_rank[0])
    assert orders[0] != orders[1]  # reshuffled by epoch
    assert sum("rows, mean loss" in line for line in out.stdout.splitlines()) == 2 * EPOCHS
