"""lepton-ctl's task commands in-process, against the fakes of client.testing."""

from __future__ import annotations

import _thread
import io
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from lepton.client import TaskInfo, cli, cli_tasks
from lepton.client import tasks as client_tasks
from lepton.client.testing import FakeAgent, FakeCoordinator, make_node, make_task, serve
from lepton.v1 import tasks_pb2 as tpb


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_tasks, "LOG_POLL_INITIAL_S", 0.01)
    monkeypatch.setattr(client_tasks, "LOG_POLL_MAX_S", 0.05)
    monkeypatch.setattr(cli_tasks, "PENDING_NOTE_AFTER_S", 0.15)


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def server(fake: FakeCoordinator, agent: FakeAgent) -> Iterator[str]:
    """The fake coordinator, and on the same address the fake agent of node n1."""
    with serve(fake, agent=agent) as a:
        fake.add_node(make_node("n1aaaaaaaaaaaaaa", "agent-1", address=a))
        yield a


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def when_submitted(fake: FakeCoordinator, script: Callable[[str], None]) -> threading.Thread:
    """Run `script(task_id)` in a thread once the (one) task has been submitted."""

    def go() -> None:
        deadline = time.monotonic() + 10
        while not fake.tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        (task_id,) = list(fake.tasks)
        script(task_id)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def runs(
    fake: FakeCoordinator, agent: FakeAgent, address: str, output: bytes, **finish
) -> Callable:
    """A script: the task is placed on n1, prints `output`, exits; then `fake.finish(**finish)`."""

    def script(task_id: str) -> None:
        attempt = fake.task(task_id).attempt
        fake.assign(task_id, "n1aaaaaaaaaaaaaa", address)
        agent.start(task_id, attempt)
        agent.write(task_id, attempt, output)
        agent.exit(task_id, attempt)
        fake.finish(task_id, **finish)

    return script


# -- parsing ----------------------------------------------------------------------------


def test_submit_options_become_submit_kwargs() -> None:
    args = cli.build_parser().parse_args(
        [
            "submit",
            "--name", "train",
            "--cpu", "0.5",
            "--mem", "2G",
            "--gpus", "2",
            "--gpu-mem", "1.5GiB",
            "--priority", "-3",
            "--label", "pool=a100",
            "--label", "zone=b",
            "--env", "K=V=W",
            "--env", "EMPTY=",
            "--workdir", "/w",
            "--retries", "2",
            "--timeout", "30",
            "--grace", "5",
            "--owner", "ada",
            "--request-id", "job-1",
            "--on-disconnect", "keep",
            "--",
            "python", "train.py", "--lr", "0.1",
        ]
    )  # fmt: skip
    kw = cli_tasks.submit_kwargs(args)
    assert kw == {
        "argv": ["python", "train.py", "--lr", "0.1"],
        "name": "train",
        "cpu": 0.5,
        "memory": 2 << 30,
        "gpus": 2,
        "gpu_memory": 3 << 29,
        "priority": -3,
        "constraints": {"pool": "a100", "zone": "b"},
        "env": {"K": "V=W", "EMPTY": ""},
        "workdir": "/w",
        "max_retries": 2,
        "timeout": 30.0,
        "grace": 5.0,
        "owner": "ada",
        "request_id": "job-1",
        "on_disconnect": "keep",
    }
    assert args.timeout == 10.0  # the call budget is untouched by the task's --timeout


def test_shell_joins_the_command_and_defaults() -> None:
    args = cli.build_parser().parse_args(["run", "--shell", "--", "echo hi;", "exit 3"])
    kw = cli_tasks.submit_kwargs(args)
    assert kw["shell"] == "echo hi; exit 3" and "argv" not in kw
    assert (kw["cpu"], kw["memory"], kw["max_retries"], kw["request_id"]) == (0.0, 0, 0, None)


def test_the_command_may_come_without_dashes_and_keep_its_own_flags() -> None:
    args = cli.build_parser().parse_args(["submit", "--cpu", "1", "sh", "-c", "echo -o json"])
    assert cli_tasks.submit_kwargs(args)["argv"] == ["sh", "-c", "echo -o json"]
    args = cli.build_parser().parse_args(["run", "--", "echo", "--", "x"])
    assert cli_tasks.submit_kwargs(args)["argv"] == ["echo", "--", "x"]


def test_call_budget_goes_before_submit_and_task_timeout_after() -> None:
    args = cli.build_parser().parse_args(
        ["--timeout", "3", "submit", "--timeout", "60", "-o", "json", "--", "true"]
    )
    assert (args.timeout, args.task_timeout, args.output) == (3.0, 60.0, "json")


def test_list_and_logs_options() -> None:
    p = cli.build_parser()
    a = p.parse_args(["tasks", "list", "--state", "running", "--state", "pending", "--limit", "5"])
    assert (a.state, a.owner, a.limit) == (["running", "pending"], None, 5)
    a = p.parse_args(["logs", "t-1", "-f", "--attempt", "2", "--timeout", "4"])
    assert (a.task, a.follow, a.attempt, a.timeout) == ("t-1", True, 2, 4.0)


@pytest.mark.parametrize(
    "argv",
    [
        ["submit"],
        ["submit", "--cpu", "1"],
        ["submit", "--"],
        ["run", "--cpu", "1", "--"],
        ["submit", "--cpu", "-1", "--", "true"],
        ["submit", "--cpu", "nan", "--", "true"],
        ["submit", "--mem", "lots", "--", "true"],
        ["submit", "--mem", "-1G", "--", "true"],
        ["submit", "--gpus", "-1", "--", "true"],
        ["submit", "--gpus", "1.5", "--", "true"],
        ["submit", "--retries", "-1", "--", "true"],
        ["submit", "--label", "novalue", "--", "true"],
        ["submit", "--env", "=x", "--", "true"],
        ["submit", "--bogus", "--", "true"],
        ["tasks"],
        ["tasks", "list", "--state", "done"],
        ["tasks", "list", "--limit", "0"],
        ["tasks", "show"],
        ["logs"],
        ["logs", "t-1", "--attempt", "0"],
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("lepton-ctl: ") and err.count("\n") == 1, err


def test_size_errors_say_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run(capsys, "submit", "--mem", "lots", "--", "true")
    assert "argument --mem: size 'lots' is not a size" in err


# -- submit -----------------------------------------------------------------------------


def test_submit_prints_the_id_alone(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--server", server, "submit", "--mem", "1G", "--", "echo", "hi")
    (task_id,) = fake.tasks
    assert (code, out, err) == (0, task_id + "\n", "")
    assert fake.tasks[task_id].spec.resources.memory_bytes == 1 << 30


def test_submit_json_is_the_task(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "--server", server, "submit", "-o", "json", "--shell", "--", "echo", "hi"
    )
    doc = json.loads(out)
    assert code == 0 and doc["id"] in fake.tasks
    assert (doc["state"], doc["command"], doc["exit_code"]) == ("pending", "echo hi", None)
    assert doc["resources"] == {"cpu": 0.0, "memory_bytes": 0, "gpus": 0, "gpu_memory_bytes": 0}


def test_server_refusals_are_one_line_exit_1(
    server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "--server", server, "submit", "--", "")
    assert (code, out, err) == (1, "", "lepton-ctl: argv[0] is empty\n")


# -- run --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish", "code", "note"),
    [
        ({"exit_code": 0}, 0, ""),
        ({"exit_code": 3}, 3, "failed: exit code 3"),
        ({"exit_code": 255}, 255, "failed: exit code 255"),
        ({"exit_code": -9, "reason": "killed by signal 9"}, 137, "failed: killed by signal 9"),
        ({"exit_code": -15, "reason": "timeout"}, 143, "failed: timeout"),
        ({"exit_code": None, "reason": "lost"}, 1, "failed: lost"),
    ],
)
def test_run_streams_output_and_exits_with_the_task_code(
    fake: FakeCoordinator,
    agent: FakeAgent,
    server: str,
    capsys: pytest.CaptureFixture[str],
    finish: dict,
    code: int,
    note: str,
) -> None:
    when_submitted(fake, runs(fake, agent, server, b"hi\n", **finish))
    got, out, err = run(capsys, "--server", server, "run", "--", "sh", "-c", "echo hi")
    (task_id,) = fake.tasks
    assert (got, out) == (code, "hi\n")
    assert err == (f"lepton-ctl: task {task_id} {note}\n" if note else "")


def test_run_writes_raw_bytes_as_they_come(
    fake: FakeCoordinator,
    agent: FakeAgent,
    server: str,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    when_submitted(fake, runs(fake, agent, server, b"\xff\x00binary\n", exit_code=0))
    assert cli.main(["--server", server, "run", "--", "cat", "blob"]) == 0
    out, err = capsysbinary.readouterr()
    assert (out, err) == (b"\xff\x00binary\n", b"")


def test_run_follows_a_retry_and_says_so(
    fake: FakeCoordinator, agent: FakeAgent, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def script(task_id: str) -> None:
        runs(fake, agent, server, b"try 1\n", exit_code=3)(task_id)
        time.sleep(0.05)
        runs(fake, agent, server, b"try 2\n", exit_code=0)(task_id)

    when_submitted(fake, script)
    code, out, err = run(capsys, "--server", server, "run", "--retries", "1", "--", "train")
    (task_id,) = fake.tasks
    assert (code, out) == (0, "try 1\ntry 2\n")
    assert err == f"lepton-ctl: {task_id} attempt 1 failed (exit code 3); retrying as attempt 2\n"


def test_run_says_once_why_a_task_is_pending_then_cancelled_exits_130(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = "unschedulable: needs 4 gpus, largest node has 0"

    def script(task_id: str) -> None:
        fake.update_task(task_id, reason=reason)
        time.sleep(0.6)  # several polls past PENDING_NOTE_AFTER_S
        fake.update_task(task_id, state=tpb.TASK_STATE_CANCELLED, reason="cancelled")

    when_submitted(fake, script)
    code, out, err = run(capsys, "--server", server, "run", "--gpus", "4", "--", "train")
    (task_id,) = fake.tasks
    assert (code, out) == (130, "")
    assert err == (
        f"lepton-ctl: {task_id} pending: {reason}\nlepton-ctl: task {task_id} cancelled\n"
    )


def test_ctrl_c_during_run_cancels_the_task_and_exits_130(
    fake: FakeCoordinator,
    server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_tasks, "PENDING_NOTE_AFTER_S", 60.0)

    def script(task_id: str) -> None:
        time.sleep(0.2)
        _thread.interrupt_main()

    when_submitted(fake, script)
    code, out, err = run(capsys, "--server", server, "run", "--", "sleep", "100")
    (task_id,) = fake.tasks
    assert (code, out) == (130, "")
    assert err == f"lepton-ctl: interrupted: cancelled task {task_id}\n"
    assert fake.tasks[task_id].state == tpb.TASK_STATE_CANCELLED


def test_ctrl_c_while_shipping_the_code_submits_nothing(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, tmp_path,
) -> None:
    def ship_code(*_args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_tasks, "ship_code", ship_code)
    code, out, err = run(capsys, "--server", server, "run", "--working-dir", str(tmp_path),
                         "--", "true")
    assert (code, out, fake.tasks) == (130, "", {})
    assert err == "lepton-ctl: interrupted while shipping the code; nothing submitted\n"


def test_ctrl_c_while_the_submission_is_on_the_wire_cancels_what_it_stored(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str],
) -> None:
    fake.delay_s = 0.5  # each call waits in the server: the interrupt lands mid-call

    def interrupt_mid_call() -> None:
        deadline = time.monotonic() + 10
        while not any(m == "SubmitTask" for m, _ in fake.calls) and time.monotonic() < deadline:
            time.sleep(0.005)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_mid_call, daemon=True).start()
    code, _, err = run(capsys, "--server", server, "run", "--", "sleep", "100")
    (task_id,) = fake.tasks  # the second send found the first one's task
    assert [m for m, _ in fake.calls].count("SubmitTask") == 2  # stopped inside the first
    assert code == 130
    assert err == f"lepton-ctl: interrupted: cancelled task {task_id}\n"
    assert fake.tasks[task_id].state == tpb.TASK_STATE_CANCELLED


def test_ctrl_c_during_a_submission_without_request_id_says_it_may_be_stored(
    fake: FakeCoordinator, server: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Held after the call, as if its answer had not come: with no request id to look the
    # task up by, `run` cannot cancel it and says so.
    monkeypatch.setenv(cli_tasks.HOLD_AFTER_SUBMIT_ENV, "30")
    # A real SIGINT: it wakes the hold's sleep (interrupt_main would wait for it to end).
    when_submitted(fake, lambda _task_id: os.kill(os.getpid(), signal.SIGINT))
    code, _, err = run(capsys, "--server", server, "run", "--request-id", "", "--", "true")
    assert code == 130
    assert err == ("lepton-ctl: interrupted while submitting; it may have been stored without "
                   "a request id ('lepton-ctl tasks list')\n")


def test_run_that_loses_the_cluster_names_the_task(
    fake: FakeCoordinator, agent: FakeAgent, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def script(task_id: str) -> None:
        fake.fail_unavailable = 10_000  # the coordinator has no leader from now on

    when_submitted(fake, script)
    code, out, err = run(capsys, "--server", server, "--timeout", "0.5", "run", "--", "train")
    (task_id,) = fake.tasks
    assert (code, out) == (1, "")
    assert err.startswith(f"lepton-ctl: lost track of task {task_id}: ")
    assert err.endswith(f"(it may still run: 'lepton-ctl tasks show {task_id}')\n")
    assert err.count("\n") == 1


def _task(state: str, exit_code: int | None = None, reason: str = "") -> TaskInfo:
    msg = make_task("t-1", state=getattr(tpb, f"TASK_STATE_{state.upper()}"), reason=reason)
    if exit_code is not None:
        msg.has_exit_code, msg.exit_code = True, exit_code
    return TaskInfo.from_proto(msg)


@pytest.mark.parametrize(
    ("task", "code"),
    [
        (_task("succeeded", 0), 0),
        (_task("failed", 1), 1),
        (_task("failed", 3), 3),
        (_task("failed", 255), 255),
        (_task("failed", 256), 1),  # out of range
        (_task("failed", -2), 130),  # killed by SIGINT
        (_task("failed", -9), 137),
        (_task("failed", -200), 255),
        (_task("failed", 0, "timeout"), 1),  # failed, though its process exited 0
        (_task("failed", None, "lost"), 1),
        (_task("cancelled"), 130),
        (_task("cancelled", 0), 130),
    ],
)
def test_exit_code_mapping(task: TaskInfo, code: int) -> None:
    assert cli_tasks.exit_code_of(task) == code


def test_end_notes() -> None:
    assert cli_tasks.end_note(_task("failed", 3, "exit code 3")) == "task t-1 failed: exit code 3"
    assert cli_tasks.end_note(_task("failed", 3)) == "task t-1 failed: exit code 3"
    assert cli_tasks.end_note(_task("cancelled", None, "cancelled")) == "task t-1 cancelled"


def test_run_notes_pending_once_per_attempt() -> None:
    now = [0.0]
    err = io.StringIO()
    pending = _task("pending", reason="waiting: 3 tasks ahead")
    notes = cli_tasks.RunNotes(pending, err=err, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.5, 3.0, 9.0):
        now[0] = t
        notes(pending)
    assert err.getvalue() == "lepton-ctl: t-1 pending: waiting: 3 tasks ahead\n"
    notes(_task("running"))
    now[0] = 20.0
    notes(pending)  # the same attempt again: said already
    assert err.getvalue().count("\n") == 1


# -- tasks list / show / cancel, logs ---------------------------------------------------


@pytest.fixture
def some_tasks(fake: FakeCoordinator, server: str) -> str:
    now = int(time.time() * 1000)
    fake.add_task(make_task("t-aaa111", name="train", created_at_ms=now - 5000, priority=7))
    fake.add_task(make_task("t-aaa222", owner="ada", created_at_ms=now - 4000, max_retries=1))
    fake.assign("t-aaa222", "n1aaaaaaaaaaaaaa", server)
    fake.finish("t-aaa222", exit_code=3)  # retried: pending, attempt 2
    fake.update_task("t-aaa222", reason="unschedulable: " + "x" * 100)
    fake.add_task(make_task("t-bbb333", created_at_ms=now - 3000))
    fake.assign("t-bbb333", "n1aaaaaaaaaaaaaa", server)
    fake.add_task(make_task("t-ccc444", created_at_ms=now - 2000))
    fake.assign("t-ccc444", "gone0000000000000", "127.0.0.1:1")
    return server


def test_tasks_list_table(some_tasks: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--server", some_tasks, "tasks", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "STATE", "PRIO", "NODE", "ATTEMPT", "EXIT", "AGE", "JOB", "REASON"
    ]  # fmt: skip
    assert lines[1].split() == ["t-aaa111", "train", "pending", "7", "-", "1", "-", "5s", "-"]
    row = lines[2].split()
    assert row[:9] == ["t-aaa222", "-", "pending", "0", "-", "2", "3", "4s", "-"]
    assert lines[2].endswith("…") and len(" ".join(row[9:])) == 60  # reason truncated
    assert lines[3].split()[:8] == ["t-bbb333", "-", "running", "0", "agent-1", "1", "-", "3s"]
    assert lines[4].split()[4] == "gone0000000000000"  # a node not known by name: its whole id


def test_tasks_list_filters_and_json(
    fake: FakeCoordinator, some_tasks: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "--server", some_tasks, "tasks", "list", "--state", "pending", "-o", "json"
    )
    assert code == 0 and [t["id"] for t in json.loads(out)] == ["t-aaa111", "t-aaa222"]
    _, out, _ = run(capsys, "--server", some_tasks, "tasks", "list", "--owner", "ada", "-o", "json")
    assert [t["id"] for t in json.loads(out)] == ["t-aaa222"]
    _, out, _ = run(capsys, "--server", some_tasks, "tasks", "list", "--limit", "1", "-o", "json")
    assert [t["id"] for t in json.loads(out)] == ["t-ccc444"]


def test_tasks_list_empty(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--server", server, "tasks", "list") == (0, "", "no tasks\n")
    assert run(capsys, "--server", server, "tasks", "list", "-o", "json") == (0, "[]\n", "")


def test_tasks_show_by_prefix_with_history(
    some_tasks: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--server", some_tasks, "tasks", "show", "aaa2")
    assert code == 0
    assert "t-aaa222" in out and "Owner" in out and "ada" in out
    assert "Retries      1 (1 failed attempt)" in out
    history = out[out.index("ATTEMPT  NODE") :].splitlines()
    assert history[1].split()[:4] == ["1", "agent-1", "failed", "3"]
    code, out, _ = run(capsys, "--server", some_tasks, "tasks", "show", "t-aaa111", "-o", "json")
    assert code == 0 and json.loads(out)["name"] == "train"


def test_task_references_not_found_and_ambiguous(
    some_tasks: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--server", some_tasks, "tasks", "show", "zzz") == (
        1,
        "",
        'lepton-ctl: task "zzz" not found\n',
    )
    code, _, err = run(capsys, "--server", some_tasks, "tasks", "cancel", "aaa")
    assert code == 1
    assert err == 'lepton-ctl: task "aaa" is ambiguous: matches t-aaa111, t-aaa222\n'


def test_tasks_cancel(
    fake: FakeCoordinator, some_tasks: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(capsys, "--server", some_tasks, "tasks", "cancel", "bbb") == (
        0,
        "task t-bbb333 cancelled\n",
        "",
    )
    code, out, err = run(capsys, "--server", some_tasks, "tasks", "cancel", "t-bbb333")
    assert (code, out) == (1, "")
    assert err == 'lepton-ctl: task "t-bbb333" already cancelled\n'


def test_logs_prints_raw_output_and_follows(
    fake: FakeCoordinator, agent: FakeAgent, server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.add_task(make_task("t-abc", max_retries=1))
    runs(fake, agent, server, b"first\n", exit_code=1)("t-abc")
    assert run(capsys, "--server", server, "logs", "abc") == (0, "first\n", "")

    def second() -> None:
        time.sleep(0.1)
        runs(fake, agent, server, b"second\n", exit_code=0)("t-abc")

    threading.Thread(target=second, daemon=True).start()
    assert run(capsys, "--server", server, "logs", "t-abc", "-f") == (0, "second\n", "")
    assert run(capsys, "--server", server, "logs", "t-abc", "--attempt", "1") == (0, "first\n", "")
    code, out, err = run(capsys, "--server", server, "logs", "t-abc", "--attempt", "3")
    assert (code, out, err) == (1, "", "lepton-ctl: attempt 3 of task t-abc has not run\n")


def test_sweep_makes_one_submission_per_combination() -> None:
    args = cli.build_parser().parse_args([
        "submit", "--name", "lr{lr}", "--request-id", "s", "--sweep", "lr=0.1,0.01",
        "--sweep", "bs=32,64,128", "--", "python", "train.py", "--lr={lr}", "--bs", "{bs}",
    ])
    got = cli_tasks.sweep_kwargs(cli_tasks.submit_kwargs(args), args.sweep)
    assert len(got) == 6
    assert got[0]["argv"] == ["python", "train.py", "--lr=0.1", "--bs", "32"]
    assert got[5]["argv"] == ["python", "train.py", "--lr=0.01", "--bs", "128"]
    assert [g["name"] for g in got[:3]] == ["lr0.1"] * 3
    assert [g["request_id"] for g in got] == [f"s-{i}" for i in range(6)]


@pytest.mark.parametrize("argv, fragment", [
    (["--sweep", "lr=0.1", "--", "echo", "x"], "not used"),
    (["--sweep", "lr=0.1", "--", "echo", "{lr}", "{bs}"], "no --sweep bs"),
    (["--sweep", "lr=0.1,", "--", "echo", "{lr}"], "empty"),
    (["--sweep", "lr=1", "--sweep", "lr=2", "--", "echo", "{lr}"], "twice"),
    (["--sweep", "a=" + ",".join(map(str, range(101))), "--sweep", "b=" + ",".join(map(str, range(100))),
      "--", "echo", "{a}{b}"], "at most"),
])
def test_bad_sweeps_are_refused(argv, fragment) -> None:
    args = cli.build_parser().parse_args(["submit", *argv])
    with pytest.raises(cli_tasks.UsageError, match=fragment):
        cli_tasks.sweep_kwargs(cli_tasks.submit_kwargs(args), args.sweep)
