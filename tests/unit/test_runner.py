"""TaskRunner against real subprocesses: tiny sh/sleep/python commands, bounded polling,
outcomes asserted (never durations)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from lepton.agent.tasks.runner import (
    FAILED_TO_START_CODE,
    RunSpec,
    TaskEvent,
    TaskEventKind,
    TaskRunner,
)
from lepton.agent.tasks.task_proc import shell_status_to_exit_code
from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound

WAIT_S = 20.0


async def wait_until(pred: Callable[[], object], what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def spawned(r: TaskRunner, n: int = 1) -> list:
    """The runner's attempts once `n` run and each has its pid (spawns are in a thread)."""
    def all_spawned():
        ts = r.running()
        return ts if len(ts) == n and all(t.pid for t in ts) else None
    return await wait_until(all_spawned, f"{n} attempt(s) to be spawned")


async def kill_fence(data_dir: Path) -> int:
    """kill -9 the data dir's attempt fence (fence.py); its pid."""
    pid = int((data_dir / "task-fence.lock").read_text())
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: gone(pid), "the fence to die")
    return pid


class Node:
    """One data dir, and the runners made on it (one at a time, as after agent restarts)."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.events: list[TaskEvent] = []
        self.runners: list[TaskRunner] = []

    async def runner(self, **kw) -> TaskRunner:
        r = TaskRunner(self.data_dir, self.events.append, **kw)
        await r.start()
        self.runners.append(r)
        return r

    def of(self, task_id: str, attempt: int = 1, kind: TaskEventKind | None = None) -> list[TaskEvent]:
        return [e for e in self.events
                if e.task_id == task_id and e.attempt == attempt and (kind is None or e.kind == kind)]

    async def exited(self, task_id: str, attempt: int = 1) -> TaskEvent:
        evs = await wait_until(lambda: self.of(task_id, attempt, TaskEventKind.EXITED), f"{task_id}/{attempt} to exit")
        return evs[0]

    def log(self, task_id: str, attempt: int = 1) -> str:
        path = self.data_dir / "tasks" / task_id / str(attempt) / "output.log"
        return path.read_text() if path.exists() else ""

    async def output_has(self, task_id: str, text: str, attempt: int = 1) -> None:
        await wait_until(lambda: text in self.log(task_id, attempt), f"{text!r} in {task_id}'s output")


@pytest.fixture
async def node(tmp_path):
    n = Node(tmp_path)
    yield n
    # Tasks outlive runners by design: kill (and reap) whatever a test left behind.
    for r in n.runners:
        for t in r.running():
            r.cancel(t.task_id, t.attempt, grace_s=0)
        await wait_until(lambda r=r: not r.running(), "left-over tasks to be killed")
        await r.stop()


def sh(task_id: str, script: str, attempt: int = 1, **kw) -> RunSpec:
    return RunSpec(task_id=task_id, attempt=attempt, term=1, shell=script, **kw)


async def test_runs_and_reports_exit_code(node):
    r = await node.runner()
    r.launch(sh("t", "exit 3"))
    ev = await node.exited("t")
    started = node.of("t", kind=TaskEventKind.STARTED)
    assert len(started) == 1 and started[0].pid > 0 and started[0].term == 1
    assert (ev.exit_code, ev.reason, ev.pid, ev.term) == (3, "exited", started[0].pid, 1)
    assert node.events.index(started[0]) < node.events.index(ev)
    assert r.running() == []
    assert gone(ev.pid)


async def test_argv_is_execd_directly_not_through_a_shell(node):
    r = await node.runner()
    # `exit` is a shell builtin; as argv[0] it must be looked up on PATH and fail to start.
    r.launch(RunSpec(task_id="a", attempt=1, term=1, argv=(sys.executable, "-c", "import sys; print('$HOME', *sys.argv[1:]); sys.exit(4)", "x y", "*")))
    r.launch(RunSpec(task_id="b", attempt=1, term=1, argv=("exit", "0")))
    assert (await node.exited("a")).exit_code == 4
    assert node.log("a") == "$HOME x y *\n"
    assert (await node.exited("b")).exit_code == FAILED_TO_START_CODE


async def test_stdout_and_stderr_share_one_file_in_order(node):
    r = await node.runner()
    r.launch(sh("t", "echo out1; echo err1 >&2; echo out2; echo err2 >&2"))
    await node.exited("t")
    assert node.log("t") == "out1\nerr1\nout2\nerr2\n"
    assert r.log_path("t", 1).read_text() == node.log("t")


async def test_environment_layers_and_gpus(node):
    base = {"PATH": os.environ["PATH"], "FROM_BASE": "base", "OVERRIDDEN": "base", "CUDA_VISIBLE_DEVICES": "7"}
    r = await node.runner(base_env=base)
    show = 'echo "$FROM_BASE $OVERRIDDEN $LEPTON_TASK_ID $LEPTON_ATTEMPT [$CUDA_VISIBLE_DEVICES] [$NVIDIA_VISIBLE_DEVICES]"'
    env = {"OVERRIDDEN": "spec", "LEPTON_TASK_ID": "spoofed"}
    r.launch(sh("gpu", show, attempt=2, env=env, gpu_indices=(0, 2)))
    r.launch(sh("cpu", show, env=env))
    r.launch(sh("own", show, env={"CUDA_VISIBLE_DEVICES": "-1"}))
    for tid, attempt in (("gpu", 2), ("cpu", 1), ("own", 1)):
        await node.exited(tid, attempt)
    assert node.log("gpu", 2) == "base spec gpu 2 [0,2] [0,2]\n"
    # No GPUs assigned: none visible, whatever the agent's own environment says...
    assert node.log("cpu") == "base spec cpu 1 [] []\n"
    # ...unless the task asks for a value itself.
    assert node.log("own") == "base base own 1 [-1] []\n"


async def test_only_the_allow_listed_agent_environment_is_inherited(node, monkeypatch):
    monkeypatch.setenv("LEPTON_NODE_TOKEN", "lep_secret")  # what a task must never see
    monkeypatch.setenv("LEPTON_TEST_MARKER", "from-agent")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("TZ", "UTC")
    r = await node.runner()
    r.launch(sh("t", 'echo "[$LEPTON_NODE_TOKEN] [$LEPTON_TEST_MARKER] $LC_TIME $TZ"; [ -n "$PATH" ] && echo path'))
    await node.exited("t")
    assert node.log("t") == "[] [] C UTC\npath\n"


async def test_cancel_kills_the_whole_process_group(node):
    r = await node.runner()
    r.launch(sh("t", "sleep 1000 & echo $! > grandchild.pid; echo ready; wait"))
    await node.output_has("t", "ready")
    grandchild = int((node.data_dir / "tasks/t/1/grandchild.pid").read_text())
    assert not gone(grandchild)
    r.cancel("t", 1)
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code) == ("cancelled", -signal.SIGTERM)
    await wait_until(lambda: gone(grandchild), "the grandchild to be gone")
    assert r.running() == []
    r.cancel("t", 1)  # no longer running: a no-op
    assert len(node.of("t", kind=TaskEventKind.EXITED)) == 1


async def test_cancel_a_directly_execd_command(node):
    r = await node.runner()
    code = "import time; print('ready', flush=True); time.sleep(1000)"
    r.launch(RunSpec(task_id="t", attempt=1, term=1, argv=(sys.executable, "-c", code)))
    await node.output_has("t", "ready")
    r.cancel("t", 1, reason="preempted")
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code) == ("preempted", -signal.SIGTERM)


async def test_sigterm_ignoring_task_is_killed_after_grace(node):
    r = await node.runner()
    r.launch(sh("t", 'trap "" TERM; echo ready; while :; do sleep 1; done', grace_s=0.3))
    await node.output_has("t", "ready")
    r.cancel("t", 1)
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code) == ("cancelled", -signal.SIGKILL)


async def test_cancel_with_zero_grace_kills_at_once(node):
    r = await node.runner()
    r.launch(sh("t", 'trap "" TERM; echo ready; while :; do sleep 1; done'))  # default grace 10s
    await node.output_has("t", "ready")
    r.cancel("t", 1, grace_s=0)
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code) == ("cancelled", -signal.SIGKILL)


async def test_timeout(node):
    r = await node.runner()
    r.launch(RunSpec(task_id="t", attempt=1, term=1, argv=("sleep", "1000"), timeout_s=0.2))
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code) == ("timeout", -signal.SIGTERM)


async def test_killed_by_a_signal_from_outside(node):
    r = await node.runner()
    r.launch(RunSpec(task_id="t", attempt=1, term=1, argv=(sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")))
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code) == ("killed by signal 9", -9)


async def test_leftover_background_processes_die_with_the_task(node):
    r = await node.runner()
    r.launch(sh("t", "sleep 1000 & echo $! > bg.pid"))
    ev = await node.exited("t")
    assert ev.exit_code == 0
    bg = int((node.data_dir / "tasks/t/1/bg.pid").read_text())
    await wait_until(lambda: gone(bg), "the background sleep to be gone")


@pytest.mark.parametrize("spec_kw, why", [
    ({"argv": ("/no/such/binary",)}, "no such executable"),
    ({"argv": ("no-such-binary-for-lepton",)}, "no such executable on PATH"),
    ({"shell": "true", "workdir": "/no/such/dir"}, "is not a directory"),
])
async def test_spawn_failure_is_an_event_not_an_exception(node, spec_kw, why):
    r = await node.runner()
    r.launch(RunSpec(task_id="t", attempt=1, term=1, **spec_kw))
    ev = await node.exited("t")
    assert ev.exit_code == FAILED_TO_START_CODE
    assert ev.reason.startswith("failed to start: ") and why in ev.reason
    assert node.of("t", kind=TaskEventKind.STARTED) == []
    assert why in node.log("t")
    with pytest.raises(FailedPrecondition):
        r.launch(RunSpec(task_id="t", attempt=1, term=1, shell="true"))


async def test_workdir_relative_and_absolute(node, tmp_path):
    r = await node.runner()
    (tmp_path / "tasks/t").mkdir(parents=True)
    r.launch(sh("t", "pwd"))
    r.launch(sh("u", "pwd", workdir=str(tmp_path)))
    await node.exited("t")
    await node.exited("u")
    assert Path(node.log("t").strip()).resolve() == (tmp_path / "tasks/t/1").resolve()
    assert Path(node.log("u").strip()).resolve() == tmp_path.resolve()


async def test_relative_executable_is_taken_from_the_workdir(node, tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho hello \"$@\"\n")
    script.chmod(0o755)
    r = await node.runner()
    r.launch(RunSpec(task_id="t", attempt=1, term=1, argv=("./hello.sh", "you"), workdir=str(tmp_path)))
    assert (await node.exited("t")).exit_code == 0
    assert node.log("t") == "hello you\n"


async def test_same_attempt_never_runs_twice(node):
    r = await node.runner()
    spec = sh("t", "echo ready; sleep 1000")
    r.launch(spec)
    r.launch(spec)  # running: idempotent
    await node.output_has("t", "ready")
    await spawned(r)
    assert len(r.running()) == 1 and len(node.of("t", kind=TaskEventKind.STARTED)) == 1
    r.cancel("t", 1, grace_s=0)
    await node.exited("t")
    with pytest.raises(FailedPrecondition):
        r.launch(spec)
    await r.stop()
    r2 = await node.runner()  # nor after a restart
    with pytest.raises(FailedPrecondition):
        r2.launch(spec)
    r2.launch(sh("t", "true", attempt=2))  # a new attempt is fine
    assert (await node.exited("t", 2)).exit_code == 0
    assert node.log("t") == "ready\n"


async def test_readopts_running_tasks_after_restart(node):
    r1 = await node.runner()
    r1.launch(sh("t", "echo ready; sleep 1000", grace_s=5))
    await node.output_has("t", "ready")
    [before] = await spawned(r1)
    await r1.stop()
    assert not gone(before.pid)  # stop() leaves tasks running

    r2 = await node.runner()
    assert r2.running() == [before]
    assert len(node.of("t", kind=TaskEventKind.STARTED)) == 1  # no second STARTED
    r2.cancel("t", 1)
    ev = await node.exited("t")
    assert (ev.reason, ev.exit_code, ev.pid) == ("cancelled", -signal.SIGTERM, before.pid)
    assert r2.running() == []


async def test_timeout_holds_across_restart(node):
    r1 = await node.runner()
    r1.launch(RunSpec(task_id="t", attempt=1, term=1, argv=("sleep", "1000"), timeout_s=0.5))
    await r1.stop()
    await node.runner()
    ev = await node.exited("t")
    assert ev.reason == "timeout"


async def test_a_wall_clock_jump_times_out_nothing_early(node, monkeypatch):
    r1 = await node.runner()
    r1.launch(RunSpec(task_id="t", attempt=1, term=1, argv=("sleep", "1000"), timeout_s=3600))
    await r1.stop()
    day_ahead = time.time() + 24 * 3600
    monkeypatch.setattr(time, "time", lambda: day_ahead)  # the wall clock moved forward a day
    r2 = await node.runner()  # re-adopts it: an hour's deadline is still about an hour away
    [att] = r2._live.values()
    assert att.deadline > time.monotonic() + 3000 and not att.stop_reason
    r2.cancel("t", 1, grace_s=0)
    assert (await node.exited("t")).reason == "cancelled"


async def test_stop_in_progress_is_finished_after_restart(node):
    r1 = await node.runner()
    r1.launch(sh("t", 'trap "" TERM; echo ready; while :; do sleep 1; done'))
    await node.output_has("t", "ready")
    r1.cancel("t", 1, reason="drained", grace_s=0.3)  # SIGTERM, ignored
    await r1.stop()
    r2 = await node.runner()
    assert [t.task_id for t in r2.running()] == ["t"]
    ev = await node.exited("t")  # the new runner sends the SIGKILL, with the first reason
    assert (ev.reason, ev.exit_code) == ("drained", -signal.SIGKILL)


async def test_the_fence_records_the_pid_so_a_runner_gone_mid_spawn_loses_nothing(node):
    r1 = await node.runner()
    r1.launch(sh("t", "echo ready; sleep 1000"))
    [before] = await spawned(r1)
    await r1.stop()  # the agent's side is gone: the fence wrote run.json with the pid itself
    doc = json.loads((node.data_dir / "tasks/t/1/run.json").read_text())
    assert doc["pid"] == before.pid and doc["start"] > 0
    r2 = await node.runner()
    assert [t.pid for t in r2.running()] == [before.pid] and r2._live[("t", 1)].held
    r2.cancel("t", 1)
    assert (await node.exited("t")).reason == "cancelled"


async def test_exit_while_no_runner_was_alive_is_reported_on_start(node):
    r1 = await node.runner()
    r1.launch(sh("t", "while [ ! -f go ]; do sleep 0.02; done; exit 7"))
    [t] = await spawned(r1)
    await r1.stop()
    (node.data_dir / "tasks/t/1/go").touch()
    # The fence writes exit.json and only then reaps it: until it has, a new runner rightly
    # re-adopts it as running (and reports the exit later, not at start).
    await wait_until(lambda: (node.data_dir / "tasks/t/1/exit.json").exists() and gone(t.pid),
                     "the fence to record the exit and reap it")

    r2 = await node.runner()
    [ev] = node.of("t", kind=TaskEventKind.EXITED)
    assert (ev.exit_code, ev.reason) == (7, "exited")
    assert r2.running() == []
    await r2.stop()
    await node.runner()  # reported once; a later start does not repeat it
    assert len(node.of("t", kind=TaskEventKind.EXITED)) == 1


async def test_task_killed_while_no_runner_was_alive_is_reported_killed(node):
    r1 = await node.runner()
    r1.launch(sh("t", "echo ready; sleep 1000"))
    await node.output_has("t", "ready")
    [t] = await spawned(r1)
    await r1.stop()
    os.killpg(t.pid, signal.SIGKILL)  # the fence, its parent, records how it ended
    await wait_until(lambda: (node.data_dir / "tasks/t/1/exit.json").exists() and gone(t.pid), "the record")
    await node.runner()
    [ev] = node.of("t", kind=TaskEventKind.EXITED)
    assert (ev.exit_code, ev.reason) == (-signal.SIGKILL, "killed by signal 9")


async def test_an_orphan_of_a_killed_fence_that_ends_unseen_is_lost(node):
    r1 = await node.runner()
    r1.launch(sh("t", "echo ready; sleep 1000"))
    await node.output_has("t", "ready")
    [t] = await spawned(r1)
    await r1.stop()
    await kill_fence(node.data_dir)  # nobody records its status from here on
    os.killpg(t.pid, signal.SIGKILL)
    await wait_until(lambda: gone(t.pid), "the orphan to end")
    await node.runner()
    [ev] = node.of("t", kind=TaskEventKind.EXITED)
    assert (ev.exit_code, ev.reason) == (None, "lost")


async def test_follow_streams_live_and_ends_after_exit(node):
    r = await node.runner()
    r.launch(sh("t", "echo first; while [ ! -f go ]; do sleep 0.02; done; echo second"))
    got = b""

    async def read_all():
        nonlocal got
        async for chunk in r.follow("t", 1):
            got += chunk
            if got == b"first\n":
                assert [x.task_id for x in r.running()] == ["t"]  # live: the task still runs
                (node.data_dir / "tasks/t/1/go").touch()

    await asyncio.wait_for(read_all(), WAIT_S)
    assert got == b"first\nsecond\n"
    assert node.of("t", kind=TaskEventKind.EXITED)

    # After the end: from an offset, and without following.
    assert b"".join([c async for c in r.follow("t", 1, offset=6, follow=False)]) == b"second\n"
    assert b"".join([c async for c in r.follow("t", 1, offset=100)]) == b""


async def test_follow_chunks_are_bounded(node):
    r = await node.runner()
    r.launch(RunSpec(task_id="t", attempt=1, term=1, argv=(sys.executable, "-c", "import sys; sys.stdout.write('x' * 200000)")))
    await node.exited("t")
    chunks = [c async for c in r.follow("t", 1)]
    assert sum(map(len, chunks)) == 200000 and max(map(len, chunks)) <= 64 * 1024


async def test_follow_unknown_attempt(node):
    r = await node.runner()
    with pytest.raises(NotFound):
        async for _ in r.follow("nope", 1):
            pass
    with pytest.raises(InvalidArgument):
        async for _ in r.follow("..", 1):
            pass


async def test_reconcile_sentences_and_fencing(node):
    r = await node.runner()
    long = "echo ready; sleep 1000"
    a, b, c = sh("a", long), sh("b", long), sh("c", long)
    assert r.reconcile([a, b], term=5) == "started 2, stopped 0, 2 running"
    assert r.reconcile([a, b], term=5) == "started 0, stopped 0, 2 running"  # level-triggered
    await node.output_has("a", "ready")
    assert r.reconcile([b, c], term=6) == "started 1, stopped 1, 2 running"
    ev = await node.exited("a")
    assert ev.reason == "cancelled"
    # A stale leader's view is ignored, and nothing changes.
    assert r.reconcile([], term=5) == "ignored a desired set from term 5: term 6 is newer"
    assert [t.task_id for t in r.running()] == ["b", "c"]
    # An attempt that already ran is not run again; a bad one is skipped, not raised.
    bad = RunSpec(task_id="../x", attempt=1, term=6, shell="true")
    fail = RunSpec(task_id="f", attempt=1, term=6, argv=("/no/such/binary",))
    assert r.reconcile([a, b, c, bad, fail], term=6) == (
        "started 1, stopped 0, 3 running, 1 already ran, 1 rejected")  # f is spawned in a thread
    assert (await node.exited("f")).exit_code == FAILED_TO_START_CODE
    assert r.reconcile([], term=7) == "started 0, stopped 2, 0 running"
    await node.exited("b")
    await node.exited("c")
    assert r.running() == []

    # The newest term survives a restart.
    await r.stop()
    r2 = await node.runner()
    assert r2.reconcile([], term=6).startswith("ignored")


@pytest.mark.parametrize("task_id", ["..", ".", "a/b", "../etc", "", "x" * 129, "a b", "é"])
async def test_bad_task_ids_are_refused(node, task_id):
    r = await node.runner()
    with pytest.raises(InvalidArgument):
        r.launch(RunSpec(task_id=task_id, attempt=1, term=1, shell="true"))
    with pytest.raises(InvalidArgument):
        r.log_path(task_id, 1)
    with pytest.raises(InvalidArgument):
        r.cancel(task_id, 1)
    assert sorted(p.name for p in (node.data_dir / "tasks").iterdir()) == []


@pytest.mark.parametrize("kw", [
    {"attempt": 0}, {"attempt": -1}, {"shell": ""}, {"term": -1}, {"timeout_s": -1},
    {"grace_s": float("nan")}, {"env": {"A=B": "x"}}, {"env": {"A": "x\0y"}}, {"gpu_indices": (-1,)},
])
async def test_bad_specs_are_refused(node, kw):
    r = await node.runner()
    spec = dict(task_id="t", attempt=1, term=1, shell="true") | kw
    with pytest.raises(InvalidArgument):
        r.launch(RunSpec(**spec))
    assert not (node.data_dir / "tasks/t").exists()


async def test_launch_needs_a_started_runner(tmp_path):
    r = TaskRunner(tmp_path, lambda e: None)
    with pytest.raises(FailedPrecondition):
        r.launch(sh("t", "true"))
    with pytest.raises(FailedPrecondition):
        r.reconcile([sh("t", "true")], term=1)


async def test_on_event_errors_do_not_break_the_runner(tmp_path):
    seen: list[TaskEvent] = []

    def on_event(e: TaskEvent) -> None:
        seen.append(e)
        raise RuntimeError("boom")

    r = TaskRunner(tmp_path, on_event)
    await r.start()
    try:
        r.launch(sh("t", "exit 1"))
        await wait_until(lambda: len(seen) == 2, "both events")
        assert [e.kind for e in seen] == [TaskEventKind.STARTED, TaskEventKind.EXITED]
    finally:
        await r.stop()


def test_shell_status_mapping():
    assert shell_status_to_exit_code(0) == 0
    assert shell_status_to_exit_code(1) == 1
    assert shell_status_to_exit_code(128) == 128
    assert shell_status_to_exit_code(137) == -9
    assert shell_status_to_exit_code(143) == -15
    assert shell_status_to_exit_code(255) == 255


def test_runner_module_does_not_import_torch():
    import subprocess

    code = "import sys, lepton.agent.tasks.runner; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


async def test_an_exit_the_coordinator_never_took_is_reported_again_after_a_restart(node):
    r1 = await node.runner(acknowledged_by_caller=True)
    r1.launch(sh("t", "exit 3"))
    r1.launch(sh("u", "exit 4"))
    await node.exited("t")
    await node.exited("u")
    r1.acknowledge("u", 1)  # the report of t never reached the coordinator (the agent died)
    await wait_until(lambda: (node.data_dir / "tasks/u/1/reported.json").exists(), "u marked reported")
    assert not (node.data_dir / "tasks/t/1/reported.json").exists()
    await r1.stop()

    await node.runner(acknowledged_by_caller=True)
    assert [e.exit_code for e in node.of("t", kind=TaskEventKind.EXITED)] == [3, 3]
    assert len(node.of("u", kind=TaskEventKind.EXITED)) == 1
