"""`lepton-ctl`'s parser, commands and `main()`; the program starts in `cli.entry()`, which
imports this module. Reference: docs/cli.md.

Exit codes: 0 ok, 1 failed, 2 usage, 130 interrupted. An error is one line on stderr,
`lepton-ctl: <message>`; `--debug` adds logs and, for unexpected errors, the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lepton.common.errors import LeptonError
from lepton.common.version import VERSION

from . import cli_certs, cli_config, cli_data, cli_ml, cli_tasks, cli_top, contexts, local
from ._cli_common import (
    CLI_CONNECT_TIMEOUT_S,
    PROG,
    UsageError,
    _client,
    _global_options,
    _Parser,
    _positive_float,
    _positive_int,
    command,
    command_group,
    print_result,
    stop_signals_as_interrupt,
    unreachable_hint,
    wants_json,
    wide,
)
from .render import (
    cluster_status_view,
    make_console,
    node_detail,
    node_event_line,
    nodes_table,
    sort_nodes,
)
from .types import NODE_STATES

# PROG and CLI_CONNECT_TIMEOUT_S live in _cli_common; re-exported for tools and tests.
__all__ = ["CLI_CONNECT_TIMEOUT_S", "PROG", "build_parser", "main"]

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Control a Lepton cluster.")
    parser.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    _global_options(parser, defaults=True)
    common = _Parser(add_help=False)
    _global_options(common, defaults=False)
    top = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    cli_tasks.add_commands(top, common)
    from . import cli_jobs  # jobs list|show|cancel|logs, apply -f

    cli_jobs.register(top, common)
    cli_data.register(top, common)
    from . import cli_security  # tokens, audit, snapshot

    cli_security.register(top, common)
    from . import cli_quota  # per-user limits

    cli_quota.register(top, common)
    cli_certs.register(top, common)
    from . import cli_secret  # the cluster secret: shard encryption at rest

    cli_secret.register(top, common)
    cli_top.register(top, common)
    cli_ml.register(top, common)
    from . import cli_serve  # serve up|ls|show|scale|update|rm

    cli_serve.register(top, common)
    cli_config.register(top, common)
    cli_config.register_completion(top, lambda: parser)

    nodes_sub = command_group(top, "nodes", "list, show, drain and watch nodes")
    p = command(nodes_sub, "list", cmd_nodes_list, "list the nodes of the cluster", [common])
    p.add_argument(
        "--state",
        action="append",
        choices=NODE_STATES,
        help="only nodes in this state (repeatable)",
    )
    p = command(nodes_sub, "show", cmd_nodes_show, "show one node in full", [common])
    p.add_argument("node", metavar="ID", help="node id, unique id prefix, or name")
    p = command(
        nodes_sub,
        "drain",
        cmd_nodes_drain,
        "stop placing new work on a node (it keeps what it runs)",
        [common],
    )
    p.add_argument("node", metavar="ID", help="node id, unique id prefix, or name")
    p.add_argument(
        "--undo", action="store_true", help="end the drain: the node takes new work again"
    )
    command(nodes_sub, "watch", cmd_nodes_watch, "print node changes as they happen (Ctrl-C stops)", [common])

    cluster_sub = command_group(top, "cluster", "the coordinator and its voters")
    command(
        cluster_sub, "status", cmd_cluster_status, "leader, term, log progress, voters, node counts",
        [common],
    )
    from . import cli_voters  # cluster peers add|remove

    cli_voters.register(cluster_sub, common)
    from . import cli_gc  # cluster gc

    cli_gc.register(cluster_sub, common)

    loc_sub = command_group(top, "local", "a cluster of agent processes on this machine, for development")
    p = command(loc_sub, "up", cmd_local_up, "start N agents on loopback and wait until they are ready", [common])
    p.add_argument(
        "--agents", metavar="N", type=_positive_int, default=3, help="number of agents (default: 3)"
    )
    p.add_argument(
        "--voters",
        metavar="K",
        type=_positive_int,
        default=local.DEFAULT_VOTERS,
        help="how many of them elect the coordinator (default: 3 when --agents >= 3, else 1)",
    )
    p.add_argument(
        "--data-dir", metavar="DIR", default=local.DEFAULT_DATA_DIR, help="default: %(default)s"
    )
    p.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_positive_float,
        default=local.DEFAULT_WAIT_S,
        help="how long to wait for the agents to be ready (default: %(default)g)",
    )
    p = command(loc_sub, "down", cmd_local_down, "stop the local cluster's agents", [common])
    p.add_argument(
        "--data-dir", metavar="DIR", default=local.DEFAULT_DATA_DIR, help="default: %(default)s"
    )
    p.add_argument("--wipe", action="store_true", help="also delete the agents' data dirs")
    return parser


# -- commands -------------------------------------------------------------------------


def cmd_nodes_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        nodes = sort_nodes(c.nodes(states=args.state))
    return print_result(args, [n.to_dict() for n in nodes], lambda: nodes_table(nodes, wide=wide(args)),
                        empty="no nodes")


def cmd_nodes_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        node = c.find_node(args.node)
    return print_result(args, node.to_dict(), lambda: node_detail(node))


def cmd_nodes_drain(args: argparse.Namespace) -> int:
    with _client(args) as c:
        node = c.drain(c.find_node(args.node).id, enable=not args.undo)
    what = "is draining" if node.draining else "is no longer draining"
    return print_result(args, node.to_dict(), f"node {node.name} ({node.id}) {what}\n")


def cmd_nodes_watch(args: argparse.Namespace) -> int:
    with _client(args) as c, c.watch_nodes() as watch:
        for event in watch:
            # One compact object per line (JSON Lines), so it streams through `jq`.
            print_result(args, event.to_dict(), node_event_line(event) + "\n", line=True)
            sys.stdout.flush()
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.cluster_status()
    return print_result(args, status.to_dict(), lambda: cluster_status_view(status))


def cmd_local_up(args: argparse.Namespace) -> int:
    err = make_console(sys.stderr)

    def progress(msg: str) -> None:
        if err.is_terminal:
            err.print(f"[dim]{msg}…[/dim]")

    cluster = local.up(args.data_dir, args.agents, args.voters, wait=args.wait, progress=progress)
    _switch_context(lambda: contexts.switch_to_local(cluster.servers))
    if os.environ.get("LEPTON_SERVER"):
        sys.stderr.write(f"{PROG}: note: $LEPTON_SERVER is set and wins over the local context; "
                         "unset it to use this cluster\n")
    return print_result(args, cluster.to_dict(), lambda: _local_up_text(cluster, args.data_dir))


def _switch_context(change: Callable[[], Any]) -> Any:
    """A context change after `local up`/`down`; a broken client config costs a warning,
    not the cluster just started or stopped."""
    try:
        return change()
    except (LeptonError, OSError) as e:
        msg = e.message if isinstance(e, LeptonError) else str(e)
        sys.stderr.write(f"{PROG}: warning: the client config was not changed: {msg}\n")
        return None


def _local_up_text(cluster: local.LocalCluster, data_dir: str) -> str:
    noun = "voter" if cluster.voters == 1 else "voters"
    lines = [f"started {len(cluster.agents)} agent(s) in {data_dir} ({cluster.voters} {noun})"]
    width = max(len(a.name) for a in cluster.agents)
    for a in cluster.agents:
        lines.append(f"  {a.name:<{width}}  {a.address:<21}  pid {a.pid:<7}  log {a.log}")
        if a.metrics:
            lines.append(f"  {'':<{width}}  metrics {a.metrics}")
    lines += [f"servers: {cluster.servers}",
              f"context: {contexts.LOCAL_CONTEXT} (now current: lepton-ctl and Client() use it)"]
    if cluster.python:  # what `python` in a task is: the agents' --task-path starts there
        lines.append(f"tasks run python: {cluster.python}")
    else:
        lines.append(f"tasks find no `python` on their PATH: {cluster.task_path}")
    return "".join(line + "\n" for line in lines)


def cmd_local_down(args: argparse.Namespace) -> int:
    result = local.down(args.data_dir, wipe=args.wipe)
    back = _switch_context(contexts.switch_from_local) if result.found else None
    if back is not None and not wants_json(args):
        sys.stderr.write(f"{PROG}: current context: {back or 'none'}\n")
    return print_result(args, result.to_dict(), lambda: _local_down_text(result, args.data_dir))


def _local_down_text(result: local.DownResult, data_dir: str) -> str:
    if not result.found:
        text = f"no local cluster running in {data_dir}\n"
    else:
        n = len(result.stopped) + len(result.killed)
        killed = (
            f" ({len(result.killed)} killed after {local.STOP_GRACE_S:g}s)" if result.killed else ""
        )
        text = f"stopped {n} agent(s){killed}\n"
    if result.wiped:
        text += f"removed data dirs: {', '.join(result.wiped)}\n"
    return text


# -- entry point ----------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "failed"


def _fail(message: str) -> int:
    sys.stderr.write(f"{PROG}: {_one_line(message)}\n")
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run lepton-ctl with `argv` (default: sys.argv[1:]); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    except KeyboardInterrupt:
        return 130
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if args.debug
        else f"{PROG}: %(message)s",
    )
    try:
        with stop_signals_as_interrupt():
            return args.func(args)
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {_one_line(str(e))}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except LeptonError as e:
        hint = unreachable_hint(args) if e.message.startswith("cannot reach") else ""
        return _fail((e.message or type(e).__name__) + hint)
    except BrokenPipeError:
        # `lepton-ctl nodes list | head -1`: the reader left; stop quietly, and keep Python
        # from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        if args.debug:
            raise
        # A file or folder of the user's that is not what the command needs (a missing
        # folder, a device, no room): its name and why, not "unexpected error".
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - the one-line promise holds for bugs too
        if args.debug:
            raise
        return _fail(f"unexpected error: {type(e).__name__}: {e} (run with --debug for details)")
