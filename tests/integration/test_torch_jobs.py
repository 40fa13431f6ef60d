"""Issue 6 end to end: torch.distributed jobs across real agents (gloo on CPU)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from lepton.client import Client, InvalidArgument, NotFound
from tests.integration.cluster import run_ctl, wait_until

# Torch workers are started from inside the task: see tasks_exec_python (conftest).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("tasks_exec_python")]

SCRIPT = textwrap.dedent("""
    import os, sys, time
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
        # os._exit: sys.exit would run the interpreter's teardown with the gloo group still
        # up, which now and then aborts in torch's destructors (SIGABRT, reported as -6:
        # what torchrun would report too), and this test is about the exit code 3.
        os._exit(3)
    if os.environ.get("FAIL_RANK") and restart == "0":
        # The others wait to be torn down: in a barrier they would fail on their own the
        # moment the failed rank's socket closed, and whose failure the leader hears first
        # (this exit 1 or the failed rank's 3) would be a race between two nodes' reports.
        time.sleep(600)
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
        assert "node 1 failed" in rank0.history[0].reason  # stopped because node 1 (rank 1) failed
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
        assert by_rank["0"].reason == "stopped: node 1 failed (exit code 3)"
        # One numbering: the member is "node 1", the worker its global "rank 1"; the
        # launcher's line is on the task's stderr, the user's stdout has only the job's own.
        text = b"".join(c.job_logs(job.id)).decode()
        assert "lepton: node 1: rank 1 exited with code 3" in text, text
        assert "no stored checkpoint" not in text


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


def rows(rng, n: int):
    w = rng.normal(size=(8, 3)).astype("float32")
    x = rng.normal(size=(n, 8)).astype("float32")
    return x, (x @ w).argmax(axis=1).astype("int64")


def test_two_agent_ddp_ends_like_one_process(two_nodes, tmp_path):
    """2 agents x 1 rank through the cluster (shards from the data plane) end with the same
    weights as one process on the same data and seed (see recipes.train for the batching)."""
    import numpy as np
    import torch

    from lepton.workloads.recipes import train
    from lepton.workloads.recipes.cluster import get_file
    from lepton.workloads.recipes.data import write_shard

    n, b = 64, 8
    rng = np.random.default_rng(3)
    (x0, y0), (x1, y1) = rows(rng, n), rows(rng, n)
    np.savez(tmp_path / "all.npz", x=np.concatenate([x0, x1]), y=np.concatenate([y0, y1]))
    args = ["--algorithm", "mlp", "--epochs", "2", "--lr", "0.05", "--seed", "5", "--hidden", "8"]
    with Client(two_nodes.address, timeout=60) as c:
        c.put_dataset(tmp_path / "all.npz", "ddp-data", shards=2)  # shard r -> rank r
        job = c.submit_job([sys.executable, "-m", "lepton.workloads.recipes.cluster", "train",
                            "--model-name", "ddp-model", *args, "--batch-size", str(b)],
                           nodes=2, nproc_per_node=1, cpu=0.5, dataset="ddp-data")
        done = c.wait_job(job.id, timeout=180)
        assert done.state == "succeeded", (done.reason, b"".join(c.job_logs(job.id)).decode()[-2000:])
        two = get_file(c, "ddp-model", tmp_path / "two.pt")
    # One process, batch 2b, the ranks' rows interleaved in blocks of b.
    xi = np.concatenate([np.concatenate([x0[k:k + b], x1[k:k + b]]) for k in range(0, n, b)])
    yi = np.concatenate([np.concatenate([y0[k:k + b], y1[k:k + b]]) for k in range(0, n, b)])
    write_shard(tmp_path / "one-data.npz", xi, yi)
    one = tmp_path / "one.pt"
    assert train.main([*args, "--batch-size", str(2 * b), "--shards", str(tmp_path / "one-data.npz"),
                       "--output", str(one), "--checkpoint-dir", ""]) == 0
    from safetensors.torch import load_file  # models are safetensors, never unpickled

    wa, wb = load_file(two), load_file(one)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), k


def kill_orphans(agent) -> None:
    """A real dead host takes its processes with it; on this one host the killed agent's
    task attempts live on (their own process groups), so end them here."""
    import json
    import os
    import signal

    for run in agent.data_dir.glob("tasks/*/*/run.json"):
        try:
            os.killpg(int(json.loads(run.read_text())["pid"]), signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


@pytest.mark.timeout(300)
def test_kill_9_of_an_agent_mid_training_resumes_from_checkpoint(agents, tmp_path, request):
    import numpy as np

    voter = agents("node-a")
    workers = [agents(f"node-{x}", "--join", voter.address) for x in "bc"]
    with Client(voter.address, timeout=60) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 3, what="3 nodes")
        x, y = rows(np.random.default_rng(0), 12_000)
        np.savez(tmp_path / "big.npz", x=x, y=y)
        c.put_dataset(tmp_path / "big.npz", "big", shards=4)
        job = c.submit_job([sys.executable, "-m", "lepton.workloads.recipes.train", "--algorithm", "mlp",
                            "--epochs", "12", "--batch-size", "64", "--hidden", "32"],
                           nodes=2, nproc_per_node=1, cpu=0.5, dataset="big", max_restarts=2)
        wait_until(lambda: any(d.name == f"ckpt-{job.id}" for d in c.datasets()), timeout=120,
                   what="a stored checkpoint")
        rank0 = next(t for t in c.job(job.id).tasks if t.id.endswith("-0"))
        names = {n.id: n.name for n in c.nodes()}
        victim = next(a for a in [voter, *workers] if a.name == names[rank0.node_id])
        if victim is voter:  # keep the coordinator: kill rank 1's node instead
            rank1 = next(t for t in c.job(job.id).tasks if t.id.endswith("-1"))
            victim = next(a for a in workers if a.name == names[rank1.node_id])
        victim.kill9()
        request.addfinalizer(lambda: kill_orphans(victim))
        try:
            done = c.wait_job(job.id, timeout=200)
        except Exception:
            job_now = c.job(job.id)
            raise AssertionError((job_now.state, job_now.reason,
                                  [(t.id, t.state, t.reason, t.node_id) for t in job_now.tasks])) from None
        assert done.state == "succeeded", done.reason
        assert done.restart_count >= 1
        out = b"".join(c.job_logs(job.id, rank=0)).decode()
        assert "resumed from checkpoint" in out, out[-2000:]


# ~1 MiB of output from rank 0, through a 64 KiB cap. After each 64 KiB the worker looks at
# its own rank logs (the launcher may lag, never overshoot) and says the largest it saw.
CHATTY = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    job_dir = os.path.dirname(os.environ["LEPTON_CHECKPOINT_DIR"])
    logs = os.path.join(job_dir, "restart-0", "node-0")
    largest, names = 0, set()
    for block in range(16):
        sys.stdout.write("".join(f"block {block:02d} line {i:04d} ".ljust(63, ".") + "\\n" for i in range(1024)))
        sys.stdout.flush()
        for name in os.listdir(logs):
            names.add(name)
            largest = max(largest, os.stat(os.path.join(logs, name)).st_size)
    print(f"job dir {job_dir} rank logs: largest {largest} bytes, files {sorted(names)}", flush=True)
    dist.destroy_process_group()
    print("LAST LINE", flush=True)
""")


@pytest.mark.timeout(300)
def test_rank_logs_are_capped_and_the_job_folder_is_swept(agents, tmp_path):
    node = agents("node-a", "--task-log-max-bytes", "64KiB", "--task-retention", "1")
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    out = run_ctl("run", "--nodes", "1", "--nproc-per-node", "1", "--cpu", "0.5", "--",
                  sys.executable, str(script), server=node.address, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "[rank 0] LAST LINE", lines[-5:]
    report = next(line for line in lines if " rank logs: largest " in line)
    largest = int(report.split(" largest ")[1].split()[0])
    assert 0 < largest <= 64 * 1024, report
    assert "'rank_0.log', 'rank_0.log.1']" in report, report  # it rotated, and kept one old file
    job_dir = Path(report.split("job dir ")[1].split()[0])
    assert job_dir.parent == node.data_dir / "jobs", report
    # Finished and reported, past the 1 s retention: the sweep deletes the job's folder.
    wait_until(lambda: not job_dir.exists(), timeout=60, what=f"{job_dir} to be swept")
    wait_until(lambda: "retention: deleted 1 finished job folder" in node.log_path.read_text(),
               timeout=30, what="the sweep's log line")
