"""Job files: `lepton-ctl apply -f job.toml`, the submit flags written down.

One schema: a job file's keys are `TaskOptions`' fields (what `Client.submit` takes) and
`JOB_OPTIONS` (what `Client.submit_job` adds), plus `command`, `working_dir` and `sweep`:

    command = ["python", "train.py"]   # or shell = "python train.py"
    working_dir = "."        # shipped like --working-dir; relative to this file's folder
    cpu = 1
    memory = "2GiB"
    env = { SEED = "1" }
    nodes = 2                # a gang on 2 nodes (with nproc_per_node: a torch job)
    nproc_per_node = 1
    max_restarts = 1         # of the whole job, when a rank fails

`sweep = { lr = ["0.1", "0.01"] }` makes one task per value, `{lr}` filled in (single-node
tasks only, as `submit --sweep`).
An unknown key, or a value of the wrong type, is refused naming the key (InvalidArgument);
the values' own checks are `build_spec`'s and `submit_job`'s, as for the flags.
"""

from __future__ import annotations

import os
import sys
from dataclasses import fields
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lepton.common.errors import InvalidArgument

from .tasks import TaskOptions

# What `submit_job` takes beyond TaskOptions, with the type of each.
JOB_OPTIONS: dict[str, type] = {"nodes": int, "nproc_per_node": int, "gpus_per_node": int,
                                "max_restarts": int, "dataset": str}
# Keys of the file that are not submit keywords as they stand.
FILE_ONLY = ("command", "working_dir", "sweep")
# TaskOptions fields a file does not set: code_digest comes from working_dir.
_NOT_IN_FILES = ("code_digest",)
_TYPES = {"str": (str,), "float": (int, float), "int": (int,), "int | str": (int, str),
          "str | None": (str,), "Mapping[str, str] | None": (dict,)}


def task_keys() -> dict[str, tuple[type, ...]]:
    """TaskOptions' fields a job file may set, each with the TOML types it takes."""
    return {f.name: _TYPES[str(f.type)] for f in fields(TaskOptions) if f.name not in _NOT_IN_FILES}


def allowed_keys() -> list[str]:
    return sorted([*task_keys(), *JOB_OPTIONS, *FILE_ONLY])


class JobFile:
    """A parsed, checked job file: `task` (TaskOptions keywords, argv included), `job`
    (JOB_OPTIONS given), `working_dir` (absolute, or "") and `sweep` (K -> "V1,V2")."""

    def __init__(self, task: dict[str, Any], job: dict[str, Any], working_dir: str,
                 sweep: list[tuple[str, str]]):
        self.task, self.job, self.working_dir, self.sweep = task, job, working_dir, sweep

    @property
    def is_job(self) -> bool:
        return bool(self.job)


MAX_JOB_FILE_BYTES = 1 << 20


def load(path: str) -> JobFile:
    """Read and check `path`; InvalidArgument in one line naming the file and the key."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JOB_FILE_BYTES + 1)  # capped: /dev/zero or a wrong huge file
        if len(data) > MAX_JOB_FILE_BYTES:
            raise InvalidArgument(f"{path}: over {MAX_JOB_FILE_BYTES >> 20} MiB; a job file is a small TOML file")
        doc = tomllib.loads(data.decode())
    except OSError as err:
        raise InvalidArgument(f"cannot read job file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"{path}: not a text file (a job file is TOML)") from None
    except tomllib.TOMLDecodeError as err:
        raise InvalidArgument(f"{path}: not valid TOML: {err}") from None
    return parse(doc, base=os.path.dirname(os.path.abspath(path)), where=path)


def parse(doc: dict[str, Any], *, base: str = ".", where: str = "job file") -> JobFile:
    def bad(key: str, why: str) -> InvalidArgument:
        return InvalidArgument(f"{where}: {key}: {why}")

    unknown = sorted(set(doc) - set(allowed_keys()))
    if unknown:
        raise InvalidArgument(f"{where}: unknown key {unknown[0]!r} (allowed: "
                              f"{', '.join(allowed_keys())})")
    task: dict[str, Any] = {}
    for key, types in task_keys().items():
        if key not in doc:
            continue
        value = doc[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise bad(key, f"expected {' or '.join(t.__name__ for t in types)}, "
                           f"not {type(value).__name__}")
        if isinstance(value, dict) and not all(isinstance(v, str) for v in value.values()):
            raise bad(key, "every value must be a string")
        task[key] = value
    job: dict[str, Any] = {}
    for key, kind in JOB_OPTIONS.items():
        if key in doc:
            if isinstance(doc[key], bool) or not isinstance(doc[key], kind):
                raise bad(key, f"expected {kind.__name__}, not {type(doc[key]).__name__}")
            job[key] = doc[key]
    command = doc.get("command")
    if command is not None:
        if "shell" in task:
            raise bad("command", "give command or shell, not both")
        if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command):
            raise bad("command", 'expected a list of strings, e.g. ["python", "train.py"]')
        task["argv"] = command
    elif "shell" not in task:
        raise InvalidArgument(f"{where}: no command: set command = [...] or shell = \"...\"")
    working_dir = doc.get("working_dir", "")
    if not isinstance(working_dir, str):
        raise bad("working_dir", f"expected a folder path, not {type(working_dir).__name__}")
    if working_dir:
        working_dir = os.path.normpath(os.path.join(base, working_dir))
    return JobFile(task, job, working_dir, _sweep(doc.get("sweep", {}), bad, is_job=bool(job)))


def _sweep(value: Any, bad: Any, *, is_job: bool) -> list[tuple[str, str]]:
    """`sweep = { K = [V1, V2] }` as `--sweep K=V1,V2` pairs."""
    if not isinstance(value, dict):
        raise bad("sweep", 'expected a table, e.g. sweep = { lr = ["0.1", "0.01"] }')
    if value and is_job:
        raise bad("sweep", "is for single-node tasks, not jobs (nodes, nproc_per_node, ...)")
    pairs = []
    for key, values in value.items():
        if not isinstance(values, list) or not values:
            raise bad(f"sweep.{key}", "expected a non-empty list of values")
        texts = [str(v) for v in values]
        if any("," in t or not t or isinstance(v, (bool, dict, list)) for t, v in zip(texts, values, strict=True)):
            raise bad(f"sweep.{key}", "values must be non-empty strings or numbers without commas")
        pairs.append((key, ",".join(texts)))
    return pairs


def example() -> str:
    """The module's example, as a file's text (docs and tests use it)."""
    doc = __doc__ or ""
    start = doc.index("    command =")
    end = doc.index("\n\n`sweep")
    return "\n".join(line[4:] for line in doc[start:end].splitlines()) + "\n"


__all__ = ["FILE_ONLY", "JOB_OPTIONS", "JobFile", "allowed_keys", "example", "load", "parse",
           "task_keys"]
