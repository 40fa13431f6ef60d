"""lepton-ctl's task commands: `submit`, `run`, `tasks list|show|cancel`, `logs`.

Reference: docs/cli.md. `run` exits with the task's own exit code (see `exit_code_of`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

from lepton.common.errors import FailedPrecondition, InvalidArgument, LeptonError

from ._cli_common import (
    PROG,
    UsageError,
    _client,
    _global_options,
    _int,
    _non_negative_float,
    _non_negative_int,
    _Parser,
    _positive_int,
    _size,
    command,
    command_group,
    interrupt_reason,
    print_result,
    wide,
)
from .cli_watch import watch_tasks
from .client import Client
from .render import task_detail, tasks_table
from .tasks import TASK_OPTIONS
from .types import TASK_STATES, TaskInfo

__all__ = ["PENDING_NOTE_AFTER_S", "add_commands", "exit_code_of", "ship_code"]

# `run` says why its task waits once it has been pending this long.
PENDING_NOTE_AFTER_S = 2.0
# A cancelled task (and Ctrl-C) exits with this, like a shell's SIGINT.
CANCELLED_EXIT = 130


# -- option types -----------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def parse_key_values(pairs: Sequence[tuple[str, str]] | None) -> dict[str, str]:
    """Repeated `--label`/`--env` pairs → a dict; a later repeat of a key wins."""
    return dict(pairs or ())


# -- the parser -------------------------------------------------------------------------


def _spec_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task options")
    g.add_argument("--name", default="", help="a name to show (need not be unique)")
    g.add_argument(
        "--cpu", type=_non_negative_float, default=0.0, help="cores, may be fractional (0.5)"
    )
    g.add_argument(
        "--mem", metavar="SIZE", type=_size, default=0, help="memory: bytes, 512MiB, 2G, 1.5GiB"
    )
    g.add_argument("--gpus", metavar="G", type=_non_negative_int, default=0, help="GPUs")
    g.add_argument(
        "--gpu-mem", metavar="SIZE", type=_size, default=0, help="least memory of each GPU"
    )
    g.add_argument(
        "--priority", metavar="P", type=_int, default=0, help="higher first; may preempt lower"
    )
    g.add_argument(
        "--label",
        metavar="K=V",
        action="append",
        type=_key_value,
        help="run only on nodes with this label (repeatable)",
    )
    g.add_argument(
        "--env", metavar="K=V", action="append", type=_key_value, help="environment (repeatable)"
    )
    g.add_argument(
        "--working-dir", metavar="DIR", default="",
        help="ship this local folder (.gitignore and .leptonignore respected): the task starts "
        "in a fresh copy of it, importable as under python -m; stored once per content",
    )
    g.add_argument("--workdir", metavar="DIR", default="",
                   help="the task's working directory on the agent, relative to its folder "
                   "(the copy of --working-dir when given)")
    g.add_argument(
        "--retries", metavar="R", type=_non_negative_int, default=0, help="retry failed attempts"
    )
    g.add_argument(
        "--timeout",
        dest="task_timeout",
        metavar="SECONDS",
        type=_non_negative_float,
        default=0.0,
        help="the task's time limit (0: none). The call budget goes before the command",
    )
    g.add_argument(
        "--grace",
        metavar="SECONDS",
        type=_non_negative_float,
        default=0.0,
        help="SIGTERM to SIGKILL when stopped (0: the default, 10)",
    )
    g.add_argument("--owner", default="", help="who the task is for (tasks list --owner)")
    g.add_argument(
        "--on-disconnect",
        choices=("stop", "keep"),
        default="stop",
        help="when its node loses the leader past the attempt lease: stop the attempt there "
        "(default) or keep it running (it may then overlap its replacement)",
    )
    g.add_argument(
        "--request-id",
        metavar="ID",
        default=None,
        help="submit at most once per ID, also across runs (default: a fresh one)",
    )
    g.add_argument(
        "--shell", action="store_true", help="join CMD into one command line run by /bin/sh -c"
    )
    p.add_argument(
        "cmd", metavar="-- CMD...", nargs=argparse.REMAINDER, help="the command and its arguments"
    )


def add_commands(top: Any, common: argparse.ArgumentParser) -> None:
    """Add the task commands to lepton-ctl's subcommands `top`; `common` holds the global options."""
    # submit/run take a --timeout of their own (the task's limit): their parsers get the
    # global options without it.
    spec_common = _Parser(add_help=False)
    _global_options(spec_common, defaults=False, timeout=False)

    p = command(top, "submit", cmd_submit, "submit a task, or with --nodes a job; prints its id",
                parents=(spec_common,))
    _spec_options(p)
    _job_options(p)
    p.add_argument(
        "--sweep",
        metavar="K=V1,V2,...",
        action="append",
        type=_key_value,
        help="one task per combination of values (repeatable); {K} in the command and the "
        "name takes each value. All are stored in one call, or none; prints one id per line",
    )
    p = command(
        top,
        "run",
        cmd_run,
        "submit a task, stream its output, exit with its exit code (Ctrl-C, SIGTERM or "
        "SIGHUP cancels it)",
        parents=(spec_common,),
    )
    _spec_options(p)
    _job_options(p)
    p.add_argument(
        "--detach",
        action="store_true",
        help="on Ctrl-C, SIGTERM or SIGHUP stop following but leave the task running",
    )

    tasks_sub = command_group(top, "tasks", "list, show and cancel tasks")
    p = command(tasks_sub, "list", cmd_tasks_list, "list tasks, oldest first", [common])
    p.add_argument(
        "--state",
        action="append",
        choices=TASK_STATES,
        help="only tasks in this state (repeatable)",
    )
    p.add_argument("--owner", help="only tasks of this owner")
    p.add_argument(
        "--limit", metavar="N", type=_positive_int, default=0, help="only the newest N tasks"
    )
    p.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="then print each task that appears or changes, until Ctrl-C",
    )
    p = command(tasks_sub, "show", cmd_tasks_show, "show one task in full, with its attempts", [common])
    p.add_argument("task", metavar="ID", help="task id or unique id prefix")
    p = command(tasks_sub, "cancel", cmd_tasks_cancel, "cancel a task (its attempt is stopped)", [common])
    p.add_argument("task", metavar="ID", help="task id or unique id prefix")

    p = command(top, "logs", cmd_logs, "print a task's or a job's output (stdout and stderr)", [common])
    p.add_argument("task", metavar="TASK", help="task id or unique id prefix, or a job id (j-...)")
    p.add_argument("--rank", metavar="K", type=int, default=None,
                   help="a job's rank K only (its lines start with [rank K])")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="stream new output until the task ends, across retries",
    )
    p.add_argument(
        "--attempt",
        metavar="N",
        type=_positive_int,
        default=0,
        help="this attempt only (default: the latest)",
    )


# -- submit and run ---------------------------------------------------------------------


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError(
            f"no command given (usage: {PROG} {args.command} [options] -- CMD [ARG...])"
        )
    return cmd


# Where an option's dest differs from its TaskOptions field. `--shell` is a flag that joins
# CMD into `shell` (see submit_kwargs); --label and --env are repeated K=V pairs.
_OPTION_DEST = {"memory": "mem", "gpu_memory": "gpu_mem", "constraints": "label",
                "max_retries": "retries", "timeout": "task_timeout"}
_PAIRS = ("constraints", "env")


def submit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`Client.submit` keyword arguments (TaskOptions) from `submit`/`run` options."""
    cmd = _command(args)
    kw: dict[str, Any] = {"shell": " ".join(cmd)} if args.shell else {"argv": cmd}
    for option in TASK_OPTIONS:
        if option not in ("shell", "code_digest"):  # code_digest: from --working-dir (ship_code)
            value = getattr(args, _OPTION_DEST.get(option, option))
            kw[option] = parse_key_values(value) if option in _PAIRS else value
    return kw


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_SWEEP = 10_000


def sweep_kwargs(kw: dict[str, Any], sweep: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """One `submit` kwargs per combination of `--sweep` values, `{K}` filled in; each
    request id (when given) gets the combination's index so a rerun stays idempotent."""
    axes: dict[str, list[str]] = {}
    for key, values in sweep:
        if key in axes:
            raise UsageError(f"--sweep {key} is given twice")
        vals = values.split(",")
        if any(not v for v in vals):
            raise UsageError(f"--sweep {key}={values}: a value is empty")
        axes[key] = vals
    command = kw.get("argv") or [kw.get("shell", "")]
    used = {m for text in [*command, kw["name"]] for m in _PLACEHOLDER.findall(text)}
    if unused := sorted(set(axes) - used):
        raise UsageError(f"--sweep {unused[0]} is not used: put {{{unused[0]}}} in the command")
    if unknown := sorted(used - set(axes)):
        raise UsageError(f"{{{unknown[0]}}} in the command has no --sweep {unknown[0]}=...")
    combos = list(itertools.product(*axes.values()))
    if len(combos) > MAX_SWEEP:
        raise UsageError(f"the sweep makes {len(combos)} tasks; at most {MAX_SWEEP}")

    def fill(text: str, values: dict[str, str]) -> str:
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)

    out = []
    for i, combo in enumerate(combos):
        values = dict(zip(axes, combo, strict=True))
        one = dict(kw)
        if "argv" in one:
            one["argv"] = [fill(a, values) for a in one["argv"]]
        else:
            one["shell"] = fill(one["shell"], values)
        one["name"] = fill(kw["name"], values)
        if kw.get("request_id"):
            one["request_id"] = f"{kw['request_id']}-{i}"
        out.append(one)
    return out


def ship_code(c: Client, folder: str, kw: dict[str, Any]) -> dict[str, Any]:
    """`kw` (submit keywords) with the code_digest of `folder` (`--working-dir`, a job
    file's working_dir; "" for none), stored unless the cluster has it; says on stderr what
    was shipped, and whether it was uploaded."""
    if not folder:
        return kw
    upload = c.push_code(folder)
    sys.stderr.write(f"{PROG}: {upload.describe()}\n")
    return {**kw, "code_digest": upload.digest}


def cmd_submit(args: argparse.Namespace) -> int:
    if _is_job(args):
        from .cli_jobs import cmd_submit_job  # it imports this module

        return cmd_submit_job(args)
    kw = submit_kwargs(args)
    if args.sweep:
        specs = sweep_kwargs(kw, args.sweep)
        with _client(args) as c:
            digest = ship_code(c, args.working_dir, {}).get("code_digest", "")
            tasks = c.submit_many([{**s, "code_digest": digest} for s in specs])
        return print_result(args, [t.to_dict() for t in tasks], "".join(t.id + "\n" for t in tasks))
    with _client(args) as c:
        task = c.submit(**ship_code(c, args.working_dir, kw))
    return print_result(args, task.to_dict(), task.id + "\n")


def exit_code_of(task: TaskInfo) -> int:
    """`run`'s exit code for a final task: 0 succeeded; the task's own code (0-255) when it
    failed with one, 128+N when killed by signal N; 130 cancelled; 1 otherwise (e.g. a
    task that failed without exiting, its node lost)."""
    if task.state == "succeeded":
        return 0
    if task.state == "cancelled":
        return CANCELLED_EXIT
    code = task.exit_code
    if task.state == "failed" and code is not None:
        if code < 0:
            return min(128 - code, 255)
        if 0 < code <= 255:
            return code
    return 1


def end_note(task: TaskInfo) -> str:
    """`task t-… failed: exit code 3`: how a task that did not succeed ended."""
    why = task.reason if task.reason and task.reason != task.state else ""
    if not why and task.exit_code is not None:
        why = f"exit code {task.exit_code}"
    return f"task {task.id} {task.state}" + (f": {why}" if why else "")


class RunNotes:
    """What `run` says on stderr while it follows a task: why it waits (once it has been
    pending for PENDING_NOTE_AFTER_S, once per attempt) and when an attempt is retried."""

    def __init__(
        self, task: TaskInfo, err: Any = None, clock: Callable[[], float] = time.monotonic
    ):
        self.last = task
        self._err = err
        self._clock = clock
        self._attempt = task.attempt
        self._pending_since: float | None = None
        self._noted: set[int] = set()

    def _say(self, text: str) -> None:
        err = self._err or sys.stderr
        err.write(f"{PROG}: {text}\n")
        err.flush()

    def __call__(self, task: TaskInfo) -> None:
        self.last = task
        if task.attempt > self._attempt:
            for h in task.history:
                if self._attempt <= h.attempt < task.attempt:
                    what = h.reason or h.state
                    verb = "requeued" if h.state == "preempted" else "retrying"
                    self._say(
                        f"{task.id} attempt {h.attempt} {h.state} ({what}); "
                        f"{verb} as attempt {h.attempt + 1}"
                    )
            self._attempt = task.attempt
            self._pending_since = None
        if task.state != "pending":
            self._pending_since = None
            return
        now = self._clock()
        if self._pending_since is None:
            self._pending_since = now
        elif now - self._pending_since >= PENDING_NOTE_AFTER_S and task.attempt not in self._noted:
            self._noted.add(task.attempt)
            self._say(f"{task.id} pending: {task.reason or 'waiting to be placed'}")


def _stdout() -> BinaryIO:
    sys.stdout.flush()
    return getattr(sys.stdout, "buffer", None) or _TextOut()


class _TextOut:
    """Bytes to a text-only stdout (a replaced sys.stdout), decoded leniently."""

    def write(self, data: bytes) -> int:
        return sys.stdout.write(data.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        sys.stdout.flush()


def _copy(chunks: Any, out: Any) -> None:
    for chunk in chunks:
        out.write(chunk)
        out.flush()


def _job_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-node and torch.distributed jobs")
    g.add_argument("--nodes", metavar="N", type=int, default=None,
                   help="run as a gang on N distinct nodes, placed all-or-nothing")
    g.add_argument("--nproc-per-node", metavar="M", type=int, default=0,
                   help="a torch.distributed job: M workers per node with torchrun's environment")
    g.add_argument("--gpus-per-node", metavar="G", type=int, default=0, help="GPUs per node")
    g.add_argument("--max-restarts", metavar="R", type=int, default=0,
                   help="restart the whole job up to R times when a rank fails or a node is lost")
    g.add_argument("--dataset", metavar="NAME", default="",
                   help="split this dataset's shards across the ranks (LEPTON_SHARDS)")


def _is_job(args: argparse.Namespace) -> bool:
    return args.nodes is not None or bool(args.nproc_per_node)


def _run_job(args: argparse.Namespace) -> int:
    kw = submit_kwargs(args)
    job_kw = {"nodes": 1 if args.nodes is None else args.nodes,
              "nproc_per_node": args.nproc_per_node, "gpus_per_node": args.gpus_per_node,
              "max_restarts": args.max_restarts, "dataset": args.dataset}
    with _client(args) as c:
        job, stopped = _submit_for_run(
            c, args, kw, lambda kw: c.submit_job(**job_kw, **kw),
            lambda job: (job.tasks[0].id, f"job {job.id}"))
        if job is None:
            return stopped
        sys.stderr.write(f"{PROG}: job {job.id}: {len(job.tasks)} node(s)\n")
        try:
            _copy(c.job_logs(job.id, follow=True), _stdout())
            final = c.wait_job(job.id)
        except KeyboardInterrupt as e:
            return _interrupted(c, job.tasks[0].id, e, detach=args.detach, shown=f"job {job.id}")
    if final.state != "succeeded":
        sys.stderr.write(f"{PROG}: job {final.id} {final.state}: {final.reason}\n")
    if final.state == "cancelled":
        return CANCELLED_EXIT
    code = final.exit_code
    return 0 if final.state == "succeeded" else (code if code and 0 < code < 256 else 1)


def cmd_run(args: argparse.Namespace) -> int:
    if _is_job(args):
        return _run_job(args)
    kw = submit_kwargs(args)
    with _client(args) as c:
        task, stopped = _submit_for_run(c, args, kw, lambda kw: c.submit(**kw),
                                        lambda task: (task.id, f"task {task.id}"))
        if task is None:
            return stopped
        notes = RunNotes(task)
        try:
            _copy(c.logs(task.id, follow=True, from_attempt=1, on_task=notes), _stdout())
            final = notes.last if notes.last.done else c.wait(task.id)
        except KeyboardInterrupt as e:
            return _interrupted(c, task.id, e, detach=args.detach)
        except LeptonError as e:
            raise LeptonError(
                f"lost track of task {task.id}: {e.message} "
                f"(it may still run: '{PROG} tasks show {task.id}')"
            ) from None
    if final.state != "succeeded":
        sys.stderr.write(f"{PROG}: {end_note(final)}\n")
    return exit_code_of(final)


# Tests only: seconds `run` waits after its submission returns, still inside the window
# where a stop signal is handled as if the answer had not come back (test_cli_signals).
HOLD_AFTER_SUBMIT_ENV = "LEPTON_CTL_TEST_HOLD_AFTER_SUBMIT_S"


def _submit_for_run(
    c: Client, args: argparse.Namespace, kw: dict[str, Any],
    send: Callable[[dict[str, Any]], Any], ref: Callable[[Any], tuple[str, str]],
) -> tuple[Any, int]:
    """`send(kw)` for `run` (after shipping --working-dir), safe against Ctrl-C, SIGTERM or
    SIGHUP on the way: the server may have stored the task or job though its answer never
    came back. The call carries a request id, and sending the same spec again with it
    returns what the first call stored (or stores it now), which `_interrupted` then cancels
    (or with --detach names). Returns (what send returned, 0), or (None, exit code) when
    stopped. `ref(result)`: the task id to cancel and how to name it."""
    if kw.get("request_id") is None:
        kw = {**kw, "request_id": uuid.uuid4().hex}  # known here, to look the call up by
    try:
        kw = ship_code(c, args.working_dir, kw)
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{PROG}: {interrupt_reason(e)} while shipping the code; nothing submitted\n")
        return None, CANCELLED_EXIT
    try:
        result = send(kw)
        if hold := float(os.environ.get(HOLD_AFTER_SUBMIT_ENV) or 0):
            time.sleep(hold)
        return result, 0
    except KeyboardInterrupt as e:
        stopped = e
    how = interrupt_reason(stopped)
    if not kw["request_id"]:  # --request-id '': nothing to look it up by
        sys.stderr.write(f"{PROG}: {how} while submitting; it may have been stored "
                         f"without a request id ('{PROG} tasks list')\n")
        return None, CANCELLED_EXIT
    try:
        task_id, shown = ref(send(kw))  # the same request id: what the first call stored
    except LeptonError as e:
        sys.stderr.write(f"{PROG}: {how} while submitting; could not look up request id "
                         f"{kw['request_id']}: {' '.join(e.message.split())}\n")
        return None, CANCELLED_EXIT
    return None, _interrupted(c, task_id, stopped, detach=args.detach, shown=shown)


def _interrupted(
    c: Client, task_id: str, why: BaseException, *, detach: bool, shown: str = ""
) -> int:
    """`run` stopped by Ctrl-C, SIGTERM or SIGHUP: cancel what it started, or with
    --detach leave it running and say how to follow it."""
    how, shown = interrupt_reason(why), shown or f"task {task_id}"
    if detach:
        ref = shown.split()[-1]
        note = f"{how}; detached: {shown} keeps running ('{PROG} logs -f {ref}')"
    else:
        try:
            c.cancel(task_id)
            note = f"{how}: cancelled {shown}"
        except FailedPrecondition:
            note = f"{how}; {shown} had already ended"
        except LeptonError as e:
            note = f"{how}; could not cancel {shown}: {e.message}"
    sys.stderr.write(f"{PROG}: {' '.join(note.split())}\n")
    return CANCELLED_EXIT


# -- tasks and logs ---------------------------------------------------------------------


def _node_names(c: Client, tasks: Sequence[TaskInfo]) -> Mapping[str, str]:
    wanted = {t.node_id for t in tasks} | {h.node_id for t in tasks for h in t.history}
    if not wanted - {""}:
        return {}
    return {n.id: n.name for n in c.nodes()}


def cmd_tasks_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.watch:
            return watch_tasks(
                args,
                lambda: c.tasks(states=args.state, owner=args.owner, limit=args.limit),
                lambda ts: _node_names(c, ts),
            )
        tasks = c.tasks(states=args.state, owner=args.owner, limit=args.limit)
        return print_result(args, [t.to_dict() for t in tasks],
                            lambda: tasks_table(tasks, _node_names(c, tasks), wide=wide(args)),
                            empty="no tasks")


def cmd_tasks_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        task = c.find_task(args.task)
        return print_result(args, task.to_dict(), lambda: task_detail(task, _node_names(c, [task])))


def cmd_tasks_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        task = c.cancel(c.find_task(args.task).id)
    return print_result(args, task.to_dict(), f"task {task.id} {task.state}\n")


def cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as c:
        if args.task.startswith("j-"):
            job_id = c.find_job(args.task).id  # a unique prefix too
            _copy(c.job_logs(job_id, follow=args.follow, rank=args.rank), _stdout())
            return 0
        if args.rank is not None:
            raise InvalidArgument("--rank is for jobs (ids starting j-)")
        task = c.find_task(args.task)
        _copy(c.logs(task.id, follow=args.follow, attempt=args.attempt), _stdout())
    return 0
