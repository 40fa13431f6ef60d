"""`lepton-ctl cluster gc`: garbage-collect finished tasks and jobs now (admin).

The leader does it on its own every gc interval, by the retention its voters were started
with (--gc-keep-finished, --gc-max-age); this runs it at once, optionally narrower.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._cli_common import _client, _non_negative_float, _non_negative_int, command, print_result


def register(cluster_sub: Any, common: argparse.ArgumentParser) -> None:
    p = command(cluster_sub, "gc", cmd_cluster_gc,
                "garbage-collect finished tasks and jobs now (admin), keeping their summaries", [common])
    p.add_argument("--keep", metavar="N", type=_non_negative_int, default=None,
                   help="keep at most the newest N finished tasks and jobs (default: the cluster's setting; "
                        "never more than it)")
    p.add_argument("--older-than", metavar="SECONDS", type=_non_negative_float, default=None,
                   help="collect what finished more than SECONDS ago (default: the cluster's setting)")


def cmd_cluster_gc(args: argparse.Namespace) -> int:
    with _client(args) as c:
        done = c.collect_garbage(args.keep, args.older_than)
    text = (f"collected {done['tasks_collected']} finished tasks ({done['jobs_collected']} jobs); "
            f"{done['finished_kept']} finished kept, {done['history_size']} summaries in the history\n")
    return print_result(args, done, text)
