"""The task half of lepton.client.Client, against the in-process fakes of client.testing."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from lepton.client import (
    TASK_STATES,
    Client,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TaskInfo,
    Unavailable,
    parse_size,
)
from lepton.client import tasks as client_tasks
from lepton.client.testing import FakeAgent, FakeCoordinator, make_node, make_task, serve
from lepton.client.types import task_state_to_proto
from lepton.v1 import tasks_pb2 as tpb

TASK_KEYS = {
    "id",
    "name",
    "state",
    "attempt",
    "failures",
    "node_losses",
    "node_id",
    "node_address",
    "gpu_indices",
    "exit_code",
    "reason",
    "priority",
    "owner",
    "command",
    "resources",
    "constraints",
    "env",
    "workdir",
    "max_retries",
    "timeout_s",
    "grace_s",
    "request_id",
    "created_at_ms",
    "assigned_at_ms",
    "started_at_ms",
    "finished_at_ms",
    "history",
    "job_id",
    "gang_rank",
    "code_digest",
    "restart_count",
}
ATTEMPT_KEYS = {
    "attempt",
    "node_id",
    "state",
    "exit_code",
    "reason",
    "started_at_ms",
    "finished_at_ms",
}


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_tasks, "LOG_POLL_INITIAL_S", 0.01)
    monkeypatch.setattr(client_tasks, "LOG_POLL_MAX_S", 0.05)


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def addr(fake: FakeCoordinator) -> Iterator[str]:
    with serve(fake) as a:
        yield a


@pytest.fixture
def agents(fake: FakeCoordinator) -> Iterator[list[tuple[FakeAgent, str]]]:
    """Two fake agents, registered as nodes n1 and n2 of the fake coordinator."""
    a1, a2 = FakeAgent(), FakeAgent()
    with serve(a1) as addr1, serve(a2) as addr2:
        fake.add_node(make_node("n1", "agent-1", address=addr1))
        fake.add_node(make_node("n2", "agent-2", address=addr2))
        yield [(a1, addr1), (a2, addr2)]


def calls(fake: FakeCoordinator, method: str) -> list:
    return [r for m, r in fake.calls if m == method]


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


# -- sizes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("512MiB", 512 * 1024**2),
        ("512mib", 512 * 1024**2),
        ("2G", 2 * 1024**3),
        ("2g", 2 * 1024**3),
        ("2Gi", 2 * 1024**3),
        ("1.5GiB", 3 * 1024**3 // 2),
        (" 1.5 GiB ", 3 * 1024**3 // 2),
        ("100MB", 100_000_000),
        ("1kb", 1000),
        ("1K", 1024),
        ("1T", 1024**4),
        ("10B", 10),
        (".5K", 512),
        (1.0e3, 1000),
    ],
)
def test_parse_size(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "bad", ["", "lots", "-1", "-1G", "1.2.3G", "1 X", "G", "1e9", -5, True, math.nan, [1]]
)
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(bad)  # type: ignore[arg-type]


def test_parse_size_message_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^memory '2 lots' is not a size"):
        parse_size("2 lots", "memory")
    with pytest.raises(InvalidArgument, match="must not be negative"):
        parse_size("-2G", "memory")


# -- validation before any RPC ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "the command is empty"),
        ({"argv": []}, "the command is empty"),
        ({"shell": "   "}, "the command is empty"),
        ({"argv": ["true"], "shell": "true"}, "not both"),
        ({"argv": "echo hi"}, "argv must be a list of strings"),
        ({"argv": ["", "x"]}, r"argv\[0\] is empty"),
        ({"argv": ["echo", 3]}, r"argv\[1\] must be a string"),
        ({"argv": ["true"], "cpu": -1}, "cpu must not be negative"),
        ({"argv": ["true"], "cpu": math.nan}, "cpu must be finite"),
        ({"argv": ["true"], "cpu": "2"}, "cpu must be a number"),
        ({"argv": ["true"], "memory": -1}, "memory must not be negative"),
        ({"argv": ["true"], "memory": "lots"}, "memory 'lots' is not a size"),
        ({"argv": ["true"], "gpus": -1}, "gpus must not be negative"),
        ({"argv": ["true"], "gpus": 1.5}, "gpus must be an integer"),
        ({"argv": ["true"], "gpus": True}, "gpus must be an integer"),
        ({"argv": ["true"], "gpu_memory": "-1G"}, "gpu memory"),
        ({"argv": ["true"], "max_retries": -1}, "max_retries must not be negative"),
        ({"argv": ["true"], "timeout": -0.5}, "timeout must not be negative"),
        ({"argv": ["true"], "grace": -1}, "grace must not be negative"),
        ({"argv": ["true"], "env": {"A": 1}}, "env must map"),
        ({"argv": ["true"], "constraints": {"": "x"}}, "constraints must map"),
        ({"argv": ["true"], "priority": 1.5}, "priority must be an integer"),
        ({"argv": ["true"], "on_disconnect": "pause"}, "on_disconnect must be one of stop, keep"),
    ],
)
def test_bad_submissions_fail_before_any_rpc(
    fake: FakeCoordinator, addr: str, kwargs: dict, message: str
) -> None:
    with Client(addr) as c, pytest.raises(InvalidArgument, match=message):
        c.submit(**kwargs)
    assert fake.calls == []


@pytest.mark.parametrize("bad", ["", "  "])
def test_empty_task_ids_fail_before_any_rpc(fake: FakeCoordinator, addr: str, bad: str) -> None:
    with Client(addr) as c:
        for call in (c.get, c.cancel, c.wait, c.find_task, c.logs):
            with pytest.raises(InvalidArgument, match="task id must not be empty"):
                call(bad)
    assert fake.calls == []


def test_bad_filters_and_arguments_fail_before_any_rpc(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c:
        with pytest.raises(InvalidArgument, match="unknown task state 'done'"):
            c.tasks(states=["done"])
        with pytest.raises(InvalidArgument, match="limit must not be negative"):
            c.tasks(limit=-1)
        with pytest.raises(InvalidArgument, match="timeout must not be negative"):
            c.wait("t-1", timeout=-1)
        with pytest.raises(InvalidArgument, match="attempt must not be negative"):
            c.logs("t-1", attempt=-1)
        with pytest.raises(InvalidArgument, match="not both"):
            c.logs("t-1", attempt=1, from_attempt=1)
    assert fake.calls == []


def test_server_validation_errors_come_back_as_invalid_argument(addr: str) -> None:
    class Refusing(FakeCoordinator):
        def SubmitTask(self, request, context):  # type: ignore[no-untyped-def]
            import grpc

            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "env name '1BAD' is not valid")

    with serve(Refusing()) as a, Client(a) as c:
        with pytest.raises(InvalidArgument, match="env name '1BAD'"):
            c.submit(["true"], env={"1BAD": "x"})


# -- submit -----------------------------------------------------------------------------


def test_submit_sends_the_whole_spec(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c:
        t = c.submit(
            ["python", "train.py", "--lr", "0.1"],
            name="train",
            cpu=2.5,
            memory="1.5GiB",
            gpus=2,
            gpu_memory="40G",
            priority=-3,
            constraints={"pool": "a100"},
            env={"WANDB_MODE": "offline"},
            workdir="/work",
            max_retries=2,
            timeout=3600,
            grace=30,
            owner="ada",
            on_disconnect="keep",
        )
    (req,) = calls(fake, "SubmitTask")
    spec = req.spec
    assert list(spec.argv) == ["python", "train.py", "--lr", "0.1"] and spec.shell == ""
    r = spec.resources
    assert (r.cpu, r.memory_bytes, r.gpus, r.gpu_memory_bytes) == (2.5, 3 << 29, 2, 40 << 30)
    assert (spec.name, spec.priority, spec.workdir, spec.owner) == ("train", -3, "/work", "ada")
    assert dict(spec.constraints) == {"pool": "a100"} and dict(spec.env) == {
        "WANDB_MODE": "offline"
    }
    assert (spec.max_retries, spec.timeout_s, spec.grace_s) == (2, 3600.0, 30.0)
    assert spec.on_disconnect == tpb.ON_DISCONNECT_KEEP
    assert len(spec.request_id) == 32 and int(spec.request_id, 16) >= 0  # a uuid4 hex
    assert t.id.startswith("t-") and t.state == "pending" and t.attempt == 1
    assert t.command == ["python", "train.py", "--lr", "0.1"] and not t.shell
    assert t.resources.memory_bytes == 3 << 29 and t.request_id == spec.request_id


def test_submit_shell_and_fresh_request_ids(fake: FakeCoordinator, addr: str) -> None:
    with Client(addr) as c:
        a = c.submit(shell="echo hi; exit 3")
        b = c.submit(shell="echo hi; exit 3")
    assert a.command == "echo hi; exit 3" and a.shell
    assert a.id != b.id and a.request_id != b.request_id


def test_an_unknown_task_option_is_refused_before_anything_is_sent(
    fake: FakeCoordinator, addr: str
) -> None:
    with Client(addr) as c:
        with pytest.raises(TypeError, match="memroy"):
            c.submit(["train"], memroy="1G")
        with pytest.raises(InvalidArgument, match=r"tasks\[1\]: .*'gpu'"):
            c.submit_many([{"argv": ["a"]}, {"argv": ["b"], "gpu": 1}])
        with pytest.raises(TypeError, match="nodes_per_job"):
            c.submit_job(["train"], nodes_per_job=2)
    assert not calls(fake, "SubmitTask") and not calls(fake, "SubmitTasks")


def test_a_lost_submit_reply_is_retried_with_the_same_request_id(
    fake: FakeCoordinator, addr: str
) -> None:
    fake.lose_submit_replies = 1  # stored, then the reply is lost (leader stepped down)
    with Client(addr, timeout=5) as c:
        t = c.submit(["train"])
    first, second = calls(fake, "SubmitTask")
    assert first.spec.request_id == second.spec.request_id != ""
    assert list(fake.tasks) == [t.id]  # run once


def test_submit_retries_a_server_unavailable_with_the_same_request_id(
    fake: FakeCoordinator, addr: str
) -> None:
    fake.fail_unavailable = 2  # no leader yet
    with Client(addr, timeout=5) as c:
        t = c.submit(["train"], request_id="job-42")
        again = c.submit(["train"], request_id="job-42")
    ids = {r.spec.request_id for r in calls(fake, "SubmitTask")}
    assert ids == {"job-42"} and len(calls(fake, "SubmitTask")) == 4
    assert again.id == t.id and list(fake.tasks) == [t.id]


def test_submit_without_request_id_is_not_retried(fake: FakeCoordinator, addr: str) -> None:
    fake.lose_submit_replies = 1
    with Client(addr, timeout=5) as c, pytest.raises(Unavailable, match="stepped down"):
        c.submit(["train"], request_id="")
    assert len(calls(fake, "SubmitTask")) == 1


# -- get, list, find, cancel ------------------------------------------------------------


def test_get_list_and_filters(fake: FakeCoordinator, addr: str) -> None:
    fake.add_task(make_task("t-aaa1", owner="ada", created_at_ms=1))
    fake.add_task(make_task("t-aaa2", owner="bob", state=tpb.TASK_STATE_RUNNING, created_at_ms=2))
    fake.add_task(make_task("t-bbb3", owner="ada", state=tpb.TASK_STATE_FAILED, created_at_ms=3))
    with Client(addr) as c:
        assert c.get("t-aaa2").state == "running"
        with pytest.raises(NotFound, match='task "t-nope" not found'):
            c.get("t-nope")
        assert [t.id for t in c.list()] == ["t-aaa1", "t-aaa2", "t-bbb3"]
        assert [t.id for t in c.tasks(owner="ada")] == ["t-aaa1", "t-bbb3"]
        assert [t.id for t in c.list(states=["running", "FAILED"])] == ["t-aaa2", "t-bbb3"]
        assert [t.id for t in c.list(states="pending")] == ["t-aaa1"]
        assert [t.id for t in c.list(limit=2)] == ["t-aaa2", "t-bbb3"]  # the newest
    req = calls(fake, "ListTasks")[2]
    assert list(req.states) == [tpb.TASK_STATE_RUNNING, tpb.TASK_STATE_FAILED]


def test_list_is_an_alias_that_does_not_shadow_the_builtin() -> None:
    assert Client.list is Client.tasks
    assert Client("a:1,b:2").addresses == ["a:1", "b:2"]  # calls list() inside the class


def test_find_task_by_id_or_unique_prefix(fake: FakeCoordinator, addr: str) -> None:
    for tid in ("t-abc111", "t-abc222", "t-def333"):
        fake.add_task(make_task(tid))
    with Client(addr) as c:
        assert c.find_task("t-abc111").id == "t-abc111"
        assert c.find_task("t-d").id == "t-def333"
        assert c.find_task("def").id == "t-def333"  # "t-" may be left out
        with pytest.raises(InvalidArgument, match='"abc" is ambiguous: matches t-abc111, t-abc222'):
            c.find_task("abc")
        with pytest.raises(NotFound, match='task "zzz" not found'):
            c.find_task("zzz")


def test_cancel(fake: FakeCoordinator, addr: str) -> None:
    fake.add_task(make_task("t-1"))
    with Client(addr) as c:
        t = c.cancel("t-1")
        assert (t.state, t.done, t.reason) == ("cancelled", True, "cancelled")
        with pytest.raises(FailedPrecondition, match='task "t-1" already cancelled'):
            c.cancel("t-1")


# -- wait -------------------------------------------------------------------------------


def test_wait_long_polls_in_chunks_until_final(
    fake: FakeCoordinator, addr: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_tasks, "WAIT_CHUNK_S", 0.1)
    fake.add_task(make_task("t-1", state=tpb.TASK_STATE_RUNNING, node_id="n1"))

    def finish() -> None:
        # Finish after the client has long-polled three times (not after a fixed sleep,
        # which a loaded machine outruns).
        deadline = time.monotonic() + 10
        while len(calls(fake, "WaitTask")) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.update_task("t-1", state=tpb.TASK_STATE_SUCCEEDED, has_exit_code=True)

    in_thread(finish)
    with Client(addr) as c:
        t = c.wait("t-1")
    assert t.state == "succeeded" and t.exit_code == 0 and t.done
    waits = calls(fake, "WaitTask")
    assert len(waits) >= 3 and all(0 < w.timeout_s <= 0.1 for w in waits)


def test_wait_raises_deadline_exceeded_when_the_timeout_passes(
    fake: FakeCoordinator, addr: str
) -> None:
    fake.add_task(make_task("t-1"))
    with Client(addr) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match='task "t-1" is still pending after 0.3s'):
            c.wait("t-1", timeout=0.3)
        assert time.monotonic() - start < 2
        with pytest.raises(DeadlineExceeded):
            c.wait("t-1", timeout=0)
    assert all(w.timeout_s <= 0.3 for w in calls(fake, "WaitTask"))


def test_wait_chunks_are_at_most_60s(fake: FakeCoordinator, addr: str) -> None:
    fake.add_task(make_task("t-1", state=tpb.TASK_STATE_CANCELLED))
    with Client(addr) as c:
        assert c.wait("t-1", timeout=1000).state == "cancelled"
        assert c.wait("t-1").state == "cancelled"
    assert [w.timeout_s for w in calls(fake, "WaitTask")] == [60.0, 60.0]


# -- leader following -------------------------------------------------------------------


def test_task_calls_follow_the_leader(fake: FakeCoordinator, addr: str) -> None:
    follower = FakeCoordinator()
    follower.leader_hint = addr
    with serve(follower) as faddr, Client(faddr) as c:
        t = c.submit(["true"])
        assert c.get(t.id).id == t.id
        assert [x.id for x in c.list()] == [t.id]
        fake.update_task(t.id, state=tpb.TASK_STATE_FAILED)
        assert c.wait(t.id, timeout=5).state == "failed"
        fake.add_task(make_task("t-other"))
        assert c.cancel("t-other").state == "cancelled"
        assert c.current_address == addr
    # Only the first call went to the follower; the rest straight to the leader.
    assert [m for m, _ in follower.calls] == ["SubmitTask"]
    assert [m for m, _ in fake.calls] == [
        "SubmitTask",
        "GetTask",
        "ListTasks",
        "WaitTask",
        "CancelTask",
    ]


def test_wait_follows_a_redirect(fake: FakeCoordinator, addr: str) -> None:
    fake.add_task(make_task("t-1", state=tpb.TASK_STATE_SUCCEEDED))
    follower = FakeCoordinator()
    follower.leader_hint = addr
    with serve(follower) as faddr, Client(faddr) as c:
        assert c.wait("t-1").state == "succeeded"
    assert [m for m, _ in follower.calls] == ["WaitTask"]


# -- types and JSON ---------------------------------------------------------------------


def test_task_info_from_proto_and_json_shape() -> None:
    msg = make_task(
        "t-1",
        shell="echo hi; exit 3",
        state=tpb.TASK_STATE_FAILED,
        attempt=2,
        node_id="n2",
        node_address="10.0.0.2:7070",
        name="job",
        owner="ada",
        max_retries=1,
    )
    msg.failures = 2
    msg.has_exit_code, msg.exit_code = True, 3
    msg.spec.resources.memory_bytes = 1024
    msg.gpu_indices.extend([0, 3])
    msg.history.extend(
        [
            tpb.AttemptRecord(attempt=1, node_id="n1", state=tpb.TASK_STATE_FAILED, reason="lost"),
            tpb.AttemptRecord(
                attempt=2, node_id="n2", state=tpb.TASK_STATE_FAILED, exit_code=3, reason="x"
            ),
        ]
    )
    t = TaskInfo.from_proto(msg)
    d = t.to_dict()
    assert set(d) == TASK_KEYS
    assert set(d["resources"]) == {"cpu", "memory_bytes", "gpus", "gpu_memory_bytes"}
    assert all(set(h) == ATTEMPT_KEYS for h in d["history"])
    assert d["command"] == "echo hi; exit 3" and t.shell
    assert (d["state"], d["attempt"], d["failures"], d["exit_code"]) == ("failed", 2, 2, 3)
    assert d["gpu_indices"] == [0, 3] and d["resources"]["memory_bytes"] == 1024
    assert [h["exit_code"] for h in d["history"]] == [None, 3]  # lost: no exit code
    assert t.done
    json.dumps(d)  # plain JSON types only


def test_exit_code_none_until_an_attempt_exited() -> None:
    t = TaskInfo.from_proto(make_task("t-1", argv=["a", "b"]))
    assert t.exit_code is None and t.command == ["a", "b"] and not t.done
    succeeded = make_task("t-2", state=tpb.TASK_STATE_SUCCEEDED)
    succeeded.history.append(tpb.AttemptRecord(attempt=1, state=tpb.TASK_STATE_SUCCEEDED))
    assert TaskInfo.from_proto(succeeded).history[0].exit_code == 0


def test_task_states_round_trip() -> None:
    for name in TASK_STATES:
        msg = make_task("t", state=task_state_to_proto(name))
        assert TaskInfo.from_proto(msg).state == name
    assert TaskInfo.from_proto(make_task("t", state=99)).state == "unknown"
    done = {
        s
        for s in TASK_STATES
        if TaskInfo.from_proto(make_task("t", state=task_state_to_proto(s))).done
    }
    assert done == {"succeeded", "failed", "cancelled"}


# -- logs -------------------------------------------------------------------------------


def test_logs_follow_waits_for_placement_and_continues_across_a_retry(
    fake: FakeCoordinator, addr: str, agents: list[tuple[FakeAgent, str]]
) -> None:
    (a1, addr1), (a2, addr2) = agents
    with Client(addr) as c:
        t = c.submit(["train"], max_retries=1)
        seen: list[TaskInfo] = []

        def drive() -> None:
            time.sleep(0.1)  # pending for a while first
            fake.assign(t.id, "n1", addr1)
            a1.start(t.id, 1)
            a1.write(t.id, 1, b"attempt one\n")
            time.sleep(0.1)
            a1.write(t.id, 1, b"\xffraw bytes\n")
            a1.exit(t.id, 1)
            time.sleep(0.05)
            fake.finish(t.id, exit_code=3)  # retried: pending, attempt 2
            time.sleep(0.1)
            fake.assign(t.id, "n2", addr2)
            a2.start(t.id, 2)
            a2.write(t.id, 2, b"attempt two\n")
            a2.exit(t.id, 2)
            fake.finish(t.id, exit_code=0)

        driver = in_thread(drive)
        data = b"".join(c.logs(t.id, follow=True, on_task=seen.append))
        driver.join()
    assert data == b"attempt one\n\xffraw bytes\nattempt two\n"
    assert seen[0].state == "pending" and seen[-1].state == "succeeded"
    assert {s.attempt for s in seen} == {1, 2}
    assert all(r.follow and r.attempt == 1 for r in a1.calls[:1])
    assert a2.calls[0].attempt == 2


def test_logs_follow_from_attempt_one_catches_up_on_attempts_already_over(
    fake: FakeCoordinator, addr: str, agents: list[tuple[FakeAgent, str]]
) -> None:
    (a1, addr1), (a2, addr2) = agents
    fake.add_task(make_task("t-1", max_retries=1))
    fake.assign("t-1", "n1", addr1)
    a1.write("t-1", 1, b"one\n")
    fake.finish("t-1", exit_code=1)
    fake.assign("t-1", "n2", addr2)
    a2.write("t-1", 2, b"two\n")
    fake.finish("t-1", exit_code=0)
    with Client(addr) as c:
        assert b"".join(c.logs("t-1", follow=True, from_attempt=1)) == b"one\ntwo\n"
        assert b"".join(c.logs("t-1", follow=True)) == b"two\n"  # the current attempt
        assert b"".join(c.logs("t-1", follow=True, attempt=1)) == b"one\n"


def test_logs_resumes_at_its_offset_when_a_follow_ends_early(
    fake: FakeCoordinator, addr: str, agents: list[tuple[FakeAgent, str]]
) -> None:
    (a1, addr1), _ = agents
    fake.add_task(make_task("t-1"))
    fake.assign("t-1", "n1", addr1)
    a1.write("t-1", 1, b"12345")  # not "live" on the agent: its follow ends at once

    def drive() -> None:
        time.sleep(0.2)
        a1.write("t-1", 1, b"678")
        fake.finish("t-1", exit_code=0)

    in_thread(drive)
    with Client(addr) as c:
        assert b"".join(c.logs("t-1", follow=True)) == b"12345678"
    offsets = [r.offset for r in a1.calls]
    assert offsets[0] == 0 and offsets[-1] in (5, 8) and offsets == sorted(offsets)


def test_logs_without_follow_reads_the_latest_attempt_that_ran(
    fake: FakeCoordinator, addr: str, agents: list[tuple[FakeAgent, str]]
) -> None:
    (a1, addr1), _ = agents
    fake.add_task(make_task("t-1", max_retries=3))
    fake.assign("t-1", "n1", addr1)
    a1.write("t-1", 1, b"first try\n")
    fake.finish("t-1", exit_code=1)  # pending again, attempt 2, on no node
    with Client(addr) as c:
        assert b"".join(c.logs("t-1")) == b"first try\n"
        assert b"".join(c.logs("t-1", attempt=1)) == b"first try\n"
        with pytest.raises(NotFound, match="attempt 2 of task t-1 has not run"):
            b"".join(c.logs("t-1", attempt=2))
    assert [r.follow for r in a1.calls] == [False, False]


def test_logs_of_a_task_that_never_ran(fake: FakeCoordinator, addr: str) -> None:
    fake.add_task(make_task("t-1"))
    with Client(addr) as c:
        assert list(c.logs("t-1")) == []

        def cancel() -> None:
            time.sleep(0.1)
            fake.update_task("t-1", state=tpb.TASK_STATE_CANCELLED)

        in_thread(cancel)
        assert list(c.logs("t-1", follow=True)) == []  # waited, then it was cancelled


def test_logs_skips_an_unreachable_agent_of_a_finished_attempt(
    fake: FakeCoordinator, addr: str, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_node(make_node("gone", address="127.0.0.1:1"))
    fake.add_task(make_task("t-1", max_retries=1))
    fake.assign("t-1", "gone", "127.0.0.1:1")
    fake.finish("t-1", exit_code=None)  # node lost: retried
    fake.update_task("t-1", state=tpb.TASK_STATE_CANCELLED)
    with caplog.at_level(logging.WARNING), Client(addr) as c:
        assert list(c.logs("t-1", follow=True, from_attempt=1)) == []
    assert "skipping the output of t-1 attempt 1: cannot reach the agent at 127.0.0.1:1" in (
        caplog.text
    )
    with Client(addr) as c, pytest.raises(Unavailable, match="cannot reach the agent"):
        list(c.logs("t-1"))  # without follow, the error is the caller's


def test_close_ends_a_following_logs_quietly(
    fake: FakeCoordinator, addr: str, agents: list[tuple[FakeAgent, str]]
) -> None:
    (a1, addr1), _ = agents
    fake.add_task(make_task("t-1"))
    fake.assign("t-1", "n1", addr1)
    a1.start("t-1", 1)
    a1.write("t-1", 1, b"x")
    c = Client(addr)
    it = c.logs("t-1", follow=True)
    assert next(it) == b"x"
    threading.Timer(0.1, c.close).start()
    assert list(it) == []
