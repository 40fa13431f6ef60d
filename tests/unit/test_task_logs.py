"""Output caps and retention (agent/tasks/task_logs.py) on a real TaskRunner and real children.
Children pace themselves on what the runner does (a rotation, a reader's ack file), so
nothing here depends on timing; waits are bounded polls."""

from __future__ import annotations

import errno
import os
import sys
import time

import pytest

from lepton.agent.tasks import task_logs
from lepton.agent.tasks.runner import Chunk, RunSpec, TaskRunner
from tests.unit.test_runner import WAIT_S, Node, sh, wait_until

CAP = 4096
BLOCK = 8192  # what the child writes at once: past the cap, so each block makes a rotation
BLOCKS = 12
LINE = 64

# Writes BLOCKS blocks of numbered 64-byte lines; after each, waits until the runner has
# rotated output.log (its size drops below a block), and, when told to, until the reader
# has acked the block (ack.N) or until `go` exists (before block 1).
WRITER = f"""
import os, sys, time
wait_acks, wait_go = sys.argv[1] == "1", sys.argv[2] == "1"
def wait(pred):
    deadline = time.monotonic() + {WAIT_S}
    while not pred():
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.005)
for b in range({BLOCKS}):
    if b == 1 and wait_go:
        wait(lambda: os.path.exists("go"))
    os.write(1, b"".join(f"block {{b:03d}} line {{i:03d}} ".ljust({LINE} - 1, ".").encode() + b"\\n"
                         for i in range({BLOCK // LINE})))
    wait(lambda: os.stat("output.log").st_size < {BLOCK})
    if wait_acks:
        wait(lambda: os.path.exists(f"ack.{{b}}"))
"""
EXPECTED = b"".join(f"block {b:03d} line {i:03d} ".ljust(LINE - 1, ".").encode() + b"\n"
                    for b in range(BLOCKS) for i in range(BLOCK // LINE))


@pytest.fixture(params=["collapse", "copy-truncate"])
def mode(request, monkeypatch):
    if request.param == "copy-truncate":  # as on a filesystem without FALLOC_FL_COLLAPSE_RANGE
        monkeypatch.setattr(task_logs, "_collapse_head", lambda path, n: OSError(errno.EOPNOTSUPP, "no"))
    return request.param


@pytest.fixture
async def node(tmp_path):
    n = Node(tmp_path)
    yield n
    for r in n.runners:
        for t in r.running():
            r.cancel(t.task_id, t.attempt, grace_s=0)
        await wait_until(lambda r=r: not r.running(), "left-over tasks to be killed")
        await r.stop()


def writer(task_id: str, *, acks: bool = False, go: bool = False) -> RunSpec:
    return RunSpec(task_id=task_id, attempt=1, term=1,
                   argv=(sys.executable, "-c", WRITER, "1" if acks else "0", "1" if go else "0"))


def check_offsets(chunks: list[Chunk], start: int = 0) -> int:
    """Data chunks follow each other exactly; a note moves the offset forward. Returns the end."""
    pos = start
    for c in chunks:
        assert c.offset >= pos, f"offset went back from {pos} to {c.offset}"
        if not c.note:
            assert c.offset == pos, f"a data chunk at {c.offset}, expected {pos}"
        pos = c.offset if c.note else c.offset + len(c.data)
    return pos


async def test_output_is_capped_rotated_and_read_back(node, mode):
    r = await node.runner(log_max_bytes=CAP, log_check_s=0.01)
    r.launch(writer("t"))
    ev = await node.exited("t")
    assert ev.exit_code == 0, "the task waited in vain for a rotation"
    att = node.data_dir / "tasks/t/1"
    # On disk: about one block in each file, never the whole output.
    assert (att / "output.log").stat().st_size < BLOCK
    assert 0 < (att / "output.log.1").stat().st_size <= BLOCK + CAP
    assert not (att / "output.log.1.tmp").exists()
    rot = task_logs.load_rotation(att)
    assert rot.rotations >= BLOCKS - 1
    assert (att / "output.log.1").read_bytes() + (att / "output.log").read_bytes() == EXPECTED[rot.prev_base:]

    # A read from 0: one note, then output.log.1 and output.log: the exact tail of the output.
    chunks = [c async for c in r.output("t", 1, follow=False)]
    assert chunks[0].note and not any(c.note for c in chunks[1:])
    assert chunks[0].data == f"[lepton: output rotated: {rot.prev_base} earlier bytes dropped]\n".encode()
    assert check_offsets(chunks) == len(EXPECTED)
    data = b"".join(c.data for c in chunks[1:])
    assert data == EXPECTED[chunks[0].offset:] and data.endswith(EXPECTED[-LINE:])
    # Resuming at any offset is exact, in output.log.1 or output.log alike.
    for at in (rot.prev_base + 100, rot.base + 10, len(EXPECTED)):
        assert b"".join([c.data async for c in r.output("t", 1, offset=at, follow=False)]) == EXPECTED[at:]
    # `follow` (bytes) carries the note too; a new runner (an agent restart) reads the same.
    assert b"".join([c async for c in r.follow("t", 1)]) == chunks[0].data + data
    await r.stop()
    r2 = await node.runner()
    assert [c async for c in r2.output("t", 1, follow=False)] == chunks


async def test_a_follower_that_keeps_up_loses_nothing(node, mode):
    r = await node.runner(log_max_bytes=CAP, log_check_s=0.01)
    r.launch(writer("t", acks=True))
    att = node.data_dir / "tasks/t/1"
    chunks: list[Chunk] = []
    got = 0
    async for c in r.output("t", 1):
        chunks.append(c)
        got += 0 if c.note else len(c.data)
        for b in range(got // BLOCK):
            (att / f"ack.{b}").touch()  # the writer goes on only once the block was read
    assert (await node.exited("t")).exit_code == 0
    assert not any(c.note for c in chunks)
    assert check_offsets(chunks) == len(EXPECTED)
    assert b"".join(c.data for c in chunks) == EXPECTED
    assert task_logs.load_rotation(att).rotations >= BLOCKS - 1


async def test_a_follower_left_behind_gets_a_note_and_goes_on(node, mode):
    r = await node.runner(log_max_bytes=CAP, log_check_s=0.01)
    r.launch(writer("t", go=True))
    att = node.data_dir / "tasks/t/1"
    stream = r.output("t", 1)
    first = await anext(stream)  # part of block 0; then the follower stops reading a while
    assert not first.note and EXPECTED.startswith(first.data)
    (att / "go").touch()
    assert (await node.exited("t")).exit_code == 0
    rest = [c async for c in stream]
    notes = [c for c in rest if c.note]
    assert len(notes) == 1 and b"earlier bytes dropped" in notes[0].data
    assert notes[0].data.startswith(b"[lepton: ") or notes[0].data.startswith(b"\n[lepton: ")
    assert check_offsets([first, *rest]) == len(EXPECTED)
    after = b"".join(c.data for c in rest[rest.index(notes[0]) + 1:])
    assert after == EXPECTED[notes[0].offset:] and after.endswith(EXPECTED[-LINE:])


async def test_no_cap_means_no_rotation(node):
    r = await node.runner(log_check_s=0.01)
    r.launch(RunSpec(task_id="t", attempt=1, term=1,
                     argv=(sys.executable, "-c", "import sys; sys.stdout.write('x' * 100000)")))
    await node.exited("t")
    assert (node.data_dir / "tasks/t/1/output.log").stat().st_size == 100000
    assert not (node.data_dir / "tasks/t/1/output.log.1").exists()


async def test_a_truncation_by_someone_else_is_skipped_with_a_note(node):
    r = await node.runner(log_check_s=0.01)
    r.launch(sh("t", "echo before; while [ ! -f go ]; do sleep 0.01; done; echo after"))
    att = node.data_dir / "tasks/t/1"
    stream = r.output("t", 1)
    assert (await anext(stream)).data == b"before\n"
    await wait_until(lambda: r._outputs._sizes.get(att) == 7, "the watcher to see the output")
    os.truncate(att / "output.log", 0)  # e.g. logrotate's copytruncate
    await wait_until(lambda: task_logs.load_rotation(att).base == 7, "the watcher to notice")
    (att / "go").touch()
    # The follower, at 7, goes on with the new output (it would wait for byte 7 otherwise)...
    assert [c async for c in stream] == [Chunk(7, b"after\n")]
    # ...and a reader from 0 learns that something is missing.
    assert [c async for c in r.output("t", 1, follow=False)] == [
        Chunk(7, b"[lepton: output truncated: 7 earlier bytes dropped]\n", note=True), Chunk(7, b"after\n")]


class Clock:
    """The runner's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_retention_deletes_only_reported_unwanted_old_attempts(node, caplog):
    clock = Clock()
    r = await node.runner(retention_s=3600, sweep_s=3600, clock=clock)
    tasks = node.data_dir / "tasks"
    quick = {name: sh(name, f"echo {name}") for name in ("old", "wanted", "unreported", "recent")}
    running = sh("running", "echo ready; sleep 1000")
    r.reconcile([quick["old"], quick["wanted"], quick["unreported"], running], term=1)
    for name in ("old", "wanted", "unreported"):
        await node.exited(name)
    await node.output_has("running", "ready")
    assert await r.sweep() == 0  # all still in the desired set

    r.reconcile([quick["wanted"], running], term=1)
    (tasks / "unreported/1/reported.json").unlink()  # as if the agent died before marking it
    assert await r.sweep() == 0  # old's reported exit is first seen now
    clock.t += 7200
    r.reconcile([quick["wanted"], running, quick["recent"]], term=1)
    await node.exited("recent")
    r.reconcile([quick["wanted"], running], term=1)
    (tasks / "old/.7.deleting/x").mkdir(parents=True)  # a sweep cut short
    caplog.set_level("INFO", logger="lepton.agent.tasks.retention")
    assert await r.sweep() == 1
    assert not (tasks / "old").exists()  # the attempt, the leftover and the empty task folder
    for name in ("wanted", "unreported", "recent", "running"):
        assert (tasks / name / "1").is_dir(), name
    assert [m for m in caplog.messages if m.startswith("retention: deleted 1 ")]
    assert r.reconcile([], term=1).startswith("started 0, stopped 1")  # "running" ends
    await node.exited("running")


async def test_a_wall_clock_jump_deletes_no_attempt_early(node, monkeypatch):
    r = await node.runner(retention_s=3600, sweep_s=3600)  # the real clocks
    r.launch(sh("t", "true"))
    await node.exited("t")
    r.reconcile([], term=1)
    assert await r.sweep() == 0
    day_ahead = time.time() + 24 * 3600
    monkeypatch.setattr(time, "time", lambda: day_ahead)  # the wall clock moved forward a day
    assert await r.sweep() == 0 and (node.data_dir / "tasks/t/1").is_dir()


async def test_retention_waits_for_a_desired_set_and_sweeps_periodically(node):
    clock = Clock()
    r = await node.runner(retention_s=3600, sweep_s=3600, clock=clock)
    r.launch(sh("t", "true"))
    await node.exited("t")
    assert await r.sweep() == 0  # no desired set yet
    await r.stop()
    # A restarted runner does not know yet what the coordinator still wants: it keeps all.
    # What it finds then counts from its own first look: a restart delays, never hastens.
    r2 = await node.runner(retention_s=3600, sweep_s=0.05, clock=clock)
    assert await r2.sweep() == 0
    r2.reconcile([], term=1)
    assert await r2.sweep() == 0
    clock.t += 7200
    await wait_until(lambda: not (node.data_dir / "tasks/t").exists(), "the periodic sweep", WAIT_S)
    await r2.stop()
    r3 = await node.runner(sweep_s=0.05, clock=clock)  # retention 0: keeps forever
    r3.launch(sh("u", "true"))
    await node.exited("u")
    r3.reconcile([], term=1)
    clock.t += 10**6
    assert await r3.sweep() == 0 and (node.data_dir / "tasks/u/1").is_dir()


def test_bad_runner_settings_are_refused(tmp_path):
    from lepton.common.errors import InvalidArgument

    for kw in ({"log_max_bytes": -1}, {"retention_s": float("inf")}, {"sweep_s": float("nan")}):
        with pytest.raises(InvalidArgument):
            TaskRunner(tmp_path, lambda e: None, **kw)


def test_job_of_reads_member_ids():
    assert task_logs.job_of("train-0") == "train"
    assert task_logs.job_of("a-1-12") == "a-1"  # job "a-1", rank 12
    for not_a_member in ("train", "train-", "-0", "train-x", "train-0a"):
        assert task_logs.job_of(not_a_member) == "", not_a_member


async def test_retention_deletes_only_finished_old_job_folders(node, caplog):
    clock = Clock()
    r = await node.runner(retention_s=3600, sweep_s=3600, clock=clock)
    tasks, jobs = node.data_dir / "tasks", node.data_dir / "jobs"
    quick = {t: sh(t, "true") for t in ("old-0", "old-1", "wanted-0", "recent-0", "unreported-0",
                                        "half-0", "half-1")}
    running = sh("running-0", "echo ready; sleep 1000")
    early = [spec for t, spec in quick.items() if t != "recent-0"]
    r.reconcile([*early, running], term=1)
    for t in quick:
        if t != "recent-0":
            await node.exited(t)
    await node.output_has("running-0", "ready")

    def job_folder(job: str) -> None:
        logs = jobs / job / "restart-0" / "node-0"
        logs.mkdir(parents=True)
        (logs / "rank_0.log").write_bytes(b"[rank 0] hi\n")
        (jobs / job / "checkpoints").mkdir()

    for job in ("old", "wanted", "recent", "unreported", "half", "running", "orphan"):
        job_folder(job)
    (jobs / ".cut.deleting/restart-0").mkdir(parents=True)  # a sweep cut short

    caplog.set_level("INFO", logger="lepton.agent.tasks.retention")
    await r.sweep()  # all members still in the desired set; the rest is first seen now
    assert not (jobs / ".cut.deleting").exists()
    assert sorted(p.name for p in jobs.iterdir()) == ["half", "old", "orphan", "recent", "running",
                                                      "unreported", "wanted"]
    r.reconcile([quick["wanted-0"], running], term=1)
    (tasks / "unreported-0/1/reported.json").unlink()  # as if the agent died before marking it
    (tasks / "half-1/1/reported.json").unlink()
    await r.sweep()
    assert len(list(jobs.iterdir())) == 7  # nothing is old yet

    clock.t += 7200
    job_folder("fresh")  # made just now, with no member attempt (yet) here
    r.reconcile([quick["wanted-0"], running, quick["recent-0"]], term=1)
    await node.exited("recent-0")
    r.reconcile([quick["wanted-0"], running], term=1)
    await r.sweep()
    # Every member of "old" reported over an hour ago, none wanted or running: gone, whole;
    # and "orphan", which has no member here at all. "recent" has a member reported just now.
    assert sorted(p.name for p in jobs.iterdir()) == ["fresh", "half", "recent", "running",
                                                      "unreported", "wanted"]
    assert [m for m in caplog.messages if m.startswith("retention: deleted 2 finished job folder")]
    # A later sweep deletes no more: the old attempts went too, the rest stays.
    await r.sweep()
    assert sorted(p.name for p in jobs.iterdir()) == ["fresh", "half", "recent", "running",
                                                      "unreported", "wanted"]
    assert r.reconcile([], term=1).startswith("started 0, stopped 1")
    await node.exited("running-0")


async def test_a_member_launched_during_the_job_sweep_keeps_the_folder(tmp_path):
    jobs, tasks = tmp_path / "jobs", tmp_path / "tasks"
    (jobs / "j" / "restart-0").mkdir(parents=True)
    tasks.mkdir()
    clock = Clock()
    ages = task_logs.FirstSeen(clock)
    assert task_logs.finished_jobs(jobs, tasks, 3600, set(), ages) == []  # first seen now
    clock.t += 7200
    asked: list[int] = []

    def keep():  # the thread's view: nothing; the loop's, a moment later: j-0 attempt 2 runs
        asked.append(1)
        return set() if len(asked) == 1 else {("j-0", 2)}

    assert await task_logs.sweep_jobs(jobs, tasks, 3600, keep, ages) == (0, 0)
    assert (jobs / "j" / "restart-0").is_dir() and len(asked) == 2
    deleted, freed = await task_logs.sweep_jobs(jobs, tasks, 3600, set, ages)
    assert deleted == 1 and not (jobs / "j").exists() and list(jobs.iterdir()) == []
    assert await task_logs.sweep_jobs(tmp_path / "none", tasks, 3600, set, ages) == (0, 0)


def test_job_of_maps_member_task_ids_to_their_job():
    from lepton.common.job_ids import member_id

    assert member_id("j-abc123", 1) == "t-abc123-1"
    assert task_logs.job_of(member_id("j-abc123", 1)) == "j-abc123"
    assert task_logs.job_of("j-abc123-0") == "j-abc123"  # a member named before t- ids
    assert task_logs.job_of("t-123456789012") == ""  # a plain task whose hex is all digits
