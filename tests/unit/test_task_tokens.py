"""Task credentials (coordinator/state/task_tokens.py): signed per attempt, checked against
the replicated state, never more than the submitter, dead once the attempt is over."""

from __future__ import annotations

import secrets

import pytest

from lepton.common.auth import Role
from lepton.common.errors import InvalidArgument
from lepton.coordinator.state import task_tokens as tt
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.coordinator.state.tasks import HOLDING
from lepton.v1 import security_pb2, state_pb2, tasks_pb2

KEY = secrets.token_bytes(tt.KEY_BYTES)
NOW = 1_000_000


def running_task(task_id="t-1", attempt=1, owner="alice", role="user", token_id="", timeout_s=0.0):
    spec = tasks_pb2.TaskSpec(owner=owner, owner_role=role, owner_token_id=token_id, timeout_s=timeout_s)
    return tasks_pb2.Task(id=task_id, attempt=attempt, spec=spec, assigned_at_ms=NOW,
                          state=tasks_pb2.TASK_STATE_RUNNING)


def check(token, task, tokens=None, now=NOW + 1, key=KEY):
    return tt.lookup(key, token, {task.id: task}.get, tokens or {}, lambda t: t.state in HOLDING, now)


def test_a_task_token_stands_for_its_submitter_while_the_attempt_holds_its_node():
    task = running_task()
    token = tt.mint(KEY, task)
    assert token.startswith("lept_") and token == tt.mint(KEY, task)  # the same on every resend
    p = check(token, task)
    assert (p.name, p.role, p.via, p.token_id) == ("alice", Role.USER, "task", "task:t-1/1")
    assert tt.task_of(p.token_id) == "t-1"

    task.state = tasks_pb2.TASK_STATE_SUCCEEDED  # the exit was reported
    assert check(token, task) is None
    task.state, task.attempt = tasks_pb2.TASK_STATE_ASSIGNED, 2  # requeued: a new attempt
    assert check(token, task) is None
    task.attempt = 1
    assert check(token, task) is not None


def test_forged_foreign_and_malformed_tokens_are_refused():
    task = running_task()
    token = tt.mint(KEY, task)
    assert check(token, task, key=secrets.token_bytes(tt.KEY_BYTES)) is None
    assert check(token, task, key=b"") is None
    payload, _, mac = token.partition(".")
    other = tt.mint(KEY, running_task("t-2")).partition(".")[0]
    assert check(f"{other}.{mac}", task) is None  # another task's claims under this MAC
    for bad in ("", "lept_", "lept_.", token + "x", "lept_" + "A" * 600, payload + ".!!!"):
        assert check(bad, task) is None


def test_expiry_and_the_submitters_revoked_token():
    task = running_task(timeout_s=60)
    token = tt.mint(KEY, task)
    assert check(token, task, now=tt.expiry_ms(task) - 1) is not None
    assert check(token, task, now=tt.expiry_ms(task)) is None
    assert tt.expiry_ms(running_task()) == NOW + tt.DEFAULT_TTL_S * 1000

    task = running_task(token_id="abc")
    token = tt.mint(KEY, task)
    live = {"abc": security_pb2.ApiToken(id="abc", name="alice", role="user")}
    assert check(token, task, live) is not None
    live["abc"].revoked = True
    assert check(token, task, live) is None
    assert check(token, task, {}) is None  # gone from the table: refused as well


def test_no_owner_or_role_means_no_credential():
    for task in (running_task(owner=""), running_task(role=""), running_task(role="node")):
        assert tt.mint(KEY, task) == ""
    task = running_task()
    token = tt.mint(KEY, task)
    task.spec.owner_role = "node"  # never a node's rights, whatever the state says
    assert check(token, task) is None


def test_the_key_is_replicated_once_and_survives_snapshots():
    sm = ClusterStateMachine()
    cmd = state_pb2.Command(set_task_token_key=state_pb2.SetTaskTokenKeyCmd(key=KEY))
    assert sm.apply(1, cmd.SerializeToString()) == tt.KEY_BYTES
    again = state_pb2.Command(set_task_token_key=state_pb2.SetTaskTokenKeyCmd(key=b"x" * tt.KEY_BYTES))
    sm.apply(2, again.SerializeToString())
    assert sm.security.task_token_key == KEY  # the first key wins
    short = state_pb2.Command(set_task_token_key=state_pb2.SetTaskTokenKeyCmd(key=b"short"))
    assert isinstance(sm.apply(3, short.SerializeToString()), InvalidArgument)

    sm.tasks.tasks["t-1"] = task = running_task()
    token = sm.security.task_token(task)
    assert sm.security.lookup(token, NOW + 1).name == "alice"
    copy = ClusterStateMachine()
    copy.restore(sm.snapshot(), sm.applied_index)
    assert copy.security.task_token_key == KEY
    assert copy.security.lookup(token, NOW + 1).name == "alice"  # any voter checks it
    copy.tasks.tasks["t-1"].state = tasks_pb2.TASK_STATE_FAILED
    assert copy.security.lookup(token, NOW + 1) is None


@pytest.mark.parametrize("role", ["admin", "user", "viewer"])
def test_the_role_is_the_submitters(role):
    task = running_task(role=role)
    assert check(tt.mint(KEY, task), task).role == Role(role)
