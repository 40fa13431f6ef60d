"""What an attempt is spawned with: its command, environment and working folder (for
`lepton.agent.tasks.runner`), and the folders it is given to write in.

- Environment: a task gets only `INHERITED_ENV` of the agent's environment (PATH, HOME,
  locale, time zone, temp dir, library paths, OpenMP's thread cap), then its spec's env,
  then `LEPTON_TASK_ID`, `LEPTON_ATTEMPT` and the GPU variables. Never the rest: the
  agent's environment may hold its node token (`LEPTON_NODE_TOKEN`) or other secrets.
  An explicit `base_env` replaces the inherited part as given; `task_path` (--task-path),
  when set, replaces its PATH.
- GPUs: with `gpu_indices`, CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES are both the
  comma-joined indices. Without, both are set to "" (no GPU visible), so a CPU task cannot
  touch GPUs given to others, unless spec.env names a value for them explicitly.
- Task user (--task-user): the command runs as that user in `<attempt>/work`, a folder it
  owns (`task_user.TaskUser`); a torch job's folder (`spec.job_dir`, shared by the job's
  attempts on this node) is made here and given to that user too.
- Shipped code (`spec.code_dir`, from --working-dir): the attempt works in `<attempt>/work`,
  a fresh copy of the node's cached tree (lepton.agent.code_cache), first on PYTHONPATH.
- A deployment's replica (`spec.replica`): `LEPTON_SERVE_SOCKET` names the unix socket it
  serves on, in the attempt's own folder (`serve_socket_path`; the task user's, with one),
  where only the agent (and the task) can reach it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lepton.agent.code_cache import copy_code
from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.task_spec import RunSpec
from lepton.agent.tasks.task_user import WORK_DIR, TaskUser

GPU_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
# What a task inherits from the agent's environment (LC_* too); nothing else passes.
# OMP_NUM_THREADS: an operator's cap on a task's threads per process (agents that share a
# host's few cores, as the tests' do: torch's default of a spinning thread per core made
# 2-rank gloo training 15x slower there).
INHERITED_ENV = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "PYTHONPATH",
                 "OMP_NUM_THREADS")
SERVE_SOCKET_ENV = "LEPTON_SERVE_SOCKET"


def serve_socket_path(att_dir: Path, task_user: TaskUser | None) -> Path:
    """Where a replica attempt serves: in its own folder (short, as a unix socket's path
    must be: under 108 bytes), the task user's `work` folder when tasks run as one."""
    return (att_dir / WORK_DIR if task_user is not None else att_dir) / "serve.sock"


def inherited_env(agent_env: Mapping[str, str]) -> dict[str, str]:
    """The part of the agent's environment every task gets: `INHERITED_ENV` and `LC_*`."""
    return {k: v for k, v in agent_env.items() if k in INHERITED_ENV or k.startswith("LC_")}


@dataclass(frozen=True)
class AttemptEnv:
    """How the runner builds each attempt's spawn (see the module doc)."""

    base_env: Mapping[str, str] | None = None  # None: `inherited_env` of the agent's
    task_path: str = ""  # the PATH tasks get ("": the agent's)
    task_user: TaskUser | None = None  # run tasks' commands as this OS user

    def prepare(self, spec: RunSpec, att_dir: Path) -> tuple[tuple[str, ...], dict[str, str], Path]:
        """The command, environment and workdir to spawn. Raises OSError saying why not."""
        env = inherited_env(os.environ) if self.base_env is None else dict(self.base_env)
        if self.task_path:  # the operator's PATH for tasks (--task-path); the spec's still wins
            env["PATH"] = self.task_path
        env.update(spec.env)
        env["LEPTON_TASK_ID"] = spec.task_id
        env["LEPTON_ATTEMPT"] = str(spec.attempt)
        gpus = ",".join(str(i) for i in spec.gpu_indices)
        for name in GPU_ENV:
            env[name] = gpus if spec.gpu_indices else spec.env.get(name, "")
        base = att_dir
        user = self.task_user
        if user is not None:  # its own folder; the attempt's records stay the agent's
            base = user.workdir(att_dir)
            env.update(user.env(base))
        if spec.replica:
            env[SERVE_SOCKET_ENV] = str(serve_socket_path(att_dir, user))
        if spec.job_dir:
            make_job_dir(Path(spec.job_dir), user)
        if spec.code_dir:  # --working-dir: a fresh copy of the node's tree, importable
            base = copy_code(Path(spec.code_dir), att_dir / WORK_DIR, user)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(base), env.get("PYTHONPATH")) if p)
        workdir = base / spec.workdir if spec.workdir else base  # `/` keeps an absolute one
        if not workdir.is_dir():
            raise NotADirectoryError(f"workdir {workdir} is not a directory")
        if spec.argv:
            command = (tp.resolve_executable(spec.argv[0], env, workdir), *spec.argv[1:])
        else:
            command = ("/bin/sh", "-c", spec.shell)
        if user is not None:
            command = (*user.argv_prefix(), *command)
        return command, env, workdir


def make_job_dir(job_dir: Path, user: TaskUser | None) -> None:
    """A torch job's folder on this node (rank logs, error files, checkpoint staging), made
    by the agent so that a task user may write there: the folder above it is passable
    (0711), the job's own folder that user's. Raises OSError."""
    job_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    job_dir.mkdir(mode=0o700, exist_ok=True)
    if user is None:
        return
    user.give_folder(job_dir)
