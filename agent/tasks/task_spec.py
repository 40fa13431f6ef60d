"""The vocabulary of task attempts on a node: what to run (`RunSpec`), what happened
(`TaskEvent`), what runs (`RunningTask`). Plain data, no processes: the coordinator side can
import it without the runner.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lepton.common.errors import InvalidArgument

TASK_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def validate_ids(task_id: str, attempt: int) -> None:
    """Raises InvalidArgument unless task_id is a safe folder name and attempt >= 1."""
    if not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id) or task_id in (".", ".."):
        raise InvalidArgument(f"task id {str(task_id)[:140]!r} must be 1-128 of [A-Za-z0-9._-], not . or ..")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise InvalidArgument(f"attempt must be an integer >= 1, not {attempt!r}")


@dataclass(frozen=True)
class RunSpec:
    """One attempt of a task, as the leader ordered it. `validate()` says if it can run."""

    task_id: str
    attempt: int  # never run the same (task_id, attempt) twice, even across agent restarts
    term: int  # leader term that ordered it (fencing; stored, reported back)
    argv: tuple[str, ...] = ()  # exec'd directly when non-empty (bare names searched on PATH)
    shell: str = ""  # else run with /bin/sh -c
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str = ""  # default: the attempt's own dir; a relative one is taken from there
    gpu_indices: tuple[int, ...] = ()  # -> CUDA_/NVIDIA_VISIBLE_DEVICES; none: both ""
    timeout_s: float = 0  # 0 = none; persisted, so it holds across agent restarts
    grace_s: float = 10.0  # SIGTERM -> wait grace -> SIGKILL
    # Run on when this node loses the leader past the attempt lease (default: killed then).
    keep_on_disconnect: bool = False
    # Shipped code (`--working-dir`): this node's unpacked tree of it, copied afresh into
    # the attempt's `work` folder, which becomes the base of `workdir` and heads PYTHONPATH.
    code_dir: str = ""
    # A torch job's folder on this node (`<data dir>/jobs/<job id>`), shared by the job's
    # attempts here: made before the start, and given to the task user when there is one.
    job_dir: str = ""
    # A deployment's replica (TaskSpec.replica): the attempt gets a private socket to serve
    # on (LEPTON_SERVE_SOCKET, attempt_env) and its agent health-checks it (agent/serving.py).
    replica: str = ""  # the deployment
    replica_generation: int = 0

    def __post_init__(self) -> None:
        # Lists from JSON or protos become tuples; env is copied so the caller cannot change it.
        object.__setattr__(self, "argv", tuple(self.argv))
        object.__setattr__(self, "gpu_indices", tuple(self.gpu_indices))
        object.__setattr__(self, "env", dict(self.env))

    def validate(self) -> None:
        """Raises InvalidArgument naming the first thing wrong with this spec."""
        validate_ids(self.task_id, self.attempt)
        if isinstance(self.term, bool) or not isinstance(self.term, int) or self.term < 0:
            raise InvalidArgument(f"term must be an integer >= 0, not {self.term!r}")
        if not self.argv and not self.shell:
            raise InvalidArgument(f"task {self.task_id}: neither argv nor shell is set")
        texts = [*self.argv, self.shell, self.workdir, self.code_dir, self.job_dir, self.replica, *self.env.values()]
        if not all(isinstance(t, str) for t in texts) or any("\0" in t for t in texts):
            raise InvalidArgument(f"task {self.task_id}: argv, shell, workdir, code_dir, job_dir and env values "
                                  "must be strings without NUL")
        if self.argv and not self.argv[0]:
            raise InvalidArgument(f"task {self.task_id}: argv[0] is empty")
        for key in self.env:
            if not isinstance(key, str) or not key or "=" in key or "\0" in key:
                raise InvalidArgument(f"task {self.task_id}: bad environment variable name {key!r}")
        for i in self.gpu_indices:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise InvalidArgument(f"task {self.task_id}: bad GPU index {i!r}")
        if not isinstance(self.keep_on_disconnect, bool):
            raise InvalidArgument(f"task {self.task_id}: keep_on_disconnect must be a bool")
        for name in ("timeout_s", "grace_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"task {self.task_id}: {name} must be a finite number >= 0, not {value!r}")

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["env"] = dict(self.env)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunSpec:
        """Raises TypeError/KeyError when `doc` lacks required fields; ignores unknown ones."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


# The EXITED reason of an attempt its watchdog killed when the node's attempt lease ran out:
# not the task's failure (the agent reports it for requeue).
FENCED = "fenced: this node lost the leader past the attempt's lease"
# The EXITED reason of an attempt never started because the node's attempt fence could not be
# reached (its link was down): not the task's failure either (reported for requeue).
FENCE_DOWN = "not started: this node's attempt fence was unreachable"


class TaskEventKind(str, enum.Enum):
    """What happened to an attempt. Per attempt, in order:

    - launch -> STARTED -> EXITED (exit code, or reason "timeout"/"cancelled"/"lost"...)
    - launch -> EXITED with reason "failed to start: ..." and exit code 127 (no STARTED)
    - agent restart while running: no new STARTED; EXITED later, from the new runner
    - ended while no runner watched: EXITED from the next `start()`
    """

    STARTED = "started"
    EXITED = "exited"


@dataclass(frozen=True)
class TaskEvent:
    task_id: str
    attempt: int
    term: int
    kind: TaskEventKind
    exit_code: int | None = None  # for EXITED; negative = killed by signal N (like subprocess)
    reason: str = ""  # "exited", "timeout", "cancelled", "killed by signal 9", "failed to start: <why>", "lost"
    pid: int = 0
    at_ms: int = 0  # wall clock


@dataclass(frozen=True)
class RunningTask:
    task_id: str
    attempt: int
    term: int
    pid: int
    started_at_ms: int
