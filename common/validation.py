"""Request validation at the API boundary: every field checked before anything is proposed.

Each check raises InvalidArgument naming the field and what was wrong, so a bad request
changes nothing and tells its sender why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from lepton.common.errors import InvalidArgument
from lepton.v1 import common_pb2

MAX_ID = 128
MAX_NAME = 128
MAX_ADDRESS = 256
MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_VERSION = 64
MAX_GPUS = 64
MAX_TEXT = 256

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


def require_id(value: str, field: str) -> str:
    """An id (node, task, job, token...): 1-128 of [A-Za-z0-9._-], starting alphanumeric."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(value) > MAX_ID:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {MAX_ID}")
    if not _ID_RE.match(value):
        raise InvalidArgument(f"{field} {value[:40]!r} may hold only letters, digits, '.', '_' and '-'")
    return value


def check_text(value: str, field: str, limit: int = MAX_TEXT, *, required: bool = False) -> str:
    """At most `limit` characters, none a control character; `required`: not blank either."""
    if required and not value.strip():
        raise InvalidArgument(f"{field} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters; at most {limit}")
    if any(ord(c) < 32 for c in value):
        raise InvalidArgument(f"{field} holds control characters")
    return value


def check_address(value: str, field: str, *, bind: bool = False) -> str:
    """HOST:PORT, an IPv6 host in brackets ([::1]:PORT); returned unchanged.

    Port 0 only with `bind` (a listen address: the OS picks a free port); an address
    someone dials needs a real port.
    """
    check_text(value, field, MAX_ADDRESS, required=True)
    host, sep, port = value.rpartition(":")
    lowest = 0 if bind else 1
    if (not sep or not host or not (port.isascii() and port.isdigit()) or not lowest <= int(port) <= 65535
            or any(c.isspace() for c in host)
            or (":" in host and not (host.startswith("[") and host.endswith("]")))):
        raise InvalidArgument(f"{field} {value!r} is not HOST:PORT")
    return value


def check_labels(labels: Mapping[str, str], field: str = "labels") -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{field} has {len(labels)} entries; at most {MAX_LABELS}")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY or not _LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"{field} key {key[:40]!r} must be 1-{MAX_LABEL_KEY} of [A-Za-z0-9._/-]")
        check_text(value, f"{field}[{key}]", MAX_LABEL_VALUE)


def check_capacity(cap: common_pb2.Capacity) -> None:
    if cap.cpu_logical == 0:
        raise InvalidArgument("capacity.cpu_logical must be > 0")
    if cap.memory_bytes == 0:
        raise InvalidArgument("capacity.memory_bytes must be > 0")
    if len(cap.gpus) > MAX_GPUS:
        raise InvalidArgument(f"capacity.gpus lists {len(cap.gpus)}; at most {MAX_GPUS}")
    check_text(cap.cpu_model, "capacity.cpu_model")
    seen = set()
    for gpu in cap.gpus:
        if gpu.index in seen:
            raise InvalidArgument(f"capacity.gpus repeats index {gpu.index}")
        seen.add(gpu.index)
        check_text(gpu.name, "gpu.name")
        check_text(gpu.uuid, "gpu.uuid")


MAX_ARGV = 1024
MAX_ARG = 64 * 1024
MAX_ENV = 256
MAX_PRIORITY = 1_000_000
MAX_RETRIES = 100
MAX_CPU = 4096.0
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _finite(value: float, field: str, lo: float, hi: float) -> None:
    if not (value == value) or not lo <= value <= hi:  # NaN fails the first test
        raise InvalidArgument(f"{field} must be between {lo:g} and {hi:g}, not {value}")


def check_task_spec(spec) -> None:
    """Every field of a TaskSpec; raises InvalidArgument naming the first bad one."""
    check_text(spec.name, "name", MAX_NAME)
    if not spec.argv and not spec.shell:
        raise InvalidArgument("the command is empty: give argv or shell")
    if spec.argv and spec.shell:
        raise InvalidArgument("give argv or shell, not both")
    if len(spec.argv) > MAX_ARGV:
        raise InvalidArgument(f"argv has {len(spec.argv)} items; at most {MAX_ARGV}")
    if spec.argv and not spec.argv[0]:
        raise InvalidArgument("argv[0] is empty")
    for i, arg in enumerate(spec.argv):
        if len(arg) > MAX_ARG or "\0" in arg:
            raise InvalidArgument(f"argv[{i}] is longer than {MAX_ARG} or holds a NUL byte")
    if len(spec.shell) > MAX_ARG or "\0" in spec.shell:
        raise InvalidArgument(f"shell is longer than {MAX_ARG} or holds a NUL byte")
    if len(spec.env) > MAX_ENV:
        raise InvalidArgument(f"env has {len(spec.env)} entries; at most {MAX_ENV}")
    for key, value in spec.env.items():
        if not _ENV_KEY_RE.match(key):
            raise InvalidArgument(f"env name {key[:40]!r} is not a valid variable name")
        if len(value) > MAX_ARG or "\0" in value:
            raise InvalidArgument(f"env {key} is longer than {MAX_ARG} or holds a NUL byte")
    check_text(spec.workdir, "workdir", 4096)
    r = spec.resources
    _finite(r.cpu, "resources.cpu", 0.0, MAX_CPU)
    if r.gpus > MAX_GPUS:
        raise InvalidArgument(f"resources.gpus is {r.gpus}; at most {MAX_GPUS}")
    if r.gpu_memory_bytes and not r.gpus:
        raise InvalidArgument("resources.gpu_memory_bytes needs resources.gpus > 0")
    if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")
    check_labels(spec.constraints, "constraints")
    if spec.max_retries > MAX_RETRIES:
        raise InvalidArgument(f"max_retries is {spec.max_retries}; at most {MAX_RETRIES}")
    _finite(spec.timeout_s, "timeout_s", 0.0, 365 * 86400.0)
    _finite(spec.grace_s, "grace_s", 0.0, 3600.0)
    check_text(spec.owner, "owner", MAX_NAME)
    if spec.request_id:
        require_id(spec.request_id, "request_id")


MAX_DATASET_NAME = 128
MAX_REPLICATION = 16
DEFAULT_REPLICATION = 2


def check_dataset_name(name: str) -> str:
    """Letters, digits, '.', '_', '-'; no leading dot, no '/': never a path. Raises InvalidArgument."""
    if not name:
        raise InvalidArgument("dataset name is required")
    if len(name) > MAX_DATASET_NAME:
        raise InvalidArgument(f"dataset name is {len(name)} characters; at most {MAX_DATASET_NAME}")
    if not _ID_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f"dataset name {name[:40]!r} may hold only letters, digits, '.', '_' and '-' (no '..')"
        )
    return name
