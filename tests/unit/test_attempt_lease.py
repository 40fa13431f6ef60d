"""Self-fencing attempts: the node's attempt fence (fence.py) kills the process group of
each attempt once the node's lease runs out, with no agent involved (the agent may be dead
or hung); keep_on_disconnect opts out. A fence killed itself is replaced, and the new one
fences its orphans."""

from __future__ import annotations

import asyncio

import pytest

from lepton.agent.tasks.lease import AttemptLease, supported
from lepton.agent.tasks.runner import RunSpec, TaskEventKind
from lepton.agent.tasks.task_spec import FENCED
from lepton.common.errors import InvalidArgument
from tests.unit.test_runner import Node, gone, kill_fence, spawned, wait_until

pytestmark = pytest.mark.skipif(not supported(), reason="needs /proc/uptime and CLOCK_BOOTTIME")


async def test_an_attempt_kills_itself_when_the_lease_runs_out_and_keep_opts_out(tmp_path):
    lease = AttemptLease(tmp_path)
    lease.renew(2.0)
    assert 0 < lease.remaining_s() <= 2.0
    node = Node(tmp_path)
    runner = await node.runner(lease_path=lease.path)
    lease.renew(4.0)  # as the leader's answer that carries the assignment does
    try:
        runner.launch(RunSpec("fenced", 1, 1, shell="sleep 60 & sleep 60"))
        runner.launch(RunSpec("kept", 1, 1, shell="sleep 60", keep_on_disconnect=True))
        pids = {r.task_id: r.pid for r in await spawned(runner, 2)}
        # Renewals keep it alive (the agent hears from the leader), past several fence checks,
        # with room for a loaded machine's late wake-ups...
        for _ in range(3):
            await asyncio.sleep(1.0)
            lease.renew(4.0)
        assert not node.of("fenced", kind=TaskEventKind.EXITED)
        # ...then the agent stops renewing (killed, hung, cut off): the fence kills the group.
        ev = await node.exited("fenced")
        assert ev.reason == FENCED and ev.exit_code == -9
        assert gone(pids["fenced"])
        assert "lepton: fenced" in node.log("fenced")
        assert lease.remaining_s() <= 0  # the fence fires at expiry itself (uptime >= exp)
        assert not gone(pids["kept"]) and not node.of("kept", kind=TaskEventKind.EXITED)
    finally:
        runner.cancel("kept", 1, grace_s=0)
        await node.exited("kept")
        await runner.stop()


async def test_the_fence_needs_no_agent(tmp_path):
    """The runner stops watching (as in kill -9 of the agent): the attempt still dies."""
    lease = AttemptLease(tmp_path)
    lease.renew(1.0)
    node = Node(tmp_path)
    runner = await node.runner(lease_path=lease.path)
    runner.launch(RunSpec("orphan", 1, 1, shell="sleep 60"))
    [att] = await spawned(runner)
    pid = att.pid
    await runner.stop()  # nobody watches or signals it from here on
    await wait_until(lambda: gone(pid), "the orphan to kill itself")
    assert (tmp_path / "tasks" / "orphan" / "1" / "fenced").exists()
    # A later runner reports how it ended: fenced, for requeue.
    runner = await node.runner(lease_path=lease.path)
    try:
        ev = await node.exited("orphan")
        assert ev.reason == FENCED
    finally:
        await runner.stop()


async def test_no_lease_file_means_no_fencing_and_bad_specs_are_refused(tmp_path):
    node = Node(tmp_path)
    runner = await node.runner()
    try:
        runner.launch(RunSpec("plain", 1, 1, shell="sleep 2; echo done"))
        ev = await node.exited("plain")
        assert ev.exit_code == 0 and "done" in node.log("plain")
        assert not (tmp_path / "tasks" / "plain" / "1" / "fenced").exists()
    finally:
        await runner.stop()
    with pytest.raises(InvalidArgument):
        RunSpec("bad", 1, 1, shell="true", keep_on_disconnect="yes").validate()


async def test_a_killed_fence_is_replaced_and_its_orphans_are_still_fenced(tmp_path):
    lease = AttemptLease(tmp_path)
    node = Node(tmp_path)
    runner = await node.runner(lease_path=lease.path)
    lease.renew(3600.0)
    try:
        runner.launch(RunSpec("orphan", 1, 1, shell="echo ready; sleep 60"))
        await node.output_has("orphan", "ready")
        [att] = await spawned(runner)
        pid = att.pid
        old = await kill_fence(tmp_path)
        # The runner starts another fence and hands it the orphan.
        await wait_until(lambda: runner._fence.link.up and int((tmp_path / "task-fence.lock").read_text()) != old,
                         "a new fence")
        await wait_until(lambda: not runner._live[("orphan", 1)].held, "the orphan handed over")
        assert not gone(pid)
        lease.renew(0.0)  # the lease runs out: the new fence kills it
        ev = await node.exited("orphan")
        assert ev.reason == FENCED and gone(pid)
        assert "lepton: fenced" in node.log("orphan")
    finally:
        await runner.stop()


def test_the_spec_option_reaches_the_runner_and_a_fenced_exit_asks_for_a_requeue():
    from lepton.agent.assignments import run_spec, to_proto
    from lepton.agent.tasks.runner import TaskEvent
    from lepton.v1 import tasks_pb2

    def assignment(on_disconnect: int) -> tasks_pb2.Assignment:
        return tasks_pb2.Assignment(task_id="t1", attempt=1, term=1, spec=tasks_pb2.TaskSpec(
            argv=["true"], on_disconnect=on_disconnect))

    assert run_spec(assignment(tasks_pb2.ON_DISCONNECT_KEEP)).keep_on_disconnect
    assert not run_spec(assignment(tasks_pb2.ON_DISCONNECT_STOP)).keep_on_disconnect
    fenced = TaskEvent("t1", 1, 1, TaskEventKind.EXITED, exit_code=-9, reason=FENCED)
    assert to_proto(fenced).requeue
    killed = TaskEvent("t1", 1, 1, TaskEventKind.EXITED, exit_code=-9, reason="killed by signal 9")
    assert not to_proto(killed).requeue


def test_renewals_that_barely_move_the_expiry_skip_the_write_and_never_make_it_later(tmp_path, monkeypatch):
    from lepton.agent.tasks import lease as lease_mod

    clock = [1000]
    monkeypatch.setattr(lease_mod, "now_cs", lambda: clock[0])
    lease = AttemptLease(tmp_path)

    def written() -> int:
        return int(lease.path.read_text())

    lease.renew(10.0)
    assert written() == 2000
    clock[0] = 1010  # a busy leader's next answer, 0.1 s later: no write
    lease.renew(10.0)
    assert written() == 2000  # a little earlier than it could say: the fence can only kill sooner
    clock[0] = 1060
    lease.renew(10.0)
    assert written() == 2060
    lease.renew(0.0)  # a shorter lease is always written
    assert written() == 1060


def test_background_renewals_extend_off_the_callers_thread_and_shortenings_win(tmp_path, monkeypatch):
    """The agent's lease writes its extensions from a thread (the rename can wait ~20 ms on
    the journal, which stalled the event loop); the first write and a shortening are made
    in the caller, and an older extension never lands after a shortening."""
    import threading
    import time

    from lepton.agent.tasks import lease as lease_mod

    clock = [1000]
    monkeypatch.setattr(lease_mod, "now_cs", lambda: clock[0])
    writers: list[tuple[str, bytes]] = []
    real_write = lease_mod.write_atomic

    def recording_write(path, data, **kw):
        writers.append((threading.current_thread().name, data))
        real_write(path, data, **kw)

    monkeypatch.setattr(lease_mod, "write_atomic", recording_write)
    lease = AttemptLease(tmp_path, background=True)

    def wait_written(value: int) -> None:
        deadline = time.monotonic() + 30
        while int(lease.path.read_text()) != value:
            assert time.monotonic() < deadline, f"the lease file never said {value}"
            time.sleep(0.005)

    lease.renew(10.0)
    assert writers[-1] == (threading.current_thread().name, b"2000\n")  # the first write: at once
    clock[0] = 1100
    lease.renew(10.0)
    wait_written(2100)
    assert writers[-1][0] == "attempt-lease"
    lease.renew(0.0)  # shorter: written in the caller, at once
    assert writers[-1] == (threading.current_thread().name, b"1100\n")
    assert int(lease.path.read_text()) == 1100
