"""A stopped or hung attempt fence (agent/tasks/fence.py) must not let attempts outlive their
lease: the agent, while alive, fences them itself (lease_guard.py), resumes a stopped fence,
and replaces one that does not answer (fence_keeper.py). A whole machine paused pauses the
attempts with the fence, which kills them when it resumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from lepton.agent.tasks import fence_link
from lepton.agent.tasks import runner as runner_mod
from lepton.agent.tasks import task_proc as tp
from lepton.agent.tasks.fence_keeper import FenceKeeper
from lepton.agent.tasks.lease import AttemptLease, supported
from lepton.agent.tasks.runner import RunSpec
from lepton.agent.tasks.task_spec import FENCED
from tests.unit.test_fence import fence_pid
from tests.unit.test_runner import Node, gone, sh, spawned, wait_until

pytestmark = pytest.mark.skipif(not supported(), reason="needs /proc/uptime and CLOCK_BOOTTIME")


def stopped(pid: int) -> bool:
    info = tp.proc_info(pid)
    return info is not None and info.stopped


@contextlib.asynccontextmanager
async def sigstopped(*pids: int, wait: bool = True):
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        for pid in pids:
            if wait:
                await wait_until(lambda pid=pid: stopped(pid), f"{pid} to stop")
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def renewing(lease: AttemptLease, duration_s: float) -> None:
    while True:  # the leader answers
        lease.renew(duration_s)
        await asyncio.sleep(0.2)


async def test_the_agent_fences_attempts_past_their_lease_while_the_fence_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "SCAN_S", 3600.0)  # no scan: the fence stays stopped here
    lease = AttemptLease(tmp_path)
    lease.renew(3.0)
    node = Node(tmp_path)
    runner = await node.runner(lease_path=lease.path)
    leader = asyncio.create_task(renewing(lease, 3.0))
    try:
        runner.launch(RunSpec("t", 1, 1, shell="sleep 60 & sleep 60"))
        [att] = await spawned(runner)
        fence = fence_pid(tmp_path)
        async with sigstopped(fence):
            leader.cancel()  # the agent is cut off from the leader from here on
            await wait_until(lambda: gone(att.pid), "the attempt to be killed past its lease", timeout=30)
            assert stopped(fence)  # the agent did it: the fence is stopped all along
            assert (tmp_path / "tasks/t/1/fenced").exists()
        ev = await node.exited("t")  # the fence, resumed, reaps it and reports it
        assert (ev.reason, ev.exit_code) == (FENCED, -9)
        assert node.log("t").count("lepton: fenced") == 1  # fenced once, by whichever came first
    finally:
        leader.cancel()
        await runner.stop()


async def test_the_agent_resumes_a_stopped_fence(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runner_mod, "SCAN_S", 0.2)
    node = Node(tmp_path)
    runner = await node.runner()
    try:
        runner.launch(sh("warm", "exit 0"))
        await node.exited("warm")
        fence = fence_pid(tmp_path)
        async with sigstopped(fence, wait=False):  # the agent may resume it before we see it stopped
            await wait_until(lambda: "was stopped: resumed it" in caplog.text, "the agent to resume its fence")
            assert not stopped(fence)
        runner.launch(sh("t", "exit 4"))  # the same fence spawns and reports again
        assert (await node.exited("t")).exit_code == 4 and fence_pid(tmp_path) == fence
    finally:
        await runner.stop()


async def test_a_fence_that_does_not_answer_is_replaced_and_its_attempts_still_fenced(tmp_path, monkeypatch):
    monkeypatch.setattr(fence_link, "REQUEST_TIMEOUT_S", 1.0)
    lease = AttemptLease(tmp_path)
    lease.renew(3600.0)
    node = Node(tmp_path)
    runner = await node.runner(lease_path=lease.path)
    runner.launch(RunSpec("t", 1, 1, shell="echo ready; sleep 60"))
    await node.output_has("t", "ready")
    [att] = await spawned(runner)
    await runner.stop()  # the agent restarts...
    old = fence_pid(tmp_path)
    # ...and finds its fence hung: stopped, and (as if stopped for good) not resumable.
    monkeypatch.setattr(FenceKeeper, "resume_if_stopped", lambda self: False)
    async with sigstopped(old):
        runner = await node.runner(lease_path=lease.path)  # did not start: "did not answer"
    try:
        assert gone(old) and fence_pid(tmp_path) not in (0, old)  # a new fence holds the orphan
        assert not gone(att.pid) and [t.pid for t in runner.running()] == [att.pid]
        lease.renew(0.0)
        ev = await node.exited("t")
        assert ev.reason == FENCED and gone(att.pid)
    finally:
        await runner.stop()


async def test_a_whole_machine_paused_past_the_lease_has_its_attempts_fenced_on_resume(tmp_path):
    """Everything stops (fence and attempt; the agent is gone) and resumes after the lease
    ran out: the fence, checking its lease first thing, kills the attempt."""
    lease = AttemptLease(tmp_path)
    lease.renew(3600.0)
    node = Node(tmp_path)
    runner = await node.runner(lease_path=lease.path)
    runner.launch(RunSpec("t", 1, 1, shell="while :; do sleep 0.05; done"))
    [att] = await spawned(runner)
    await runner.stop()
    fence = fence_pid(tmp_path)
    async with sigstopped(att.pid, fence):  # the attempt resumes first: the worst case
        lease.renew(0.5)
        await wait_until(lambda: lease.remaining_s() < 0, "the lease to run out while all is stopped")
        assert not (tmp_path / "tasks/t/1/fenced").exists()
    await wait_until(lambda: gone(att.pid), "the resumed fence to kill the attempt")
    assert (tmp_path / "tasks/t/1/fenced").exists()
