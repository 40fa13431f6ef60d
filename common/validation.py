"""Request validation at the API boundary: every field checked before anything is proposed.

Each check raises InvalidArgument naming the field and what was wrong, so a bad request
changes nothing and tells its sender why.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Mapping, Sequence

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
_CONTROL_RE = re.compile(r"[\x00-\x1f]")  # one C scan, not a Python test per character
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
    if _CONTROL_RE.search(value):
        raise InvalidArgument(f"{field} holds control characters")
    return value


def split_host_port(address: str, field: str = "address") -> tuple[str, int]:
    """HOST:PORT as (host, port), an IPv6 host without its brackets: "[::1]:80" is ("::1", 80).

    The one parser of addresses. Raises InvalidArgument naming `field` unless `address` is
    a non-empty host (an IPv6 one in brackets: "::1:80" is ambiguous), ':' and a port 0-65535.
    """
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if (not sep or not host or not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535
            or any(c.isspace() or c in "[]" for c in host) or (":" in host and not bracketed)):
        raise InvalidArgument(f"{field} {address!r} is not HOST:PORT")
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of split_host_port: "host:port", an IPv6 host in brackets ("[::1]:80")."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def check_address(value: str, field: str, *, bind: bool = False) -> str:
    """HOST:PORT, an IPv6 host in brackets ([::1]:PORT); returned unchanged.

    Port 0 only with `bind` (a listen address: the OS picks a free port); an address
    someone dials needs a real port.
    """
    check_text(value, field, MAX_ADDRESS, required=True)
    _, port = split_host_port(value, field)
    if port == 0 and not bind:
        raise InvalidArgument(f"{field} {value!r} is not HOST:PORT with a port 1-65535 (0 only for a listen address)")
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
MAX_ENV = 256
MAX_PRIORITY = 1_000_000
MAX_RETRIES = 100
MAX_CPU = 4096.0
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# -- size caps (issue 14): the one home of every byte limit on what the log holds ---------
# gRPC's message limit (grpc_util.MAX_MESSAGE_BYTES, 16 MiB) is the envelope. Everything a
# leader appends stays far below it, so an AppendEntries (1 MiB of payload plus at most one
# entry) always reaches a follower, and a state larger than any message travels in chunks.
MAX_ENTRY_BYTES = 4 << 20  # the largest command a leader proposes (Raft refuses bigger ones)
DEFAULT_MAX_SPEC_BYTES = 1 << 20  # a task or job spec, serialized; --max-spec-bytes
MAX_SPEC_BYTES_CEILING = 3 << 20  # what --max-spec-bytes may be raised to: a spec and its command fit an entry
MAX_BATCH_SPEC_BYTES = 3 << 20  # SubmitTasks: all specs together (one log entry)
STREAM_CHUNK_BYTES = 1 << 20  # a state-sized answer (SaveSnapshot) goes in chunks of this
# A node's assignment set goes whole up to this, as older agents (which act on every
# message) read it; only a larger one, which no single message could carry, is cut.
ASSIGNMENT_CHUNK_BYTES = 8 << 20
# Linux refuses exec (E2BIG) for a single argv or env string ("KEY=value") of 32 pages or
# more, and for argv plus env (strings, NULs and pointers) past ARG_MAX (a quarter of
# RLIMIT_STACK, as sysconf reports it). EXEC_MARGIN leaves room for what the agent adds
# to a task's environment (LEPTON_*, PATH, CUDA_VISIBLE_DEVICES, torch's rendezvous).
MAX_ARG_STRLEN = 128 << 10
EXEC_MARGIN = 128 << 10
_ARG_MAX_FALLBACK = 2 << 20  # Linux's default (8 MiB stack / 4) when sysconf cannot say


@functools.cache  # sysconf asks the kernel (getrlimit) each time; every submitted spec needs it
def exec_args_limit() -> int:
    """Bytes a task's argv and env may take together, by this host's ARG_MAX less the margin."""
    try:
        arg_max = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        arg_max = -1
    if arg_max <= 0:
        arg_max = _ARG_MAX_FALLBACK
    return max(arg_max - EXEC_MARGIN, 64 << 10)


def _finite(value: float, field: str, lo: float, hi: float) -> None:
    if not (value == value) or not lo <= value <= hi:  # NaN fails the first test
        raise InvalidArgument(f"{field} must be between {lo:g} and {hi:g}, not {value}")


def _exec_string(value: str, field: str) -> int:
    """Bytes `value` takes in exec's argument area (its NUL and pointer included)."""
    size = len(value.encode("utf-8", "surrogatepass")) + 1
    if size > MAX_ARG_STRLEN or "\0" in value:
        raise InvalidArgument(
            f"{field} is {size - 1} bytes or holds a NUL byte; exec allows at most {MAX_ARG_STRLEN - 1} bytes a string"
        )
    return size + 8


def check_exec_size(spec) -> None:
    """argv (or shell) and env fit what exec allows, or the task could only fail with E2BIG."""
    total = 0
    for i, arg in enumerate(spec.argv):
        total += _exec_string(arg, f"argv[{i}]")
    if spec.shell:
        total += _exec_string(spec.shell, "shell")
    for key, value in spec.env.items():
        total += _exec_string(f"{key}={value}", f"env {key}")
    limit = exec_args_limit()
    if total > limit:
        raise InvalidArgument(f"argv and env take {total} bytes; exec allows at most {limit} (ARG_MAX less a margin)")


def check_spec_size(spec, limit: int = DEFAULT_MAX_SPEC_BYTES, what: str = "spec") -> int:
    """A serialized spec is at most `limit` bytes (RESOURCE_EXHAUSTED's cousin: InvalidArgument
    naming the cap). Returns its size, for batch totals."""
    size = spec.ByteSize()
    if size > limit:
        raise InvalidArgument(f"the {what} is {size} bytes; at most {limit} (the cluster's --max-spec-bytes)")
    return size


def batches_by_size(messages: Sequence, max_bytes: int, max_count: int = sys.maxsize) -> list[list]:
    """Protobuf `messages` cut, in order, into runs of at most `max_count` messages and
    `max_bytes` serialized bytes (one larger than that alone in its run)."""
    out: list[list] = []
    run: list = []
    size = 0
    for m in messages:
        n = m.ByteSize()
        if run and (len(run) >= max_count or size + n > max_bytes):
            out.append(run)
            run, size = [], 0
        run.append(m)
        size += n
    if run:
        out.append(run)
    return out


def spec_batches(specs: Sequence, max_count: int, max_bytes: int = MAX_BATCH_SPEC_BYTES) -> list[list]:
    """SubmitTasks calls for `specs`: each within the server's count and byte caps (a spec
    over the byte cap goes alone; the server names its own cap)."""
    return batches_by_size(specs, max_bytes, max_count)


def check_spec_bytes_setting(value: int, field: str = "max_spec_bytes") -> int:
    if not 1024 <= value <= MAX_SPEC_BYTES_CEILING:
        raise InvalidArgument(f"{field} must be between 1024 and {MAX_SPEC_BYTES_CEILING}, not {value}")
    return value


def check_entry_size(size: int) -> None:
    """What a leader appends fits one message to a follower; bigger commands are refused
    before anything is logged."""
    if size > MAX_ENTRY_BYTES:
        raise InvalidArgument(f"the command is {size} bytes; a log entry holds at most {MAX_ENTRY_BYTES}")


_SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")


def check_sha256_hex(value: object, what: str) -> str:
    """64 lowercase hex digits (a content address). Raises InvalidArgument."""
    if not isinstance(value, str) or not _SHA256_HEX_RE.fullmatch(value):
        raise InvalidArgument(f"{what} {str(value)[:70]!r} is not a SHA-256 hex digest")
    return value


def _check_resources_and_priority(spec) -> None:
    """`spec.resources` and `spec.priority` of a TaskSpec or a DeploymentSpec (per replica)."""
    r = spec.resources
    _finite(r.cpu, "resources.cpu", 0.0, MAX_CPU)
    if r.gpus > MAX_GPUS:
        raise InvalidArgument(f"resources.gpus is {r.gpus}; at most {MAX_GPUS}")
    if r.gpu_memory_bytes and not r.gpus:
        raise InvalidArgument("resources.gpu_memory_bytes needs resources.gpus > 0")
    if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
        raise InvalidArgument(f"priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}")


def check_task_spec(spec, max_bytes: int = DEFAULT_MAX_SPEC_BYTES) -> None:
    """Every field of a TaskSpec, then its size against `max_bytes`; raises InvalidArgument
    naming the first bad one."""
    check_text(spec.name, "name", MAX_NAME)
    if not spec.argv and not spec.shell:
        raise InvalidArgument("the command is empty: give argv or shell")
    if spec.argv and spec.shell:
        raise InvalidArgument("give argv or shell, not both")
    if spec.job_id or spec.gang_size or spec.gang_rank:  # a forged job id would join another's gang
        raise InvalidArgument("job_id, gang_size and gang_rank are set by the coordinator; "
                              "submit a job (lepton-ctl run --nodes N) to run a gang")
    if spec.HasField("replica"):  # only the coordinator's serving loop starts replicas
        raise InvalidArgument("replica is set only by the serving loop; use lepton-ctl serve up")
    if len(spec.argv) > MAX_ARGV:
        raise InvalidArgument(f"argv has {len(spec.argv)} items; at most {MAX_ARGV}")
    if spec.argv and not spec.argv[0]:
        raise InvalidArgument("argv[0] is empty")
    if len(spec.env) > MAX_ENV:
        raise InvalidArgument(f"env has {len(spec.env)} entries; at most {MAX_ENV}")
    for key in spec.env:
        if not _ENV_KEY_RE.match(key):
            raise InvalidArgument(f"env name {key[:40]!r} is not a valid variable name")
    check_exec_size(spec)
    check_text(spec.workdir, "workdir", 4096)
    if spec.code_digest:
        check_sha256_hex(spec.code_digest, "code_digest")
    _check_resources_and_priority(spec)
    check_labels(spec.constraints, "constraints")
    if spec.max_retries > MAX_RETRIES:
        raise InvalidArgument(f"max_retries is {spec.max_retries}; at most {MAX_RETRIES}")
    _finite(spec.timeout_s, "timeout_s", 0.0, 365 * 86400.0)
    _finite(spec.grace_s, "grace_s", 0.0, 3600.0)
    check_text(spec.owner, "owner", MAX_NAME)
    if spec.request_id:
        require_id(spec.request_id, "request_id")
    check_spec_size(spec, max_bytes)


MAX_REPLICAS = 64  # a deployment's replicas
MAX_SERVE_BATCH = 4096  # rows a replica runs as one batch
MAX_SERVE_WAIT_MS = 10_000


def check_deployment_spec(spec) -> None:
    """A DeploymentSpec's fields (names as dataset names); raises InvalidArgument naming the
    first bad one. Resources and priority as for a task."""
    check_deployment_name(spec.name)
    check_dataset_name(spec.model, "model name")
    check_replica_count(spec.replicas)
    _check_resources_and_priority(spec)
    if spec.max_batch > MAX_SERVE_BATCH:
        raise InvalidArgument(f"max_batch is {spec.max_batch}; at most {MAX_SERVE_BATCH}")
    if spec.max_wait_ms > MAX_SERVE_WAIT_MS:
        raise InvalidArgument(f"max_wait_ms is {spec.max_wait_ms}; at most {MAX_SERVE_WAIT_MS}")


def check_replica_count(replicas: int) -> int:
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"replicas must be 1-{MAX_REPLICAS}, got {replicas}")
    return replicas


_DEPLOYMENT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
MAX_DEPLOYMENT_NAME = 63  # a DNS label: it may name an HTTP path or a host one day


def check_deployment_name(name: str) -> str:
    """[a-z0-9][a-z0-9-]*, at most 63 characters. Raises InvalidArgument."""
    if not name:
        raise InvalidArgument("deployment name is required")
    if len(name) > MAX_DEPLOYMENT_NAME or not _DEPLOYMENT_NAME_RE.match(name):
        raise InvalidArgument(
            f"deployment name {name[:40]!r} may hold only lowercase letters, digits and '-', "
            f"start with a letter or digit, and be at most {MAX_DEPLOYMENT_NAME} characters")
    return name


MAX_DATASET_NAME = 128
MAX_REPLICATION = 16
MAX_DATASET_SCHEMA = 64 << 10  # Dataset.schema: the input's JSON description (data put)
DEFAULT_REPLICATION = 2


def check_dataset_name(name: str, what: str = "dataset name") -> str:
    """Letters, digits, '.', '_', '-'; no leading dot, no '/': never a path. Raises InvalidArgument
    naming `what` ("model name" where a model is stored as a dataset)."""
    if not name:
        raise InvalidArgument(f"{what} is required")
    if len(name) > MAX_DATASET_NAME:
        raise InvalidArgument(f"{what} is {len(name)} characters; at most {MAX_DATASET_NAME}")
    if not _ID_RE.match(name) or ".." in name:
        raise InvalidArgument(
            f"{what} {name[:40]!r} may hold only letters, digits, '.', '_' and '-' (no '..')"
        )
    return name
