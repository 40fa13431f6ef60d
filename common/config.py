"""The agent's settings: one dataclass, layered defaults < TOML file < LEPTON_* env < flags.

Each field carries a comment saying why it exists or why its default is what it is.
`__post_init__` validates, so a bad value fails at start with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lepton.common.errors import InvalidArgument
from lepton.common.sizes import parse_size
from lepton.common.validation import (
    DEFAULT_MAX_SPEC_BYTES,
    MAX_NAME,
    check_address,
    check_spec_bytes_setting,
    check_text,
    join_host_port,
    split_host_port,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PORT = 7070
DEFAULT_TASK_USER = "nobody"  # what tasks run as when the agent is root and --task-user is unset
ENV_PREFIX = "LEPTON_"
MIN_TASK_LOG_BYTES = 4096  # below a disk block, every rotation would copy whole blocks for nothing
SIZE_FIELDS = ("task_log_max_bytes", "shard_reserve_bytes", "max_spec_bytes")  # also take "256MiB"; parsed in __post_init__


def split_list(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'a,b , c' -> ['a', 'b', 'c']; lists pass through."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [part.strip() for part in str(value).split(",") if part.strip()]


def parse_labels(value: str | Mapping[str, str] | None) -> dict[str, str]:
    """'k=v,k2=v2' -> {'k': 'v', 'k2': 'v2'}."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    labels: dict[str, str] = {}
    for item in split_list(value):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgument(f"label {item!r} is not key=value")
        labels[key.strip()] = val.strip()
    return labels


@dataclass
class AgentConfig:
    # Node id, Raft log and snapshots, shards and task logs live here; losing it loses the node's identity.
    data_dir: str = "/var/lib/lepton"
    # Where the gRPC server binds. Loopback by default so a bare start exposes nothing.
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    # What others dial; differs from `listen` behind NAT or when binding 0.0.0.0.
    advertise: str = ""
    # A human name for tables and logs; the stable identity is the node id in data_dir.
    name: str = ""
    # The voters (3 or 5). Empty with empty `join`: a one-voter cluster of its own (dev mode).
    peers: list[str] = field(default_factory=list)
    # Any known cluster addresses for a worker; the leader is found through them.
    join: list[str] = field(default_factory=list)
    # With `join`: also run a Raft node outside the voter set, waiting to be added as a voter
    # (`lepton-ctl cluster peers add`). Once added, the voter set in its log wins over flags.
    join_as_voter: bool = False
    # Free-form key=value labels that task constraints match against.
    labels: dict[str, str] = field(default_factory=dict)
    # 1 s keeps detection in seconds; past max_heartbeats_per_s the leader stretches it.
    heartbeat_interval_s: float = 1.0
    # A node that misses two heartbeats is suspect: not scheduled on, not yet failed.
    suspect_after_s: float = 2.0
    # Declared down (its work is requeued) after this long without a heartbeat.
    down_after_s: float = 3.0
    # A floor for the failover grace (no node suspected or down before it after a failover):
    # the leader derives one from the agents' timings (common/failover.py; 9 s at a 1 s
    # interval) and uses the longer of the two.
    failover_grace_s: float = 3.0
    # The least time between the leader's liveness cycles (a burst of node changes makes one).
    # The loop sleeps until the next node could turn suspect or down, so detection is on time.
    liveness_interval_s: float = 0.2
    # The leader's heartbeat budget (Nomad's max_heartbeats_per_second): past this times
    # heartbeat_interval_s live nodes, agents are told to beat every
    # live_nodes / max_heartbeats_per_s seconds and suspect/down stretch by the same factor.
    # 2,000/s is ~0.6 cores of the leader's Python (~0.3 ms a beat, benchmarks/heartbeats.py)
    # and keeps second-level detection up to 2,000 nodes; beyond, it grows linearly.
    max_heartbeats_per_s: float = 2000.0
    # Raft leader heartbeat; ~10x below the election timeout keeps elections rare.
    raft_heartbeat_s: float = 0.1
    # Raft election timeout, drawn from [this, 2x this): failover takes about this long.
    election_timeout_s: float = 1.0
    # Entries between state snapshots; bounds replay time at start and the log's disk use.
    snapshot_every: int = 10_000
    # On SIGTERM, in-flight RPCs get this long to finish.
    shutdown_grace_s: float = 5.0
    # Capacity overrides, for tests and for reserving part of a host. None: measure.
    cpus: float | None = None
    memory_bytes: int | None = None
    # Pretend this many GPUs exist (16 GiB each); for tests on machines without one.
    fake_gpus: int | None = None
    # DEBUG for troubleshooting; INFO logs each state change once.
    log_level: str = "INFO"
    # Authenticate and authorize every RPC (tokens, certificates; lepton.common.auth). Off by
    # default so a dev cluster works bare; turn it on for anything shared.
    auth: bool = False
    # TLS folder (`lepton-ctl certs init`): mTLS on every connection, in and out.
    tls_dir: str = ""
    # Allow plaintext on a non-loopback --listen; without it such an agent refuses to start.
    insecure: bool = False
    # Prometheus /metrics HOST:PORT; empty (or port 0): not served. Off unless asked, since
    # every fixed default clashes with something: 9100 is node_exporter's, and a port
    # derived from --listen (7071) is the next agent's gRPC port on a shared host. Use a
    # loopback host: metrics name nodes and addresses. A port that cannot be bound is a
    # warning, not a dead agent.
    metrics_listen: str = ""
    # HTTP/JSON predictions (POST /v1/deployments/S/predict, docs/serving.md) on HOST:PORT
    # (port 0: any free one, named in agent.json); empty: not served. With --tls-dir it is HTTPS with the node certificate and
    # callers present a client certificate of the cluster CA, as on gRPC; with --auth, tokens.
    serve_http_listen: str = ""
    # The cluster secret's file (`lepton-ctl secret init`); set: shards are encrypted at rest
    # with a key derived from it. The same file on every agent; only its path is ever logged.
    shard_key_file: str = ""
    # Voters only (`lepton-ctl secret init`, a different file from shard_key_file, which
    # workers hold too): proves Raft calls between voters when there is no TLS. Needed by
    # voters of a multi-voter cluster with --auth and no --tls-dir (lepton.coordinator.raft.peer_auth).
    peer_secret_file: str = ""
    # Per task attempt, output.log is rotated to output.log.1 past this many bytes ("256MiB"
    # works), so one chatty task cannot fill the disk: about 2x this per attempt. 0: no cap.
    # Torch jobs' rank logs (rank_<R>.log -> .log.1) are capped the same way.
    task_log_max_bytes: int = 256 << 20
    # Finished attempts' folders (output, workdir) are deleted this long after their exit was
    # reported: a day leaves time to read the output of last night's runs. 0: keep forever.
    # A torch job's folder (jobs/<id>) goes once all its attempts here are that old.
    task_retention_s: float = 24 * 3600.0
    # Run tasks as this OS user (the agent must be root): they cannot read the data dir,
    # the node's key or its tokens (lepton.agent.task_identity). Unset: `nobody` when the
    # agent runs as root (resolved in __post_init__, so the effective config says which),
    # else the agent's own user. "" or "none": as the agent's user (an opt-out as root).
    task_user: str | None = None
    # The PATH tasks get (os.pathsep-separated), e.g. a venv's bin first so that `python` in
    # a task is that venv's; "": the agent's own PATH. A task's own env PATH still wins.
    # `lepton-ctl local up` sets it to the folder of the Python that runs it, then PATH.
    task_path: str = ""
    # How often the agent reports its shards to the leader (a digest; the listing only when
    # something changed), which re-lists a returning node's copies and finds orphans. It
    # also reports at every (re-)registration. Minutes: nothing here is urgent.
    shard_inventory_interval_s: float = 300.0
    # A blob no dataset needs on this node (a deleted dataset's, a dropped replica, a crashed
    # put's) is deleted once the leader says so and it was stored or touched this long ago
    # (a monotonic age: blobs found at start count from then): longer than a put takes from
    # upload to commit. 0: never sweep.
    shard_orphan_grace_s: float = 600.0
    # Free space shard writes leave on the data dir's file system ("2GiB" works): the room
    # of the Raft log and snapshots (a voter that cannot write its log stops) and of task
    # output. A put that would cut into it is refused (RESOURCE_EXHAUSTED). 0: none.
    shard_reserve_bytes: int = 2 << 30
    # Garbage collection of finished tasks and jobs (voters; the leader's, like Nomad's job
    # GC): the state keeps at most gc_keep_finished of them (a job counts once) and none
    # finished more than gc_max_age_s ago (0: no age limit), checked every gc_interval_s.
    # What goes leaves a summary in a history of at most gc_history (`tasks show` reads it).
    gc_keep_finished: int = 5_000
    gc_max_age_s: float = 24 * 3600.0
    gc_history: int = 20_000
    gc_interval_s: float = 60.0
    # Voters: the largest task or job spec (serialized; "1MiB" works) a submission may carry.
    # Far below gRPC's 16 MiB message limit so every log entry reaches a follower in one
    # message and the state stays small (lepton.common.validation's size caps); at most 3MiB.
    max_spec_bytes: int = DEFAULT_MAX_SPEC_BYTES
    # Voters: user-submitted tasks the leader has in flight (proposed, not yet applied)
    # before it sheds more with RESOURCE_EXHAUSTED and a retry hint (coordinator/api/admission.py).
    max_submit_inflight: int = 2000
    # Where the cluster state lives: "raft" (the built-in Raft among --peers, the default:
    # the cluster needs nothing besides itself) or "etcd://HOST:PORT[,HOST:PORT...]" (an
    # etcd cluster the operator runs; every agent started with it is a coordinator
    # candidate, workers --join them as with Raft). Normalized in __post_init__.
    state: str = "raft"
    # Names this cluster in places shared with others: the default etcd prefix
    # (/lepton/<cluster_name>), so several clusters can share one etcd.
    cluster_name: str = "default"
    # etcd mode: every key of this cluster lives under it; "" means /lepton/<cluster_name>.
    etcd_prefix: str = ""
    # etcd mode, TLS to etcd: the CA that signed etcd's server certificates, and this
    # candidate's client certificate and key when etcd asks for one. Operator files,
    # separate from --tls-dir (etcd has its own CA). Made absolute in __post_init__.
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    # etcd mode: the leader key's lease TTL (seconds, whole). Failover takes about this long;
    # shorter makes a busy etcd's slow moment depose a healthy leader.
    etcd_lease_ttl: float = 2.0

    def __post_init__(self) -> None:
        if self.task_user is None:  # the default: a root agent never lends root to tasks
            self.task_user = DEFAULT_TASK_USER if os.geteuid() == 0 else ""
        elif self.task_user.strip().lower() in ("", "none"):
            self.task_user = ""
        self.peers = split_list(self.peers)
        self.join = split_list(self.join)
        self.labels = parse_labels(self.labels)
        if not self.data_dir:
            raise InvalidArgument("data_dir must not be empty")
        # The node's attempt fence and its tasks do not share the agent's working folder.
        self.data_dir = os.path.abspath(self.data_dir)
        check_address(self.listen, "listen", bind=True)
        if self.advertise:
            check_address(self.advertise, "advertise")
        if self.metrics_listen:
            check_address(self.metrics_listen, "metrics_listen", bind=True)
        if self.serve_http_listen:
            check_address(self.serve_http_listen, "serve_http_listen", bind=True)
        for addr in self.peers + self.join:
            check_address(addr, "peer/join address")
        if self.peers and len(self.peers) not in (1, 3, 5):
            raise InvalidArgument(f"peers lists {len(self.peers)} voters; use 1, 3 or 5")
        if self.join_as_voter and (self.peers or not self.join):
            raise InvalidArgument("join_as_voter needs --join (the cluster's addresses) and no --peers")
        self._check_state()
        if self.heartbeat_interval_s <= 0:
            raise InvalidArgument("heartbeat_interval_s must be > 0")
        if not 0 < self.suspect_after_s <= self.down_after_s:
            raise InvalidArgument("need 0 < suspect_after_s <= down_after_s")
        if self.down_after_s < self.heartbeat_interval_s:
            raise InvalidArgument("down_after_s must be at least one heartbeat interval")
        if not 0 < self.max_heartbeats_per_s < math.inf:
            raise InvalidArgument("max_heartbeats_per_s must be a number > 0")
        if not 0 < self.raft_heartbeat_s < self.election_timeout_s:
            raise InvalidArgument("need 0 < raft_heartbeat_s < election_timeout_s")
        if self.snapshot_every < 1:
            raise InvalidArgument("snapshot_every must be >= 1")
        if self.cpus is not None and self.cpus <= 0:
            raise InvalidArgument("cpus must be > 0")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise InvalidArgument("memory_bytes must be > 0")
        if self.fake_gpus is not None and not 0 <= self.fake_gpus <= 64:
            raise InvalidArgument("fake_gpus must be between 0 and 64")
        self.task_log_max_bytes = parse_size(self.task_log_max_bytes, "task_log_max_bytes")
        if 0 < self.task_log_max_bytes < MIN_TASK_LOG_BYTES:
            raise InvalidArgument(f"task_log_max_bytes must be 0 (no cap) or at least {MIN_TASK_LOG_BYTES}")
        if not 0 <= self.task_retention_s < math.inf:
            raise InvalidArgument("task_retention_s must be >= 0 (0: keep forever)")
        if not 0 < self.shard_inventory_interval_s <= 24 * 3600:
            raise InvalidArgument("shard_inventory_interval_s must be > 0 and at most a day")
        if not 0 <= self.shard_orphan_grace_s <= 30 * 24 * 3600:
            raise InvalidArgument("shard_orphan_grace_s must be between 0 (no sweeping) and 30 days")
        self.shard_reserve_bytes = parse_size(self.shard_reserve_bytes, "shard_reserve_bytes")
        if not 0 <= self.gc_keep_finished <= 10_000_000 or not 0 <= self.gc_history <= 10_000_000:
            raise InvalidArgument("gc_keep_finished and gc_history must be between 0 and 10,000,000")
        if not 0 <= self.gc_max_age_s < math.inf:
            raise InvalidArgument("gc_max_age_s must be >= 0 (0: no age limit)")
        if not 0 < self.gc_interval_s <= 24 * 3600:
            raise InvalidArgument("gc_interval_s must be > 0 and at most a day")
        if not 1 <= self.max_submit_inflight <= 10_000_000:
            raise InvalidArgument("max_submit_inflight must be between 1 and 10,000,000")
        self.max_spec_bytes = check_spec_bytes_setting(parse_size(self.max_spec_bytes, "max_spec_bytes"))
        if self.shard_key_file:
            from lepton.common import cluster_secret

            # Absolute, so a task (a torch job reading shards) finds it from any directory.
            self.shard_key_file = os.path.abspath(self.shard_key_file)
            cluster_secret.read(self.shard_key_file)  # a bad file fails the start, naming it
        if self.peer_secret_file:
            from lepton.common import cluster_secret

            self.peer_secret_file = os.path.abspath(self.peer_secret_file)
            cluster_secret.read(self.peer_secret_file, what="peer secret file")
        self.log_level = self.log_level.upper()
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise InvalidArgument(f"log_level {self.log_level!r} is not DEBUG/INFO/WARNING/ERROR")
        if not self.tls_dir and not self.insecure:
            from lepton.common.channels import is_loopback

            if not is_loopback(split_host_port(self.listen)[0]):
                # Anyone who can reach the port could join, submit or read: say so up front.
                raise InvalidArgument(
                    f"refusing to listen on {self.listen} without TLS: give --tls-dir DIR "
                    "(see lepton-ctl certs init), or --insecure to accept plaintext"
                )
            metrics_host, metrics_port = split_host_port(self.metrics_listen) if self.metrics_listen else ("", 0)
            if metrics_port != 0 and not is_loopback(metrics_host):
                # /metrics names nodes, addresses and load: the same rule as --listen.
                raise InvalidArgument(
                    f"refusing to serve metrics on {self.metrics_listen} without TLS: give --tls-dir DIR "
                    "(scrapers then need a client certificate of the cluster CA), a loopback "
                    "--metrics-listen, or --insecure to accept plaintext"
                )
            http_host, http_port = split_host_port(self.serve_http_listen) if self.serve_http_listen else ("", 0)
            if http_port != 0 and not is_loopback(http_host):
                raise InvalidArgument(
                    f"refusing to serve predictions on {self.serve_http_listen} without TLS: give --tls-dir "
                    "DIR, a loopback --serve-http-listen, or --insecure to accept plaintext"
                )

    def _check_state(self) -> None:
        """Normalize and check `state` and the etcd settings; one-line errors naming the flag."""
        state = self.state.strip()
        self.state = state.lower() if state.lower() == "raft" else state
        check_text(self.cluster_name, "cluster_name", MAX_NAME)
        if not self.cluster_name or "/" in self.cluster_name or any(c.isspace() for c in self.cluster_name):
            raise InvalidArgument(f"cluster_name {self.cluster_name!r} must be non-empty, without '/' or spaces")
        etcd_files = {"etcd_ca": self.etcd_ca, "etcd_cert": self.etcd_cert, "etcd_key": self.etcd_key}
        if self.state == "raft":
            given = [f"--{k.replace('_', '-')}" for k, v in etcd_files.items() if v]
            if given or self.etcd_prefix:
                raise InvalidArgument(f"{', '.join(given or ['--etcd-prefix'])} need --state etcd://HOST:PORT")
            return
        scheme, sep, rest = state.partition("://")
        if not sep or scheme.lower() != "etcd":
            raise InvalidArgument(f"state {state!r} is neither raft nor etcd://HOST:PORT[,HOST:PORT...]")
        endpoints = split_list(rest.rstrip("/"))
        if not endpoints:
            raise InvalidArgument(f"state {state!r} lists no etcd endpoint; give etcd://HOST:PORT[,HOST:PORT...]")
        for endpoint in endpoints:
            check_address(endpoint, "etcd endpoint")
        if len(set(endpoints)) != len(endpoints):
            raise InvalidArgument(f"state {state!r} lists an etcd endpoint twice")
        self.state = "etcd://" + ",".join(endpoints)
        if self.peers or self.join_as_voter:
            raise InvalidArgument(
                "--state etcd cannot be mixed with --peers or --join-as-voter: with etcd every agent "
                "started with --state etcd is a coordinator candidate, and workers use --join"
            )
        if bool(self.etcd_cert) != bool(self.etcd_key):
            raise InvalidArgument("--etcd-cert and --etcd-key go together (a client certificate and its key)")
        if self.etcd_cert and not self.etcd_ca:
            raise InvalidArgument("--etcd-cert needs --etcd-ca (the CA of etcd's server certificates)")
        for name, path in etcd_files.items():
            if path:
                if not os.access(path, os.R_OK) or not os.path.isfile(path):
                    raise InvalidArgument(f"--{name.replace('_', '-')} {path}: not a readable file")
                _check_pem(name, path)
                setattr(self, name, os.path.abspath(path))
        prefix = (self.etcd_prefix or f"/lepton/{self.cluster_name}").rstrip("/")
        check_text(prefix, "etcd_prefix", MAX_NAME)
        if not prefix.startswith("/") or any(c.isspace() for c in prefix):
            raise InvalidArgument(f"etcd_prefix {self.etcd_prefix!r} must start with '/' and hold no spaces")
        self.etcd_prefix = prefix
        if not 1 <= self.etcd_lease_ttl <= 60 or self.etcd_lease_ttl != int(self.etcd_lease_ttl):
            raise InvalidArgument("etcd_lease_ttl must be whole seconds between 1 and 60 (etcd leases are)")

    @property
    def uses_etcd(self) -> bool:
        """The cluster state lives in etcd (--state etcd://...): this agent is a candidate."""
        return self.state.startswith("etcd://")

    @property
    def etcd_endpoints(self) -> list[str]:
        """HOST:PORT of each etcd member given by --state; [] in raft mode."""
        return self.state.removeprefix("etcd://").split(",") if self.uses_etcd else []

    @property
    def advertise_address(self) -> str:
        if self.advertise:
            return self.advertise
        host, port = split_host_port(self.listen)
        if host in ("0.0.0.0", "::"):
            import socket

            host = socket.gethostname()
        return join_host_port(host, port)

    @property
    def dev_mode(self) -> bool:
        """No peers, nothing to join, no etcd: a one-voter cluster of its own."""
        return not self.peers and not self.join and not self.uses_etcd

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(f: dataclasses.Field[Any], raw: Any) -> Any:
    """Turn a string (env var) or TOML value into the field's type."""
    kind = str(f.type)
    if raw is None or not isinstance(raw, str) or f.name in SIZE_FIELDS:
        return raw
    if kind.startswith("bool"):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise InvalidArgument(f"{f.name} = {raw!r} is not true or false")
    try:
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("int"):
            return int(raw)
    except ValueError:
        raise InvalidArgument(f"{f.name} = {raw!r} is not a number") from None
    return raw  # lists and dicts are parsed from strings in __post_init__


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> AgentConfig:
    """Defaults < file < LEPTON_* env < flags. Flags whose value is None are unset."""
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(AgentConfig)}
    values: dict[str, Any] = {}
    path = config_file or (flags or {}).get("config") or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as err:
            raise InvalidArgument(f"cannot read config file {path}: {err.strerror}") from None
        except tomllib.TOMLDecodeError as err:
            raise InvalidArgument(f"config file {path} is not valid TOML: {err}") from None
        for key, value in doc.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise InvalidArgument(f"config file {path}: unknown setting {key!r}")
            values[name] = _coerce(fields[name], value)
    for name, f in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(f, raw)
    for name, value in (flags or {}).items():
        if name in fields and value is not None:
            values[name] = _coerce(fields[name], value)
    return AgentConfig(**values)


def _check_pem(name: str, path: str) -> None:
    """An etcd TLS file must be what its flag says (PEM certificates, or an unencrypted PEM
    key): a wrong file otherwise surfaces only as gRPC's own error lines, over and over."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    flag, what = f"--{name.replace('_', '-')}", "an unencrypted PEM private key" if name == "etcd_key" else "PEM certificates"
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
        if name == "etcd_key":
            serialization.load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificates(data)
    except (OSError, ValueError, TypeError):
        raise InvalidArgument(f"{flag} {path}: not {what}") from None
