"""torch_env.worker_env: the pure rules, and the environment a worker sees under our launcher
against what a real torchrun (`python -m torch.distributed.run`) gives the same topology.

Compared with torchrun, key by key over each worker's whole environment:
- equal values: every variable, except those below;
- TORCHELASTIC_USE_AGENT_STORE: "False" with us, "True" with torchrun (documented in
  torch_env: the rank-0 worker hosts the store since our agent does not import torch);
- TORCHELASTIC_ERROR_FILE: by shape (a path ending in error.json, distinct per rank);
- MASTER_PORT and TORCHELASTIC_RUN_ID: by shape in the 1-node default run, where torchrun
  picks a free port and a uuid itself; equal in the 2-node static run, where both are given;
- LEPTON_*, PYTHONFAULTHANDLER: ours only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.workloads import torch_env
from lepton.workloads.torch_launcher import NodeLaunch, run_node

DUMP = """import json, os, sys
with open(os.path.join(sys.argv[1], "env_" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(dict(os.environ), f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    # A small, fixed environment for both launchers; no OMP_NUM_THREADS, so torchrun's rule shows.
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": os.environ.get("HOME", "/tmp"),
           "LEPTON_TEST_MARK": "inherited"}
    env.update(extra)
    return env


def kw(**over):
    args = dict(job_id="job-1", node_rank=1, nnodes=2, nproc_per_node=2, local_rank=1,
                master_addr="10.0.0.1", master_port=29500)
    args.update(over)
    return args


# ---- the pure rules -------------------------------------------------------------------

def test_topology_values():
    env = torch_env.worker_env({}, {}, **kw(restart_count=2, max_restarts=3, run_id="r"))
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                                "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME")} == {
        "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3", "ROLE_WORLD_SIZE": "4", "ROLE_NAME": "default"}
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["TORCHELASTIC_RESTART_COUNT"] == "2" and env["TORCHELASTIC_MAX_RESTARTS"] == "3"
    assert env["TORCHELASTIC_RUN_ID"] == "r"
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
    assert env["TORCHELASTIC_ERROR_FILE"] == ""
    assert env["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert set(torch_env.TORCHRUN_VARS) <= set(env)


def test_run_id_defaults_to_job_id_and_lepton_vars_always_set():
    env = torch_env.worker_env({}, {}, **kw())
    assert env["TORCHELASTIC_RUN_ID"] == "job-1"
    assert {k: env[k] for k in torch_env.LEPTON_VARS} == {
        "LEPTON_JOB_ID": "job-1", "LEPTON_DATASET": "", "LEPTON_SHARDS": "", "LEPTON_CHECKPOINT_DIR": ""}
    env = torch_env.worker_env({}, {}, **kw(dataset="digits", shards=["/d/a.npz", Path("/d/b")],
                                             checkpoint_dir="/ck"))
    assert env["LEPTON_SHARDS"] == "/d/a.npz,/d/b"
    assert env["LEPTON_DATASET"] == "digits" and env["LEPTON_CHECKPOINT_DIR"] == "/ck"


def test_layering_base_then_job_then_ours():
    base = {"A": "base", "B": "base", "RANK": "99", "LEPTON_SHARDS": "x"}
    job = {"B": "job", "C": "job", "WORLD_SIZE": "99", "LEPTON_JOB_ID": "spoof"}
    env = torch_env.worker_env(base, job, **kw())
    assert (env["A"], env["B"], env["C"]) == ("base", "job", "job")
    assert env["RANK"] == "3" and env["WORLD_SIZE"] == "4"
    assert env["LEPTON_JOB_ID"] == "job-1" and env["LEPTON_SHARDS"] == ""
    assert base == {"A": "base", "B": "base", "RANK": "99", "LEPTON_SHARDS": "x"}  # not mutated


def test_faulthandler_on_unless_inherited():
    assert torch_env.worker_env({}, {}, **kw())["PYTHONFAULTHANDLER"] == "1"
    assert torch_env.worker_env({"PYTHONFAULTHANDLER": ""}, {}, **kw())["PYTHONFAULTHANDLER"] == ""
    job_off = torch_env.worker_env({"PYTHONFAULTHANDLER": "1"}, {"PYTHONFAULTHANDLER": ""}, **kw())
    assert job_off["PYTHONFAULTHANDLER"] == ""


def test_omp_and_nccl_follow_torchrun():
    one = dict(nproc_per_node=1, local_rank=0)
    assert torch_env.worker_env({}, {}, **kw())["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in torch_env.worker_env({}, {}, **kw(**one))
    assert torch_env.worker_env({"OMP_NUM_THREADS": "4"}, {}, **kw())["OMP_NUM_THREADS"] == "4"
    assert torch_env.worker_env({"OMP_NUM_THREADS": "4"}, {"OMP_NUM_THREADS": "2"}, **kw())["OMP_NUM_THREADS"] == "2"
    assert torch_env.worker_env({}, {"OMP_NUM_THREADS": "3"}, **kw(**one))["OMP_NUM_THREADS"] == "3"
    assert torch_env.worker_env({}, {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}, **kw())[
        "TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "0"
    env = torch_env.worker_env({"CUDA_VISIBLE_DEVICES": "2,3"}, {}, **kw())
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"  # inherited, as torchrun does


@pytest.mark.parametrize("over", [
    dict(node_rank=2), dict(node_rank=-1), dict(local_rank=2), dict(nnodes=0), dict(nproc_per_node=0),
    dict(master_port=0), dict(master_port=70000), dict(master_addr=""), dict(job_id=""),
    dict(restart_count=-1), dict(nnodes=True), dict(local_rank="1"), dict(shards=["a,b"]), dict(shards=[""]),
])
def test_bad_topology_raises(over):
    with pytest.raises(ValueError):
        torch_env.worker_env({}, {}, **kw(**over))


def test_python_argv_like_torchrun():
    assert torch_env.python_argv("train.py", ["--x", "1"], env={}) == [sys.executable, "-u", "train.py", "--x", "1"]
    assert torch_env.python_argv("pkg.mod", module=True, env={"PYTHON_EXEC": "/opt/py"}) == [
        "/opt/py", "-u", "-m", "pkg.mod"]
    with pytest.raises(ValueError):
        torch_env.python_argv("")


def test_modules_do_not_import_torch():
    code = ("import sys, lepton.workloads.torch_env, lepton.workloads.torch_launcher, lepton.workloads.recipes, "
            "lepton.workloads.recipes.data; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- against a real torchrun ----------------------------------------------------------

def run_torchrun(tmp: Path, out: Path, env: dict[str, str], *flags: str) -> subprocess.Popen[bytes]:
    script = tmp / "dump_env.py"
    script.write_text(DUMP)
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *flags, str(script), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen[bytes]) -> None:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out.decode(errors="replace")


def ours(tmp: Path, out: Path, env: dict[str, str], *, nnodes: int, node_rank: int, addr: str,
         port: int, run_id: str) -> None:
    script = tmp / "dump_env.py"
    script.write_text(DUMP)
    out.mkdir(parents=True, exist_ok=True)
    spec = NodeLaunch(job_id="job-env", argv=tuple(torch_env.python_argv(str(script), [str(out)], env=env)),
                      nproc_per_node=2, node_rank=node_rank, nnodes=nnodes, master_addr=addr,
                      master_port=port, run_id=run_id, log_dir=tmp / f"logs-{node_rank}")
    result = asyncio.run(run_node(spec, base_env=env))
    assert result.ok, result


def read_envs(out: Path) -> dict[int, dict[str, str]]:
    return {int(p.stem.split("_")[1]): json.loads(p.read_text()) for p in out.glob("env_*.json")}


def compare(theirs: dict[str, str], mine: dict[str, str], *, by_shape: frozenset[str]) -> None:
    diffs = []
    for key in sorted(set(theirs) | set(mine)):
        if key in torch_env.LEPTON_VARS:
            assert key in mine and key not in theirs
            continue
        t, m = theirs.get(key), mine.get(key)
        if key == "TORCHELASTIC_USE_AGENT_STORE":
            assert (t, m) == ("True", "False")
        elif key == torch_env.FAULTHANDLER_VAR:  # ours alone: fatal signals dump Python stacks
            assert (t, m) == (None, "1")
        elif key == "TORCHELASTIC_ERROR_FILE":
            assert t and m and t.endswith("error.json") and m.endswith("error.json"), (t, m)
        elif key in by_shape:
            assert t is not None and m is not None, key
            if key == "MASTER_PORT":
                assert t.isdigit() and m.isdigit()
        elif t != m:
            diffs.append(f"{key}: torchrun {t!r}, ours {m!r}")
    assert not diffs, "\n".join(diffs)


def test_env_matches_torchrun_one_node(tmp_path):
    env = base_env()
    proc = run_torchrun(tmp_path, tmp_path / "theirs", env, "--nnodes", "1", "--nproc-per-node", "2")
    finish(proc)
    theirs = read_envs(tmp_path / "theirs")
    assert sorted(theirs) == [0, 1]
    # torchrun's single-node default: MASTER_ADDR "localhost", a uuid run id, a free port.
    assert theirs[0]["MASTER_ADDR"] == "localhost"
    assert re.fullmatch(r"[0-9a-f-]{36}", theirs[0]["TORCHELASTIC_RUN_ID"])
    ours(tmp_path, tmp_path / "ours", env, nnodes=1, node_rank=0, addr="localhost",
         port=free_port(), run_id="run-1")
    mine = read_envs(tmp_path / "ours")
    for rank in (0, 1):
        compare(theirs[rank], mine[rank], by_shape=torch_env.RUN_SPECIFIC_VARS)
    assert mine[0]["TORCHELASTIC_ERROR_FILE"] != mine[1]["TORCHELASTIC_ERROR_FILE"]


def test_env_matches_torchrun_two_nodes_static(tmp_path):
    env = base_env(OMP_NUM_THREADS="1")
    port = free_port()
    flags = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "static", "--master-addr",
             "127.0.0.1", "--master-port", str(port), "--rdzv-id", "job-env-run", "--max-restarts", "0"]
    nodes = [run_torchrun(tmp_path, tmp_path / "theirs", env, *flags, "--node-rank", str(r)) for r in (0, 1)]
    for proc in nodes:
        finish(proc)
    theirs = read_envs(tmp_path / "theirs")
    assert sorted(theirs) == [0, 1, 2, 3]
    for node_rank in (0, 1):
        ours(tmp_path, tmp_path / "ours", env, nnodes=2, node_rank=node_rank, addr="127.0.0.1",
             port=port, run_id="job-env-run")
    mine = read_envs(tmp_path / "ours")
    for rank in range(4):
        compare(theirs[rank], mine[rank], by_shape=frozenset())  # all given: equal values
