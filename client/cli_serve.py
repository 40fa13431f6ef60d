"""lepton-ctl's `serve` commands: deployments of a model behind every agent (docs/serving.md).
Hooked into lepton-ctl with `register(top, common)`.

    lepton-ctl serve up MODEL --name S --replicas N [--cpu C --mem M --gpus G]
                        [--max-batch B --max-wait-ms W] [--priority P] [--pack]
    lepton-ctl serve ls
    lepton-ctl serve show S
    lepton-ctl serve scale S N
    lepton-ctl serve update S MODEL2
    lepton-ctl serve rm S
    lepton-ctl serve predict S --input FILE.npy     (client/cli_predict.py)
    lepton-ctl serve predict S --input FILE.npy [-o json]   (client/cli_predict.py)

`up`, `scale`, `update` and `rm` wait until the replicas are ready (rolled, removed) unless
`--no-wait`; `--wait-timeout` bounds the wait, and Ctrl-C stops only the waiting: the
deployment carries on, and the command says so.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.table import Table

from lepton.client.deployments import DeploymentInfo

from ._cli_common import (
    PROG,
    _client,
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _positive_int,
    _size,
    command,
    command_group,
    interrupt_reason,
    print_result,
    wants_json,
)
from .render import human_bytes

__all__ = ["register"]

DEFAULT_WAIT_S = 600.0


def deployment_dict(d: DeploymentInfo) -> dict[str, Any]:
    return {
        "name": d.name, "model": d.model, "generation": d.generation, "replicas": d.replicas, "ready": d.ready,
        "state": d.state, "message": d.message, "owner": d.owner,
        "resources": {"cpu": d.cpu, "memory_bytes": d.memory_bytes, "gpus": d.gpus},
        "max_batch": d.max_batch, "max_wait_ms": d.max_wait_ms, "priority": d.priority, "pack": d.pack,
        "created_at_ms": d.created_at_ms, "updated_at_ms": d.updated_at_ms,
        "replica_list": [{"task_id": r.task_id, "node_id": r.node_id, "generation": r.generation,
                          "model": r.model, "state": r.state} for r in d.replica_list],
        "stats": {"requests": d.stats.requests, "errors": d.stats.errors,
                  "requests_per_s": d.stats.requests_per_s, "p50_ms": d.stats.p50_ms,
                  "p99_ms": d.stats.p99_ms, "mean_batch_rows": d.stats.mean_batch_rows},
    }


def _ms(value: float) -> str:
    return f"{value:.1f}" if value else "-"


def _list_table(deps: list[DeploymentInfo]) -> Table:
    out = Table(box=None, pad_edge=False)
    for col in ("NAME", "MODEL", "GEN", "READY", "STATE", "REQ/S", "P50 MS", "P99 MS", "ERRORS"):
        out.add_column(col)
    for d in deps:
        out.add_row(d.name, d.model, str(d.generation), f"{d.ready}/{d.replicas}", d.state,
                    f"{d.stats.requests_per_s:.1f}", _ms(d.stats.p50_ms), _ms(d.stats.p99_ms), str(d.stats.errors))
    return out


def _show_text(d: DeploymentInfo, node_names: dict[str, str]) -> str:
    s = d.stats
    lines = [
        f"name:        {d.name}",
        f"model:       {d.model} (generation {d.generation})",
        f"state:       {d.state} ({d.message})" if d.message else f"state:       {d.state}",
        f"replicas:    {d.ready}/{d.replicas} ready" + (" (packed)" if d.pack else ""),
        f"per replica: cpu {d.cpu:g}, memory {human_bytes(d.memory_bytes) if d.memory_bytes else '-'}, gpus {d.gpus}",
        "batching:    " + (f"up to {d.max_batch} rows, waiting {d.max_wait_ms} ms" if d.max_batch > 1 else "off"),
        f"owner:       {d.owner or '-'}",
        f"requests:    {s.requests} ({s.requests_per_s:.1f}/s), errors {s.errors}, "
        f"p50 {_ms(s.p50_ms)} ms, p99 {_ms(s.p99_ms)} ms, mean batch {s.mean_batch_rows:.1f} rows",
    ]
    if d.replica_list:
        lines.append("")
        lines.append(f"{'TASK':<16} {'NODE':<24} {'GEN':>4}  {'MODEL':<20} STATE")
        lines += [f"{r.task_id:<16} {node_names.get(r.node_id, r.node_id) or '-':<24} {r.generation:>4}  "
                  f"{r.model:<20} {r.state}"
                  for r in d.replica_list]
    return "\n".join(lines) + "\n"


def _wait(args: argparse.Namespace, c: Any, d: DeploymentInfo, *, gone: bool = False) -> DeploymentInfo | None:
    """Wait (unless --no-wait) for the deployment to be ready (or `gone`), saying each new
    state on stderr. Ctrl-C: the deployment carries on, and this says so."""
    if args.no_wait:
        return d

    def say(info: DeploymentInfo) -> None:
        sys.stderr.write(f"{PROG}: {info.name}: {info.state}: {info.message}\n")
        sys.stderr.flush()

    try:
        return c.wait_deployment(d.name, timeout=args.wait_timeout, gone=gone, on_change=say)
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{PROG}: {interrupt_reason(e)}: stopped waiting; deployment {d.name} carries on "
                         f"('{PROG} serve show {d.name}')\n")
        raise  # lepton-ctl exits 130


def _done(args: argparse.Namespace, d: DeploymentInfo | None, text: str) -> int:
    return print_result(args, deployment_dict(d) if d is not None else {}, text)


def cmd_up(args: argparse.Namespace) -> int:
    with _client(args) as c:
        d = c.create_deployment(args.name, args.model, replicas=args.replicas, cpu=args.cpu,
                                memory_bytes=args.mem, gpus=args.gpus, max_batch=args.max_batch,
                                max_wait_ms=args.max_wait_ms, priority=args.priority, pack=args.pack)
        d = _wait(args, c, d)
    return _done(args, d, f"{d.name}: serving {d.model} with {d.ready}/{d.replicas} replica(s) ready\n")


def cmd_scale(args: argparse.Namespace) -> int:
    with _client(args) as c:
        d = _wait(args, c, c.scale_deployment(args.name, args.replicas))
    return _done(args, d, f"{d.name}: {d.ready}/{d.replicas} replica(s) ready\n")


def cmd_update(args: argparse.Namespace) -> int:
    with _client(args) as c:
        d = _wait(args, c, c.update_deployment(args.name, args.model))
    return _done(args, d, f"{d.name}: generation {d.generation} ({d.model}): {d.ready}/{d.replicas} ready\n")


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        d = c.delete_deployment(args.name)
        if _wait(args, c, d, gone=True) is None:
            return print_result(args, {"name": args.name, "removed": True}, f"{args.name}: removed\n")
    return _done(args, d, f"{d.name}: stopping ({d.message})\n")


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        deps = c.list_deployments()
    return print_result(args, [deployment_dict(d) for d in deps], lambda: _list_table(deps), empty="no deployments")


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        d = c.get_deployment(args.name)
        # Nodes by name in the table (ids in JSON); one more call, for people only.
        names = {} if wants_json(args) or not d.replica_list else {n.id: n.name for n in c.nodes()}
    return print_result(args, deployment_dict(d), lambda: _show_text(d, names))


def _wait_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--no-wait", action="store_true", help=f"return at once instead of waiting until {what}")
    p.add_argument("--wait-timeout", type=_positive_float, default=DEFAULT_WAIT_S, metavar="S",
                   help=f"give up waiting after S seconds (default {DEFAULT_WAIT_S:g}); the deployment carries on")


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `serve up|ls|show|scale|update|rm` to lepton-ctl's subcommands `top`."""
    sub = command_group(top, "serve", "serve a trained model behind every agent: up, ls, show, scale, update, rm, predict")
    p = command(sub, "up", cmd_up, "deploy MODEL as NAME with N replicas (spread across nodes unless --pack)",
                [common])
    p.add_argument("model", metavar="MODEL", help="a stored model (lepton-ctl models list)")
    p.add_argument("--name", required=True, help="the deployment's name: lowercase letters, digits, '-'")
    p.add_argument("--replicas", type=_positive_int, default=1, metavar="N", help="replicas (default 1)")
    g = p.add_argument_group("per replica")
    g.add_argument("--cpu", type=_non_negative_float, default=0.0, help="cores, may be fractional (0.5)")
    g.add_argument("--mem", metavar="SIZE", type=_size, default=0, help="memory: bytes, 512MiB, 2G")
    g.add_argument("--gpus", metavar="G", type=_non_negative_int, default=0,
                   help="GPUs; the replica's model moves to the first")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=_positive_int, default=1, metavar="B",
                   help="rows run as one batch at most (default 1: batching off)")
    g.add_argument("--max-wait-ms", type=_non_negative_int, default=0, metavar="W",
                   help="how long a replica waits for more requests before running a partial batch")
    p.add_argument("--priority", type=int, default=0, help="as for tasks: may preempt lower priorities")
    p.add_argument("--pack", action="store_true", help="let replicas share a node (default: spread)")
    _wait_options(p, "every replica is ready")
    command(sub, "ls", cmd_ls, "list deployments: replicas ready, state, requests/s, latency", [common])
    p = command(sub, "show", cmd_show, "one deployment: its replicas, nodes, states and request figures", [common])
    p.add_argument("name", metavar="NAME")
    p = command(sub, "scale", cmd_scale, "change the number of replicas (scaling down drains the surplus)",
                [common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("replicas", metavar="N", type=_positive_int)
    _wait_options(p, "the count is reached")
    p = command(sub, "update", cmd_update,
                "roll NAME over to MODEL: one new replica is ready before an old one stops", [common])
    p.add_argument("name", metavar="NAME")
    p.add_argument("model", metavar="MODEL")
    _wait_options(p, "every replica runs the new model")
    p = command(sub, "rm", cmd_rm, "drain every replica and remove the deployment", [common])
    p.add_argument("name", metavar="NAME")
    _wait_options(p, "it is removed")
    from .cli_predict import register_predict

    register_predict(sub, common)  # `serve predict` (client/cli_predict.py)
