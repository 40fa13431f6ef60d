"""lepton-ctl's job commands: `submit --nodes` (detached), `jobs list|show|cancel|logs`,
`apply -f job.toml`. Reference: docs/cli.md.

A job `j-<hex>` is a gang of member tasks `t-<hex>-<node>`; the task commands see the
members, these see the job.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Group
from rich.table import Table

from . import jobfile
from ._cli_common import UsageError, _client, command, command_group, print_result
from .cli_tasks import _copy, _stdout, ship_code, submit_kwargs, sweep_kwargs
from .client import Client
from .jobs import JobInfo
from .render import age, task_detail, tasks_table, truncate
from .tables import FitTable
from .types import TASK_STATES

__all__ = ["cmd_submit_job", "job_options_of", "register"]


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `jobs` and `apply` to lepton-ctl's subcommands `top`."""
    jobs_sub = command_group(top, "jobs", "list, show, cancel and follow multi-node jobs")
    p = command(jobs_sub, "list", cmd_jobs_list, "list jobs, oldest first", [common])
    p.add_argument("--state", action="append", choices=TASK_STATES,
                   help="only jobs in this state (repeatable)")
    p.add_argument("--owner", help="only jobs of this owner")
    p = command(jobs_sub, "show", cmd_jobs_show, "show one job with its member tasks", [common])
    p.add_argument("job", metavar="JOB", help="job id, unique id prefix, or a member task's id")
    p = command(jobs_sub, "cancel", cmd_jobs_cancel, "cancel a job: every member is stopped", [common])
    p.add_argument("job", metavar="JOB", help="job id or unique id prefix")
    p = command(jobs_sub, "logs", cmd_jobs_logs, "print a job's output, every rank's lines interleaved",
                [common])
    p.add_argument("job", metavar="JOB", help="job id or unique id prefix")
    p.add_argument("-f", "--follow", action="store_true", help="stream new output until the job ends")
    p.add_argument("--rank", metavar="R", type=int, default=None,
                   help="global rank R only (its lines start with [rank R])")

    p = command(top, "apply", cmd_apply, "submit the task or job a job file describes; prints its id",
                [common])
    p.add_argument("-f", "--file", dest="job_file", metavar="FILE", required=True,
                   help="a job file (TOML; keys as the submit flags, see docs/cli.md)")


# -- submit --nodes ---------------------------------------------------------------------


def job_options_of(args: argparse.Namespace) -> dict[str, Any]:
    """`Client.submit_job` keywords from the job flags of `submit`/`run`."""
    return {"nodes": 1 if args.nodes is None else args.nodes,
            "nproc_per_node": args.nproc_per_node, "gpus_per_node": args.gpus_per_node,
            "max_restarts": args.max_restarts, "dataset": args.dataset}


def cmd_submit_job(args: argparse.Namespace) -> int:
    """`submit --nodes N [--nproc-per-node M]`: store the job, print its id, return."""
    if getattr(args, "sweep", None):
        raise UsageError("--sweep is for single-node tasks, not jobs (--nodes, --nproc-per-node)")
    kw = submit_kwargs(args)
    with _client(args) as c:
        job = c.submit_job(**job_options_of(args), **ship_code(c, args.working_dir, kw))
    return print_result(args, job.to_dict(), job.id + "\n")


# -- jobs list|show|cancel|logs ---------------------------------------------------------


def jobs_table(jobs: list[JobInfo], now_ms: int | None = None) -> FitTable:
    """`jobs list`: one row per job, ids never cut (tables.FitTable)."""
    table = FitTable(("ID", "NAME", "STATE", "NODES", "RESTARTS", "AGE", "REASON"),
                     optional=("RESTARTS", "AGE", "NODES"))
    for j in jobs:
        table.add_row(j.id, j.name or "-", j.state, str(j.nodes), str(j.restart_count),
                      age(j.created_at_ms, now_ms), truncate(j.reason, 60) if j.reason else "")
    return table


def job_detail(job: JobInfo, now_ms: int | None = None) -> Group:
    """`jobs show`: the job, then rank 0's spec, then its members."""
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("Job", job.id)
    head.add_row("State", job.state + (f": {job.reason}" if job.reason else ""))
    head.add_row("Nodes", str(job.nodes))
    head.add_row("Restarts", str(job.restart_count))
    parts: list[Any] = [head]
    if job.tasks:
        parts += ["", "Members:", tasks_table(job.tasks, {}, now_ms, job_column=False), "",
                  "Member spec (node 0):", task_detail(job.tasks[0], {}, now_ms)]
    return Group(*parts)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        jobs = c.jobs(states=args.state, owner=args.owner)
    return print_result(args, [j.to_dict() for j in jobs], lambda: jobs_table(jobs), empty="no jobs")


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.find_job(args.job)
    return print_result(args, job.to_dict(), lambda: job_detail(job))


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.cancel_job(c.find_job(args.job).id)
    return print_result(args, job.to_dict(), f"job {job.id} {job.state}\n")


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.find_job(args.job)
        _copy(c.job_logs(job.id, follow=args.follow, rank=args.rank), _stdout())
    return 0


# -- apply -f ---------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace) -> int:
    spec = jobfile.load(args.job_file)
    with _client(args) as c:
        return _apply(args, c, spec)


def _apply(args: argparse.Namespace, c: Client, spec: jobfile.JobFile) -> int:
    if spec.is_job:
        job = c.submit_job(**spec.job, **ship_code(c, spec.working_dir, spec.task))
        return print_result(args, job.to_dict(), job.id + "\n")
    if spec.sweep:
        # sweep_kwargs fills {K} in argv/shell and the name, as `submit --sweep` does.
        many = sweep_kwargs({"name": "", **spec.task}, spec.sweep)
        digest = ship_code(c, spec.working_dir, {}).get("code_digest", "")
        tasks = c.submit_many([{**one, "code_digest": digest} if digest else one for one in many])
        return print_result(args, [t.to_dict() for t in tasks], "".join(t.id + "\n" for t in tasks))
    task = c.submit(**ship_code(c, spec.working_dir, spec.task))
    return print_result(args, task.to_dict(), task.id + "\n")

