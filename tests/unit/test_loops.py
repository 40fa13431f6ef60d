"""The one driver of the leader's loops (common/loops.run_cycles): a sentence is logged once
when it changes, a crashed cycle does not end the loop, and the audit batcher's loop (on the
same driver) warns only of lost records."""

from __future__ import annotations

import asyncio
import logging

import grpc

from lepton.common.auth import AuthEvent, Principal, Role
from lepton.common.errors import Unavailable
from lepton.common.loops import run_cycles
from lepton.coordinator.api.security_api import AuditBatcher

logger = logging.getLogger("test_loops")


async def _until(predicate, timeout: float = 30.0) -> None:
    """Wait for a condition (the deadline only bounds a hang)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_run_cycles_hands_on_each_new_sentence_once_and_survives_a_crash(caplog):
    script = ["a", "a", "crash", "a", "b", "b", "c"]
    said: list[str] = []

    async def cycle() -> str:
        step = script.pop(0) if script else "c"
        if step == "crash":
            raise RuntimeError("boom")
        return step

    task = asyncio.create_task(run_cycles("t", cycle, interval_s=0.001, logger=logger, log=said.append))
    await _until(lambda: not script)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert said == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["t cycle failed"]


async def test_the_audit_loop_warns_of_lost_records_only(caplog):
    proposed: list[object] = []
    fail = [True]

    async def propose(cmd):
        if fail[0]:
            fail[0] = False
            raise Unavailable("no quorum")
        proposed.append(cmd)

    batcher = AuditBatcher(propose, is_leader=lambda: True)
    alice = Principal("alice", Role.USER, via="token")
    caplog.set_level(logging.INFO, logger="lepton.coordinator.api.security_api")
    task = asyncio.create_task(batcher.run(interval_s=0.001))
    try:
        batcher.on_event(AuthEvent(alice, "/lepton.v1.Coordinator/SubmitTask", grpc.StatusCode.OK, False))
        await _until(lambda: batcher.dropped == 1)
        batcher.on_event(AuthEvent(alice, "/lepton.v1.Coordinator/CancelTask", grpc.StatusCode.OK, False))
        await _until(lambda: len(proposed) == 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("security_api")]
    assert lines == ["audit: lost 1 audit records: no quorum"]


async def test_an_idle_audit_loop_sleeps_until_a_record_comes(monkeypatch):
    """Counts cycles, not time: it used to cycle every interval with nothing to write."""
    monkeypatch.setattr("lepton.coordinator.api.security_api.AUDIT_IDLE_S", 3600.0)
    proposed: list[object] = []

    async def propose(cmd):
        proposed.append(cmd)

    batcher = AuditBatcher(propose, is_leader=lambda: True)
    cycles = [0]
    real_cycle = batcher.run_cycle

    async def counted_cycle():
        cycles[0] += 1
        return await real_cycle()

    batcher.run_cycle = counted_cycle
    task = asyncio.create_task(batcher.run(interval_s=0.001))
    try:
        await asyncio.sleep(0.5)  # 500 intervals
        assert cycles[0] == 0
        alice = Principal("alice", Role.USER, via="token")
        for method in ("SubmitTask", "CancelTask"):
            batcher.on_event(AuthEvent(alice, f"/lepton.v1.Coordinator/{method}", grpc.StatusCode.OK, False))
        await _until(lambda: len(proposed) == 1)
        await asyncio.sleep(0.2)
        assert cycles[0] == 1 and len(proposed[0].append_audit.records) == 2  # one batch
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
