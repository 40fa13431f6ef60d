"""`lepton-agent` command line: flags > LEPTON_* env > --config TOML > defaults."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

# gRPC's C core reads this once, when grpc is first imported (lepton.common does): its
# absl logging prints INFO lines on stderr otherwise, one per failed TLS handshake (e.g.
# an etcd whose CA is not --etcd-ca) between the agent's own lines. An explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from lepton.common.config import load_config  # noqa: E402
from lepton.common.errors import LeptonError  # noqa: E402
from lepton.common.logs import setup_logging  # noqa: E402
from lepton.common.version import VERSION  # noqa: E402

logger = logging.getLogger("lepton.agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lepton-agent",
        description="Lepton agent: reports this machine's capacity; voters elect the coordinator.",
    )
    p.add_argument("--version", action="version", version=f"lepton-agent {VERSION}")
    # Every default is None so that only flags actually given override env and file.
    p.add_argument("--config", help="TOML file of settings (keys as below, with underscores)")
    p.add_argument("--data-dir", dest="data_dir", help="node id, log, shards, task logs (default /var/lib/lepton)")
    p.add_argument("--listen", help="HOST:PORT to bind (default 127.0.0.1:7070; port 0 picks one)")
    p.add_argument("--advertise", help="HOST:PORT others dial (default: --listen)")
    p.add_argument("--name", help="human name (default: the node id)")
    p.add_argument("--peers", help="comma-separated voter addresses (3 or 5)")
    p.add_argument("--join", help="comma-separated cluster addresses, for a worker")
    p.add_argument("--join-as-voter", dest="join_as_voter", action="store_true", default=None,
                   help="with --join: run a Raft node that waits to be added as a voter "
                        "(lepton-ctl cluster peers add)")
    p.add_argument("--state",
                   help="where the cluster state lives: raft (the built-in Raft among --peers; default) or "
                        "etcd://HOST:PORT[,HOST:PORT...] (an etcd cluster: this agent is a coordinator "
                        "candidate; workers --join candidates as with Raft)")
    p.add_argument("--cluster-name", dest="cluster_name",
                   help="names this cluster where it shares a store, e.g. the default etcd prefix (default: default)")
    p.add_argument("--etcd-prefix", dest="etcd_prefix",
                   help="etcd mode: the key prefix of this cluster's state (default /lepton/<cluster-name>)")
    p.add_argument("--etcd-ca", dest="etcd_ca", help="etcd mode: CA file of etcd's server certificates (TLS to etcd)")
    p.add_argument("--etcd-cert", dest="etcd_cert",
                   help="etcd mode: client certificate file for etcd (with --etcd-key and --etcd-ca)")
    p.add_argument("--etcd-key", dest="etcd_key", help="etcd mode: the client certificate's key file")
    p.add_argument("--etcd-lease-ttl", dest="etcd_lease_ttl", type=float,
                   help="etcd mode: the leader lease, whole seconds; failover takes about this long (default 2)")
    p.add_argument("--labels", help="k=v,k2=v2")
    p.add_argument("--heartbeat-interval", dest="heartbeat_interval_s", type=float, help="seconds (default 1)")
    p.add_argument("--suspect-after", dest="suspect_after_s", type=float, help="seconds (default 2)")
    p.add_argument("--down-after", dest="down_after_s", type=float, help="seconds (default 3)")
    p.add_argument("--failover-grace", dest="failover_grace_s", type=float,
                   help="seconds (default 3); a floor: the grace derived from the heartbeat timings "
                   "(9 s at a 1 s interval) applies when longer")
    p.add_argument("--max-heartbeats-per-s", dest="max_heartbeats_per_s", type=float,
                   help="the leader's heartbeat budget: above it agents are told to beat less "
                        "often and detection slows in proportion (default 2000)")
    p.add_argument("--raft-heartbeat", dest="raft_heartbeat_s", type=float, help="seconds (default 0.1)")
    p.add_argument("--election-timeout", dest="election_timeout_s", type=float,
                   help="seconds; drawn from [T, 2T) (default 1)")
    p.add_argument("--snapshot-every", dest="snapshot_every", type=int, help="log entries between snapshots")
    p.add_argument("--cpus", type=float, help="override the measured CPU count")
    p.add_argument("--memory", dest="memory_bytes", type=int, help="override the measured memory, bytes")
    p.add_argument("--fake-gpus", dest="fake_gpus", type=int, help="pretend to have N GPUs (tests)")
    p.add_argument("--auth", action="store_true", default=None,
                   help="require a token or certificate on every call (env LEPTON_AUTH=1)")
    p.add_argument("--log-level", dest="log_level", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--tls-dir", dest="tls_dir",
                   help="TLS folder (lepton-ctl certs init): mTLS on every connection")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="allow plaintext on a non-loopback --listen")
    # Off unless given: any fixed port would clash when several agents share a host.
    p.add_argument("--metrics-listen", dest="metrics_listen",
                   help="HOST:PORT for Prometheus /metrics, e.g. 127.0.0.1:9464 (default: off)")
    p.add_argument("--serve-http-listen", dest="serve_http_listen",
                   help="HOST:PORT for HTTP/JSON predictions, POST /v1/deployments/NAME/predict "
                        "(default: off; same TLS and tokens as gRPC)")
    p.add_argument("--shard-key-file", dest="shard_key_file",
                   help="the cluster secret (lepton-ctl secret init): encrypt shards at rest")
    p.add_argument("--peer-secret-file", dest="peer_secret_file",
                   help="voters only: a secret (lepton-ctl secret init) that proves Raft calls "
                        "without TLS; needed by the voters of a multi-voter cluster with --auth and no --tls-dir")
    p.add_argument("--task-log-max-bytes", dest="task_log_max_bytes",
                   help="rotate a task attempt's output, and each torch rank's log, past this size, "
                        "e.g. 64MiB (default 256MiB; 0: no cap)")
    p.add_argument("--task-retention", dest="task_retention_s", type=float,
                   help="seconds to keep finished attempts' (and torch jobs') folders after their exit is reported "
                        "(default 86400; 0: forever)")
    p.add_argument("--task-user", dest="task_user",
                   help="run tasks as this OS user (the agent must run as root): they cannot read "
                        "the data dir, node keys or tokens (default: nobody when the agent runs as "
                        "root, else the agent's user; none: as the agent's user)")
    p.add_argument("--task-path", dest="task_path",
                   help="the PATH tasks get, e.g. /opt/venv/bin:/usr/bin (default: the agent's PATH)")
    p.add_argument("--shard-inventory-interval", dest="shard_inventory_interval_s", type=float,
                   help="seconds between reports of this node's shards to the leader (default 300)")
    p.add_argument("--shard-orphan-grace", dest="shard_orphan_grace_s", type=float,
                   help="seconds an orphan blob (no dataset needs it here) is kept before it is "
                        "deleted (default 600; 0: never sweep)")
    p.add_argument("--max-spec-bytes", dest="max_spec_bytes",
                   help="voters: the largest task or job spec a submission may carry, e.g. 512KiB "
                        "(default 1MiB, at most 3MiB)")
    p.add_argument("--max-submit-inflight", dest="max_submit_inflight", type=int,
                   help="voters: user-submitted tasks the leader has in flight before it sheds more "
                        "with RESOURCE_EXHAUSTED and a retry hint (default 2000)")
    p.add_argument("--shard-reserve", dest="shard_reserve_bytes",
                   help="free space shard writes leave on the disk for the Raft log and task output, "
                        "e.g. 10GiB (default 2GiB; 0: none)")
    p.add_argument("--gc-keep-finished", dest="gc_keep_finished", type=int,
                   help="voters: finished tasks and jobs the state keeps, newest first (default 5000)")
    p.add_argument("--gc-max-age", dest="gc_max_age_s", type=float,
                   help="voters: seconds a finished task or job stays in the state (default 86400; 0: no limit)")
    p.add_argument("--gc-history", dest="gc_history", type=int,
                   help="voters: summaries of collected tasks kept for tasks show (default 20000)")
    p.add_argument("--gc-interval", dest="gc_interval_s", type=float,
                   help="voters: seconds between the leader's garbage collections (default 60)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(vars(args))
    except LeptonError as err:
        print(f"lepton-agent: {err.message}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    from lepton.agent.daemon import run_agent
    from lepton.agent.wakeups import count_wakeups_if_asked

    count_wakeups_if_asked()
    try:
        asyncio.run(run_agent(config))
    except LeptonError as err:
        print(f"lepton-agent: {err.message}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"lepton-agent: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
