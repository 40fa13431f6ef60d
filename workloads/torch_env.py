"""The environment of one torch.distributed worker, as torchrun would give it, plus Lepton's.

A job of N nodes x M processes per node runs M workers on each node. Unmodified torchrun
scripts must run under Lepton, so every worker gets exactly the variables torchrun's
`LocalElasticAgent` (torch 2.13, static rendezvous) sets, computed the same way. Found by
running a real `python -m torch.distributed.run` on 1x1, 1x2, 2x2 (static) and --standalone
topologies and diffing a worker's `os.environ` against the launcher's:

  RANK                node_rank * nproc_per_node + local_rank
  LOCAL_RANK          local_rank
  WORLD_SIZE          nnodes * nproc_per_node
  LOCAL_WORLD_SIZE    nproc_per_node
  GROUP_RANK          node_rank
  GROUP_WORLD_SIZE    nnodes
  ROLE_RANK           = RANK (one role, as with torchrun)
  ROLE_WORLD_SIZE     = WORLD_SIZE
  ROLE_NAME           "default" (torchrun's --role default)
  MASTER_ADDR         the rank-0 node's address
  MASTER_PORT         the port there
  TORCHELASTIC_RESTART_COUNT / TORCHELASTIC_MAX_RESTARTS / TORCHELASTIC_RUN_ID
  TORCHELASTIC_USE_AGENT_STORE    see below: the one deliberate difference
  TORCHELASTIC_ERROR_FILE         where `torch.distributed.elastic.multiprocessing.errors.record`
                                  writes the worker's exception; "" when none (torchrun sets ""
                                  too when its log dir is /dev/null)
  TORCHELASTIC_SIGNALS_TO_HANDLE  "SIGTERM,SIGINT,SIGHUP,SIGQUIT" (torchrun always overrides it)
  TORCH_NCCL_ASYNC_ERROR_HANDLING the inherited value, else "1"
  OMP_NUM_THREADS     the inherited value; else "1" when nproc_per_node > 1; else unset
  CUDA_VISIBLE_DEVICES inherited unchanged (torchrun's default, non-virtual local rank mode)

PYTHONFAULTHANDLER  the inherited value, else "1": the one variable torchrun does not set.
                    A worker killed by SIGABRT, SIGSEGV, SIGBUS, SIGFPE or SIGILL first
                    writes every thread's Python stack to its stderr, i.e. its rank log, so
                    a crash in native code (a C++ abort at exit...) says where it happened.

torchrun sets nothing else in a worker: no PYTHONUNBUFFERED, no NCCL_* variable. It does run
python with `-u` though, which is part of the command, not the environment: `python_argv`
builds that command the way torchrun does.

TORCHELASTIC_USE_AGENT_STORE is "False" here where torchrun says "True". With "True" the
workers' `env://` rendezvous connects as a client to a TCPStore that torchrun's agent process
hosts at MASTER_ADDR:MASTER_PORT. Lepton's agent never imports torch, so it hosts no store:
with "False", the rank-0 worker itself starts the TCPStore there and the others connect,
which is what `init_process_group("env://")` does outside torchrun.

Lepton's own variables (always set; "" means none):
  LEPTON_JOB_ID          the job id
  LEPTON_DATASET         the dataset name
  LEPTON_SHARDS          this rank's shard files, comma-separated (see lepton.workloads.recipes.data)
  LEPTON_CHECKPOINT_DIR  where the job saves and resumes checkpoints

Layering: the agent's environment, then the job's own env, then all of the above. The
"inherited" values above (OMP_NUM_THREADS, TORCH_NCCL_ASYNC_ERROR_HANDLING,
CUDA_VISIBLE_DEVICES) are read from the first two layers merged: that merge is what the
environment of a torchrun started by hand would be.

No torch import here: the agent's main process uses this.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "DEFAULT_ROLE",
    "DEFAULT_SIGNALS_TO_HANDLE",
    "FAULTHANDLER_VAR",
    "LEPTON_VARS",
    "RUN_SPECIFIC_VARS",
    "TORCHRUN_VARS",
    "global_rank",
    "python_argv",
    "worker_env",
]

logger = logging.getLogger(__name__)

DEFAULT_ROLE = "default"
DEFAULT_SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
FAULTHANDLER_VAR = "PYTHONFAULTHANDLER"  # ours, not torchrun's (see the module doc)

# Every variable torchrun sets in each worker (OMP_NUM_THREADS only sometimes, see above).
TORCHRUN_VARS: tuple[str, ...] = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_ERROR_FILE",
    "TORCHELASTIC_SIGNALS_TO_HANDLE",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
    "OMP_NUM_THREADS",
)

# Values that differ between two runs of the same topology by nature (a fresh port, a fresh
# run id, a temp dir): compare these by presence and shape, not value.
RUN_SPECIFIC_VARS: frozenset[str] = frozenset(
    {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"}
)

LEPTON_VARS: tuple[str, ...] = (
    "LEPTON_JOB_ID",
    "LEPTON_DATASET",
    "LEPTON_SHARDS",
    "LEPTON_CHECKPOINT_DIR",
)


def global_rank(node_rank: int, nproc_per_node: int, local_rank: int) -> int:
    """The worker's RANK, as torchrun's static rendezvous numbers them (nodes in order)."""
    return node_rank * nproc_per_node + local_rank


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, not {value}")
    return value


def worker_env(
    base_env: Mapping[str, str],
    job_env: Mapping[str, str],
    *,
    job_id: str,
    node_rank: int,
    nnodes: int,
    nproc_per_node: int,
    local_rank: int,
    master_addr: str,
    master_port: int,
    restart_count: int = 0,
    max_restarts: int = 0,
    run_id: str = "",
    role: str = DEFAULT_ROLE,
    error_file: str = "",
    dataset: str = "",
    shards: Iterable[str] = (),
    checkpoint_dir: str = "",
) -> dict[str, str]:
    """The full environment of worker `local_rank` on node `node_rank` (see the module doc).

    `run_id` defaults to `job_id` (torchrun's --rdzv-id); it must be the same on every node.
    Pure: reads nothing but its arguments. Raises ValueError for an inconsistent topology
    (a rank out of range, a port outside 1..65535, an empty master address or job id) or a
    shard path that holds a comma (LEPTON_SHARDS is comma-separated).
    """
    _check_int("nnodes", nnodes, 1)
    _check_int("nproc_per_node", nproc_per_node, 1)
    _check_int("node_rank", node_rank, 0, nnodes - 1)
    _check_int("local_rank", local_rank, 0, nproc_per_node - 1)
    _check_int("master_port", master_port, 1, 65535)
    _check_int("restart_count", restart_count, 0)
    _check_int("max_restarts", max_restarts, 0)
    if not job_id:
        raise ValueError("job_id must not be empty")
    if not master_addr:
        raise ValueError("master_addr must not be empty")
    shard_list = [str(s) for s in shards]
    for s in shard_list:
        if not s or "," in s:
            raise ValueError(f"shard paths must be non-empty and hold no comma: {s!r}")

    env = dict(base_env)
    env.update(job_env)
    inherited = dict(env)  # what a hand-started torchrun would see in os.environ
    world_size = nnodes * nproc_per_node
    rank = global_rank(node_rank, nproc_per_node, local_rank)
    env.update({
        "RANK": str(rank),
        "GROUP_RANK": str(node_rank),
        "ROLE_RANK": str(rank),
        "ROLE_NAME": role,
        "LOCAL_WORLD_SIZE": str(nproc_per_node),
        "WORLD_SIZE": str(world_size),
        "GROUP_WORLD_SIZE": str(nnodes),
        "ROLE_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id or job_id,
        # No agent-hosted store: rank 0 hosts the TCPStore (see the module doc).
        "TORCHELASTIC_USE_AGENT_STORE": "False",
        "TORCHELASTIC_ERROR_FILE": error_file,
        "TORCHELASTIC_SIGNALS_TO_HANDLE": DEFAULT_SIGNALS_TO_HANDLE,
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": inherited.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "LOCAL_RANK": str(local_rank),
    })
    # torchrun: an inherited value wins; else 1 thread per worker when several share a node.
    if "OMP_NUM_THREADS" in inherited:
        env["OMP_NUM_THREADS"] = inherited["OMP_NUM_THREADS"]
    elif nproc_per_node > 1:
        env["OMP_NUM_THREADS"] = "1"
    # Not torchrun's: see the module doc. An inherited value wins ("" turns it off).
    env.setdefault(FAULTHANDLER_VAR, "1")
    env.update({
        "LEPTON_JOB_ID": job_id,
        "LEPTON_DATASET": dataset,
        "LEPTON_SHARDS": ",".join(shard_list),
        "LEPTON_CHECKPOINT_DIR": checkpoint_dir,
    })
    return env


def python_argv(
    target: str,
    args: Sequence[str] = (),
    *,
    module: bool = False,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """The command torchrun runs for `torchrun [-m] target args...`: `PYTHON_EXEC` from `env`
    (default: this process's environment) or this interpreter, `-u` (unbuffered, so output
    lines arrive as printed), `-m` for a module, then the target and its args.
    Raises ValueError for an empty target."""
    if not target:
        raise ValueError("target must not be empty")
    source = os.environ if env is None else env
    argv = [source.get("PYTHON_EXEC") or sys.executable, "-u"]
    if module:
        argv.append("-m")
    argv.append(target)
    argv.extend(args)
    return argv
