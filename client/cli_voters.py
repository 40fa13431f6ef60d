"""`lepton-ctl cluster peers add|remove HOST:PORT`: change the Raft voter set by one server."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._cli_common import _client, command, command_group, print_result
from .render import cluster_status_view


def register(cluster_sub: Any, common: argparse.ArgumentParser) -> None:
    peers_sub = command_group(
        cluster_sub, "peers", "add or remove a Raft voter (one at a time)",
        description="Add or remove a Raft voter, one server at a time, through the leader.",
    )
    p = command(peers_sub, "add", cmd_peers_add,
                "make an agent started with --join-as-voter a voter (it catches up first)", [common])
    p.add_argument("address", metavar="HOST:PORT", help="the agent's advertised address")
    p = command(peers_sub, "remove", cmd_peers_remove, "remove a voter (the leader steps down if it is the one)",
                [common])
    p.add_argument("address", metavar="HOST:PORT", help="the voter's advertised address")


def cmd_peers_add(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.add_voter(args.address)
    return _report(args, status, f"added {args.address}")


def cmd_peers_remove(args: argparse.Namespace) -> int:
    with _client(args) as c:
        status = c.remove_voter(args.address)
    return _report(args, status, f"removed {args.address}")


def _report(args: argparse.Namespace, status: Any, done: str) -> int:
    def human() -> Any:
        voters = ", ".join(v.address for v in status.voters if v.role != "learner")
        sys.stdout.write(f"{done}; voters: {voters}\n")
        return cluster_status_view(status)

    return print_result(args, status.to_dict(), human)
