"""Admission of user submissions on the leader (coordinator/api/admission.py), the
retry hint across the gRPC boundary, and the client waiting it out."""

from __future__ import annotations

import grpc
import pytest

from lepton.client import Client
from lepton.client.testing import FakeCoordinator, serve
from lepton.common.errors import (
    RETRY_AFTER_METADATA_KEY,
    Overloaded,
    ResourceExhausted,
    from_rpc_error,
)
from lepton.coordinator.api.admission import RETRY_MAX_MS, RETRY_MIN_MS, SubmitAdmission


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admits_within_bounds_and_sheds_past_them() -> None:
    gate = SubmitAdmission(max_tasks=10, max_bytes=1000)
    with gate.admit(6, 100), gate.admit(4, 100):
        assert (gate.calls, gate.tasks, gate.bytes) == (2, 10, 200)
        with pytest.raises(Overloaded) as info:
            with gate.admit(1, 1):
                pass
        assert "at most 10 tasks" in info.value.message
        assert RETRY_MIN_MS <= info.value.retry_after_ms <= RETRY_MAX_MS
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (gate.calls, gate.tasks, gate.bytes, gate.shed) == (0, 0, 0, 1)


def test_each_shed_reaches_the_metrics_hook() -> None:
    from lepton.agent.metrics import CoordinatorMetrics

    metrics = CoordinatorMetrics()
    gate = SubmitAdmission(max_tasks=1, max_bytes=100)
    gate.on_shed = metrics.submissions_shed.inc
    with gate.admit(1, 1):
        for _ in range(3):
            with pytest.raises(Overloaded), gate.admit(1, 1):
                pass
    assert metrics.registry.get_sample_value("lepton_submissions_shed_total") == 3


def test_bytes_bound_sheds_too() -> None:
    gate = SubmitAdmission(max_tasks=1000, max_bytes=100)
    with gate.admit(1, 90), pytest.raises(Overloaded):
        with gate.admit(1, 20):
            pass


def test_one_call_is_admitted_alone_however_large() -> None:
    """A batch larger than the bound must not be refused forever."""
    gate = SubmitAdmission(max_tasks=10, max_bytes=100)
    with gate.admit(1000, 10_000):
        assert gate.calls == 1


def test_room_is_given_back_when_the_proposal_fails() -> None:
    gate = SubmitAdmission(max_tasks=10, max_bytes=100)
    with pytest.raises(RuntimeError), gate.admit(10, 10):
        raise RuntimeError("commit failed")
    assert (gate.calls, gate.tasks, gate.bytes) == (0, 0, 0)


def test_the_hint_follows_how_long_commits_take() -> None:
    clock = Clock()
    gate = SubmitAdmission(max_tasks=10, max_bytes=100, clock=clock)
    for _ in range(30):  # commits have been taking 2 s each
        with gate.admit(1, 1):
            clock.now += 2.0
    with gate.admit(10, 1):
        assert gate.retry_after_ms() >= 1500
    clock.now += 100.0
    with gate.admit(10, 1):
        clock.now += 100.0
    assert gate.retry_after_ms() == RETRY_MAX_MS  # clamped


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_the_hint_crosses_the_boundary() -> None:
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy",
                                      ((RETRY_AFTER_METADATA_KEY, "250"),)))
    assert isinstance(err, Overloaded) and err.retry_after_ms == 250
    quota = from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota"))
    assert isinstance(quota, ResourceExhausted) and not isinstance(quota, Overloaded)


def test_client_waits_out_a_shed_and_retries_to_success() -> None:
    fake = FakeCoordinator()
    fake.shed_next = 3
    with serve(fake) as addr, Client(addr, timeout=10) as c:
        task = c.submit(["true"])
        assert task.id in fake.tasks
    assert [m for m, _ in fake.calls] == ["SubmitTask"] * 4
    ids = {req.spec.request_id for _, req in fake.calls}
    assert len(ids) == 1  # the same request each time: idempotent


def test_a_refusal_without_hint_is_not_retried() -> None:
    """A quota refusal: retrying would not help."""
    fake = FakeCoordinator()
    fake.shed_next, fake.shed_hint_ms = 1, None
    with serve(fake) as addr, Client(addr, timeout=10) as c:
        with pytest.raises(ResourceExhausted) as info:
            c.submit(["true"])
    assert not isinstance(info.value, Overloaded)
    assert len(fake.calls) == 1


def test_a_hint_past_the_budget_gives_up_with_the_shed_error() -> None:
    fake = FakeCoordinator()
    fake.shed_next, fake.shed_hint_ms = 100, 5000
    with serve(fake) as addr, Client(addr, timeout=1) as c:
        with pytest.raises(Overloaded):
            c.submit(["true"])
    assert len(fake.calls) == 1
