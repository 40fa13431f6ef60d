"""Decrypted shards never outlive their attempt in /dev/shm: a torch task killed with
SIGKILL (its own cleanup skipped) leaves nothing there, and an agent starting up removes
what ended attempts of its node left (agent/shard_scratch.py), never another node's."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lepton.agent.shard_scratch import PREFIX, SHM, node_key
from lepton.client import Client, LeptonError
from tests.integration.cluster import run_ctl, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("tasks_exec_python"),  # torch workers start from inside the task
    pytest.mark.skipif(not os.access(SHM, os.W_OK), reason="no writable /dev/shm"),
]

READER = textwrap.dedent("""
    import os, time
    print("staged " + os.environ["LEPTON_SHARDS"], flush=True)
    time.sleep(600)
""")


def scratch_folders(agent) -> list[Path]:
    return sorted(SHM.glob(f"{PREFIX}{node_key(agent.data_dir)}-*"))


def torch_task_pid(job_id: str) -> int | None:
    """The pid of the job's `lepton.workloads.torch_task` process on this host."""
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lepton.workloads.torch_task" in argv and any(f'"job_id": "{job_id}"'.encode() in a for a in argv):
            return int(proc.name)
    return None


def test_kill_9_of_a_torch_task_leaves_no_decrypted_shards(agents, tmp_path):
    secret = tmp_path / "cluster.secret"
    run_ctl("secret", "init", "--out", str(secret), server="-", check=True)
    agent = agents("node-a", "--shard-key-file", str(secret))
    script = tmp_path / "reader.py"
    script.write_text(READER)
    np.save(tmp_path / "in.npy", np.arange(40_000, dtype=np.float32).reshape(-1, 4))
    with Client(agent.address, timeout=60) as c:
        wait_until(lambda: [n for n in c.nodes() if n.state == "ready"], what="the node")
        c.put_dataset(tmp_path / "in.npy", "secret-data", shards=1, replicas=1)
        job = c.submit_job([sys.executable, str(script)], nproc_per_node=1, cpu=0.5, dataset="secret-data")
        logs: list[str] = []

        def staged() -> bool:
            try:
                text = b"".join(c.job_logs(job.id)).decode(errors="replace")
            except LeptonError:  # not started yet
                return False
            logs[:] = [line for line in text.splitlines() if "staged " in line]
            return bool(logs)

        wait_until(staged, timeout=180, interval=0.5, what="the job to stage its shard")
        shard = Path(logs[0].split("staged ", 1)[1].split(",")[0])
        [folder] = scratch_folders(agent)
        assert shard.is_relative_to(folder) and shard.is_file()  # decrypted, in memory
        pid = torch_task_pid(job.id)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # no `finally` runs in the task
        wait_until(lambda: not folder.exists(), timeout=60, interval=0.2, what="the agent to remove the scratch")
        assert c.wait_job(job.id, timeout=120).state == "failed"  # max_restarts 0: no new attempt
    assert not scratch_folders(agent)


def test_an_agent_start_sweeps_its_nodes_leftovers_only(agents):
    agent = agents("node-a")
    # What a killed task left while its agent was down, another node's live folder, and a link
    # planted under this node's name (an attacker's: never followed).
    mine = SHM / f"{PREFIX}{node_key(agent.data_dir)}-j-gone.1-7-abc_1234"
    theirs = SHM / f"{PREFIX}{node_key(agent.data_dir / 'other')}-j-live-3-xyz_9876"
    target = agent.data_dir / "keep"
    planted = SHM / f"{PREFIX}{node_key(agent.data_dir)}-j-link-2-lnk_0000"
    try:
        for folder in (mine, theirs, target):
            folder.mkdir()
            (folder / "shard.npy").write_bytes(b"plaintext")
        planted.symlink_to(target)
        agent.kill9()
        agent.start()
        wait_until(lambda: not mine.exists(), timeout=60, what="the sweep")
        assert (theirs / "shard.npy").exists() and (target / "shard.npy").exists()
    finally:
        shutil.rmtree(theirs, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)
        planted.unlink(missing_ok=True)
