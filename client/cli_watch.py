"""`tasks list -w`: the list, then every task that appears or changes, until Ctrl-C.

As `kubectl get -w`: the first listing in full, then one row (a JSON line with `-o json`,
a YAML document with `-o yaml`, an id with `-q`) per task whose state, attempt, node or
exit code changed since the last look. Polled (the API has no task stream), every
WATCH_INTERVAL_S; the rows stream through pipes (`| grep failed`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._cli_common import print_result, wide
from .render import tasks_table
from .tables import FitTable
from .types import TaskInfo

__all__ = ["WATCH_INTERVAL_S", "watch_tasks"]

WATCH_INTERVAL_S = 2.0


def _looks(t: TaskInfo) -> tuple[Any, ...]:
    """What a watcher sees change."""
    return (t.state, t.attempt, t.node_id, t.exit_code, t.reason)


def watch_tasks(
    args: argparse.Namespace,
    fetch: Callable[[], list[TaskInfo]],
    names: Callable[[Sequence[TaskInfo]], Mapping[str, str]],
    *,
    interval: float = WATCH_INTERVAL_S,
    rounds: int | None = None,
) -> int:
    """Print `fetch()` and then its changes every `interval` s; `rounds` (tests) stops after
    that many looks, else only Ctrl-C, SIGTERM or SIGHUP do (exit 130, from lepton-ctl's
    main)."""
    seen: dict[str, tuple[Any, ...]] = {}
    widths: dict[str, int] = {}  # the columns so far, so later rows line up under them
    first = True
    looked = 0
    while True:
        tasks = fetch()
        changed = [t for t in tasks if seen.get(t.id) != _looks(t)]
        seen.update((t.id, _looks(t)) for t in tasks)
        if changed or first:
            _show(args, changed, names, widths, header=first)
            sys.stdout.flush()
        first = False
        looked += 1
        if rounds is not None and looked >= rounds:
            return 0
        time.sleep(interval)


def _show(
    args: argparse.Namespace,
    tasks: Sequence[TaskInfo],
    names: Callable[[Sequence[TaskInfo]], Mapping[str, str]],
    widths: dict[str, int],
    *,
    header: bool,
) -> None:
    if args.output in ("json", "yaml") and not getattr(args, "quiet", False):
        for t in tasks:  # one document per task: a stream, not one growing list
            print_result(args, t.to_dict(), "", line=True)
        return
    def table() -> FitTable:
        out = tasks_table(tasks, names(tasks), wide=wide(args), header=header)
        out.min_widths = dict(widths)
        widths.update(out.natural_widths())
        return out

    print_result(args, [t.to_dict() for t in tasks], table, empty="no tasks yet" if header else "")
