"""TorchLauncher against real processes: tiny python workers (most without torch), and one
real gloo job whose rank 0 blocks in all_reduce while rank 1 fails. Outcomes are asserted,
never durations; every wait is bounded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from lepton.workloads.torch_env import python_argv
from lepton.workloads.torch_launcher import (
    FAILED_TO_START_CODE,
    MAX_LINE_BYTES,
    NodeLaunch,
    TorchLauncher,
    run_node,
)

WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec(tmp: Path, code: str, *, nproc: int = 2, **over) -> NodeLaunch:
    script = tmp / "worker.py"
    script.write_text(textwrap.dedent(code))
    args = dict(job_id="job-1", argv=tuple(python_argv(str(script), env={})), nproc_per_node=nproc,
                node_rank=0, nnodes=1, master_addr="127.0.0.1", master_port=free_port(),
                log_dir=tmp / "logs", grace_s=5.0)
    args.update(over)
    return NodeLaunch(**args)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def bounded(coro, timeout: float = WAIT_S):
    return await asyncio.wait_for(coro, timeout)


async def test_success_logs_prefixed_per_rank(tmp_path):
    s = spec(tmp_path, """
        import os, sys
        print("hello from", os.environ["RANK"], "of", os.environ["WORLD_SIZE"])
        print("to stderr", file=sys.stderr)
        sys.stdout.write("x" * 70000 + "\\n")
        sys.stdout.write("no newline at the end")
    """, node_rank=1, nnodes=2)
    result = await bounded(run_node(s))
    assert result.ok and result.reason == "succeeded"
    assert [(e.rank, e.local_rank, e.exit_code) for e in result.exits] == [(2, 0, 0), (3, 1, 0)]
    for rank in (2, 3):
        lines = (tmp_path / "logs" / f"rank_{rank}.log").read_bytes().split(b"\n")
        prefix = f"[rank {rank}] ".encode()
        assert lines[-1] == b""
        assert all(line.startswith(prefix) for line in lines[:-1])
        assert lines[0] == prefix + f"hello from {rank} of 4".encode()
        assert prefix + b"to stderr" in lines
        assert lines[-2] == prefix + b"no newline at the end"
        long = [line for line in lines if line.startswith(prefix + b"x")]
        assert [len(line) - len(prefix) for line in long] == [MAX_LINE_BYTES, 70000 - MAX_LINE_BYTES]


async def test_first_failure_tears_down_the_others(tmp_path):
    s = spec(tmp_path, """
        import json, os, sys, time
        if os.environ["LOCAL_RANK"] == "1":
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": {"message": "ValueError: boom", "extraInfo": {}}}, f)
            sys.exit(3)
        time.sleep(300)
    """)
    result = await bounded(run_node(s))
    assert not result.ok
    assert (result.failed_rank, result.failed_local_rank, result.failed_code) == (1, 1, 3)
    assert result.reason == "rank 1 exited with code 3"
    assert result.error_message == "ValueError: boom"
    assert {e.rank: e.exit_code for e in result.exits} == {0: -signal.SIGTERM, 1: 3}


async def test_sigkill_after_grace_for_a_worker_ignoring_sigterm(tmp_path):
    s = spec(tmp_path, """
        import os, signal, sys, time
        if os.environ["LOCAL_RANK"] == "0":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open(os.environ["MARK"], "w").close()
            time.sleep(300)
        while not os.path.exists(os.environ["MARK"]):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGSEGV)
    """, grace_s=0.5, env={"MARK": str(tmp_path / "ignoring")})
    result = await bounded(run_node(s))
    assert result.reason == f"rank 1 killed by signal {signal.SIGSEGV} (SIGSEGV)"
    assert {e.rank: e.exit_code for e in result.exits} == {0: -signal.SIGKILL, 1: -signal.SIGSEGV}


async def test_a_native_abort_is_named_and_explained_in_the_rank_log(tmp_path):
    # What a C++ thread left running into interpreter exit does: std::terminate, SIGABRT.
    s = spec(tmp_path, """
        import ctypes, os, time
        if os.environ["LOCAL_RANK"] == "1":
            ctypes.CDLL("libstdc++.so.6")._ZSt9terminatev()
        time.sleep(300)
    """)
    result = await bounded(run_node(s))
    assert (result.failed_rank, result.failed_code) == (1, -signal.SIGABRT)
    assert result.reason == f"rank 1 killed by signal {signal.SIGABRT} (SIGABRT)"
    log = (tmp_path / "logs" / "rank_1.log").read_text()
    # libstdc++'s message, then faulthandler's Python stack (PYTHONFAULTHANDLER), both on stderr.
    assert "[rank 1] terminate called without an active exception" in log, log
    assert "[rank 1] Fatal Python error: Aborted" in log, log
    assert 'worker.py", line 4 in <module>' in log, log


async def test_stop_from_outside(tmp_path):
    s = spec(tmp_path, """
        import os, time
        open(os.environ["MARK"] + os.environ["RANK"], "w").close()
        time.sleep(300)
    """, env={"MARK": str(tmp_path / "up")})
    launcher = TorchLauncher(s)
    await launcher.start()
    deadline = time.monotonic() + WAIT_S
    while not all((tmp_path / f"up{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    launcher.stop("job cancelled", grace_s=2)
    launcher.stop("second reason is ignored")
    result = await bounded(launcher.wait())
    assert not result.ok and result.reason == "job cancelled" and result.failed_rank is None
    assert [e.exit_code for e in result.exits] == [-signal.SIGTERM, -signal.SIGTERM]
    assert await launcher.wait() is result


async def test_stop_before_start_starts_nothing(tmp_path):
    launcher = TorchLauncher(spec(tmp_path, "import time; time.sleep(300)"))
    launcher.stop("cancelled before start")
    await launcher.start()
    assert launcher.pids == {}
    result = await bounded(launcher.wait())
    assert not result.ok and result.reason == "cancelled before start" and result.exits == ()


async def test_one_worker_done_others_keep_running(tmp_path):
    s = spec(tmp_path, """
        import os, time
        if os.environ["RANK"] == "1":
            time.sleep(0.5)
    """)
    result = await bounded(run_node(s))
    assert result.ok and [e.exit_code for e in result.exits] == [0, 0]


async def test_leftovers_in_a_workers_group_are_killed(tmp_path):
    s = spec(tmp_path, """
        import os, subprocess
        child = subprocess.Popen(["sleep", "300"])
        with open(os.environ["MARK"] + os.environ["RANK"], "w") as f:
            f.write(str(child.pid))
    """, env={"MARK": str(tmp_path / "child")})
    result = await bounded(run_node(s))
    assert result.ok
    pids = [int((tmp_path / f"child{r}").read_text()) for r in (0, 1)]
    deadline = time.monotonic() + WAIT_S
    while not all(gone(p) for p in pids):
        assert time.monotonic() < deadline, "background children survived their worker"
        await asyncio.sleep(0.05)


async def test_failed_start_is_a_result(tmp_path):
    s = spec(tmp_path, "", argv=(str(tmp_path / "no-such-program"),))
    result = await bounded(run_node(s))
    assert not result.ok and result.failed_code == FAILED_TO_START_CODE
    assert result.reason.startswith("failed to start:")


async def test_cancelling_wait_kills_the_workers(tmp_path):
    s = spec(tmp_path, "import time; time.sleep(300)")
    launcher = TorchLauncher(s)
    await launcher.start()
    pids = list(launcher.pids.values())
    task = asyncio.create_task(launcher.wait())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await bounded(task)
    assert all(gone(p) for p in pids)


def test_bad_specs_raise(tmp_path):
    with pytest.raises(ValueError):
        spec(tmp_path, "", argv=()).validate()
    with pytest.raises(ValueError):
        TorchLauncher(spec(tmp_path, "", node_rank=1, nnodes=1))
    with pytest.raises(ValueError):
        TorchLauncher(spec(tmp_path, "", shards=(("a",),)))  # 1 list for 2 local ranks
    with pytest.raises(ValueError):
        TorchLauncher(spec(tmp_path, "", grace_s=-1))
    with pytest.raises(ValueError):
        TorchLauncher(spec(tmp_path, "", log_max_bytes=-1))


async def test_stale_error_file_is_removed_and_shards_per_rank(tmp_path):
    s = spec(tmp_path, """
        import json, os
        with open(os.environ["OUT"] + os.environ["RANK"], "w") as f:
            json.dump({k: os.environ[k] for k in ("LEPTON_SHARDS", "LEPTON_JOB_ID", "LEPTON_CHECKPOINT_DIR")}, f)
    """, shards=(("/d/a.npz", "/d/b.npz"), ("/d/c.npz",)), checkpoint_dir="/ck", env={"OUT": str(tmp_path / "o")})
    (tmp_path / "logs").mkdir()
    stale = s.error_path(1)
    stale.write_text('{"message": "old"}')
    result = await bounded(run_node(s))
    assert result.ok and not stale.exists()
    seen = [json.loads((tmp_path / f"o{r}").read_text()) for r in (0, 1)]
    assert seen == [
        {"LEPTON_SHARDS": "/d/a.npz,/d/b.npz", "LEPTON_JOB_ID": "job-1", "LEPTON_CHECKPOINT_DIR": "/ck"},
        {"LEPTON_SHARDS": "/d/c.npz", "LEPTON_JOB_ID": "job-1", "LEPTON_CHECKPOINT_DIR": "/ck"},
    ]


# Rank 1 fails once rank 0 waits in all_reduce (collective timeout 600 s).
# On one host gloo would see rank 1's sockets close and fail rank 0 by itself within a second;
# a detached child of rank 1 keeps those sockets open (as a hung peer or a partition would),
# so only the launcher's teardown can end rank 0.
GLOO_FAILURE = """
import datetime, os, sys, time
import torch, torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

@record
def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    if dist.get_rank() == 0:
        print("rank 0 enters all_reduce", flush=True)
        open(os.environ["ENTERED"], "w").close()
        dist.all_reduce(torch.ones(1))
        print("rank 0 left all_reduce", flush=True)
        return
    while not os.path.exists(os.environ["ENTERED"]):
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # holds the gloo sockets, outside the worker's process group
        os.setsid()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # but not the output pipe: the launcher would wait for its EOF
        os.dup2(null, 2)
        time.sleep(600)
        os._exit(0)
    with open(os.environ["HOLDER"], "w") as f:
        f.write(str(pid))
    raise RuntimeError("rank 1 fails on purpose")

main()
"""


async def test_gloo_failure_tears_down_rank_blocked_in_collective(tmp_path):
    holder_file = tmp_path / "holder.pid"
    s = spec(tmp_path, GLOO_FAILURE, grace_s=5.0, env={
        "HOLDER": str(holder_file), "ENTERED": str(tmp_path / "entered"), "OMP_NUM_THREADS": "1"})
    try:
        result = await bounded(run_node(s), timeout=120)  # far below the 600 s collective timeout
        assert (result.failed_rank, result.failed_code) == (1, 1), result
        assert "rank 1 fails on purpose" in result.error_message
        # Rank 0 did not fail by itself: the teardown's SIGTERM ended it, inside all_reduce.
        assert {e.rank: e.exit_code for e in result.exits} == {0: -signal.SIGTERM, 1: 1}
        log0 = (tmp_path / "logs" / "rank_0.log").read_text()
        assert "rank 0 enters all_reduce" in log0 and "left all_reduce" not in log0
    finally:
        if holder_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(holder_file.read_text()), signal.SIGKILL)
