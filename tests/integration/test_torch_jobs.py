"""Issue 6 end to end: torch.distributed jobs across real agents (gloo on CPU)."""

from __future__ import annotations

import sys
import textwrap

import pytest

from lepton.client import Client, InvalidArgument, NotFound
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t = torch.ones(1) * (rank + 1)
    dist.all_reduce(t)
    restart = os.environ["TORCHELASTIC_RESTART_COUNT"]
    print(f"rank={rank} world={world} sum={t.item():g} restart={restart} "
          f"local={os.environ['LOCAL_RANK']} group={os.environ['GROUP_RANK']}", flush=True)
    if os.environ.get("FAIL_RANK") == str(rank) and restart == "0":
        sys.exit(3)
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.fixture
def two_nodes(agents):
    voter = agents("node-a")
    agents("node-b", "--join", voter.address)
    with Client(voter.address) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 2, what="2 nodes")
    return voter


def test_two_node_job_runs_with_torchrun_topology(two_nodes, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    out = run_ctl("run", "--nodes", "2", "--nproc-per-node", "1", "--cpu", "0.5", "--",
                  sys.executable, str(script), server=two_nodes.address, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = sorted(line for line in out.stdout.splitlines() if "world=" in line)
    assert lines == [
        "[rank 0] rank=0 world=2 sum=3 restart=0 local=0 group=0",
        "[rank 1] rank=1 world=2 sum=3 restart=0 local=0 group=1",
    ]


def test_a_failed_rank_restarts_the_whole_gang(two_nodes, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    with Client(two_nodes.address) as c:
        job = c.submit_job([sys.executable, str(script)], nodes=2, nproc_per_node=1, cpu=0.5,
                           max_restarts=1, env={"FAIL_RANK": "1"})
        done = c.wait_job(job.id, timeout=180)
        assert done.state == "succeeded", done.reason
        assert done.restart_count == 1
        rank0 = next(t for t in done.tasks if t.id.endswith("-0"))
        assert "rank 1" in rank0.history[0].reason  # stopped because rank 1 failed
        text = b"".join(c.job_logs(job.id, rank=1)).decode()
        assert "restart=1" in text


def test_without_restarts_a_failed_rank_fails_the_job(two_nodes, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    with Client(two_nodes.address) as c:
        job = c.submit_job([sys.executable, str(script)], nodes=2, nproc_per_node=1, cpu=0.5,
                           env={"FAIL_RANK": "1"})
        done = c.wait_job(job.id, timeout=180)
        assert done.state == "failed"
        assert done.exit_code == 3
        by_rank = {t.id[-1]: t for t in done.tasks}
        assert by_rank["1"].reason == "exit code 3"
        assert by_rank["0"].reason.startswith("stopped: rank 1 failed")


def test_impossible_jobs_are_rejected(two_nodes):
    with Client(two_nodes.address) as c:
        with pytest.raises(InvalidArgument, match="at least 1"):
            c.submit_job(["true"], nodes=0, nproc_per_node=1)
        with pytest.raises(InvalidArgument, match="cores"):
            c.submit_job(["true"], nodes=1, nproc_per_node=64)
        with pytest.raises(InvalidArgument, match="needs 3 nodes"):
            c.submit_job(["true"], nodes=3, nproc_per_node=1)
        with pytest.raises(NotFound, match="no-such-data"):
            c.submit_job(["true"], nodes=1, nproc_per_node=1, dataset="no-such-data")
        assert c.list() == []
    out = run_ctl("run", "--nodes", "0", "--nproc-per-node", "1", "--", "true", server=two_nodes.address)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
