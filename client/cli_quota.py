"""lepton-ctl's `quota set|show` (admin): per-user limits on pending tasks, dataset bytes
and API tokens, kept in the cluster state (coordinator/state/quotas.py). Hooked into
lepton-ctl with `register(top, common)`.

    lepton-ctl quota set alice --pending-tasks 1000 --dataset-bytes 50GiB --tokens 5
    lepton-ctl quota set alice --pending-tasks unlimited
    lepton-ctl quota show [alice]

A limit not named keeps its value; `unlimited` lifts it. A submission over a limit is
refused with RESOURCE_EXHAUSTED naming the quota and its value.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.table import Table

from lepton.common.paging import MAX_PAGE, walk_pages
from lepton.v1 import security_pb2 as spb
from lepton.v1.security_pb2_grpc import SecurityStub

from ._cli_common import UsageError, _client, _int, _size, command, command_group, print_result

__all__ = ["register"]

LIMITS = ("pending_tasks", "dataset_bytes", "tokens")
UNLIMITED = "unlimited"


def _limit(parse: Callable[[str], int]) -> Callable[[str], int | str]:
    """An option value: a number >= 0 (as `parse` reads it) or `unlimited`."""

    def read(text: str) -> int | str:
        if text.strip().lower() == UNLIMITED:
            return UNLIMITED
        value = parse(text)
        if not 0 <= value < 1 << 64:  # a uint64 on the wire; the server has its own maximum
            raise argparse.ArgumentTypeError(f"must be between 0 and 2^64-1, or 'unlimited': {text!r}")
        return value

    return read


def view_dict(view: spb.QuotaView) -> dict[str, Any]:
    q = view.quota
    doc: dict[str, Any] = {"user": q.user}
    for name in LIMITS:
        doc[name] = {"limit": getattr(q, name) if q.HasField(name) else None, "used": getattr(view, name)}
    return doc


def _cell(view: spb.QuotaView, name: str) -> str:
    used = getattr(view, name)
    return f"{used} / {getattr(view.quota, name)}" if view.quota.HasField(name) else f"{used} / -"


def _table(views: list[spb.QuotaView]) -> Table:
    out = Table(box=None, pad_edge=False)
    for col in ("USER", "PENDING TASKS", "DATASET BYTES", "TOKENS"):
        out.add_column(col)
    for v in views:
        out.add_row(v.quota.user, *(_cell(v, n) for n in LIMITS))
    return out


def cmd_quota_set(args: argparse.Namespace) -> int:
    quota = spb.Quota(user=args.user)
    unlimited = []
    for name in LIMITS:
        value = getattr(args, name)
        if value == UNLIMITED:
            unlimited.append(name)
        elif value is not None:
            setattr(quota, name, value)
    if not unlimited and not any(quota.HasField(n) for n in LIMITS):
        raise UsageError("give at least one of --pending-tasks, --dataset-bytes, --tokens")
    with _client(args) as c:
        # Setting limits to given values is idempotent: a retry after a lost reply is safe.
        view = c._unary(SecurityStub, "SetQuota", spb.SetQuotaRequest(quota=quota, unlimited=unlimited))
    return print_result(args, view_dict(view), lambda: _table([view]))


def cmd_quota_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        def page(token: str) -> tuple[Any, str]:
            req = spb.ListQuotasRequest(user=args.user or "", page_size=MAX_PAGE, page_token=token)
            resp = c._unary(SecurityStub, "ListQuotas", req)
            return resp.quotas, resp.next_page_token

        views = list(walk_pages(page))
    return print_result(args, [view_dict(v) for v in views], lambda: _table(views), empty="no quotas")


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `quota set` and `quota show` to lepton-ctl's subcommands `top`."""
    sub = command_group(top, "quota", "per-user limits: pending tasks, dataset bytes, tokens (admin)")
    p = command(sub, "set", cmd_quota_set, "set or lift a user's limits; limits not named keep their value",
                [common])
    p.add_argument("user", metavar="USER", help="the principal name (a token's --name, a certificate's name)")
    p.add_argument("--pending-tasks", dest="pending_tasks", type=_limit(_int), metavar="N",
                   help="tasks waiting to be placed, or 'unlimited'")
    p.add_argument("--dataset-bytes", dest="dataset_bytes", type=_limit(_size), metavar="B",
                   help="total size of the user's datasets (e.g. 50GiB), or 'unlimited'")
    p.add_argument("--tokens", type=_limit(_int), metavar="N", help="API tokens not revoked, or 'unlimited'")
    p = command(sub, "show", cmd_quota_show, "each user's limits and use (USER: one user's)", [common])
    p.add_argument("user", metavar="USER", nargs="?")
