"""Issue 3 end to end: scheduling and execution of tasks on real agents."""

from __future__ import annotations

import json
import os
import signal
import sys

import grpc
import psutil
import pytest

from lepton.client import Client
from lepton.common.errors import InvalidArgument
from lepton.v1 import coordinator_pb2, coordinator_pb2_grpc, tasks_pb2
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration


def state_of(c: Client, task_id: str) -> str:
    return c.get(task_id).state


def attempt_pid(agent, task_id: str, attempt: int) -> int:
    doc = json.loads((agent.data_dir / "tasks" / task_id / str(attempt) / "run.json").read_text())
    return int(doc["pid"])


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_higher_priority_runs_first(agents, tmp_path):
    node = agents("solo", "--cpus", "1")
    order = tmp_path / "order"
    gate = tmp_path / "gate"
    with Client(node.address) as c:
        blocker = c.submit(shell=f"while [ ! -e {gate} ]; do sleep 0.05; done", cpu=1, priority=100)
        wait_until(lambda: state_of(c, blocker.id) == "running", what="blocker running")
        low = c.submit(shell=f"echo low >> {order}", cpu=1, priority=1)
        high = c.submit(shell=f"echo high >> {order}", cpu=1, priority=5)
        assert c.get(low.id).state == "pending" and "waiting" in c.get(low.id).reason
        gate.touch()
        assert c.wait(high.id, timeout=30).state == "succeeded"
        assert c.wait(low.id, timeout=30).state == "succeeded"
    assert order.read_text().split() == ["high", "low"]


def test_preemption_evicts_lower_priority_and_requeues_it(agents, tmp_path):
    node = agents("solo", "--cpus", "1")
    with Client(node.address) as c:
        low = c.submit(["sleep", "60"], cpu=1, priority=0, grace=1)
        wait_until(lambda: state_of(c, low.id) == "running", what="low running")
        pid = attempt_pid(node, low.id, 1)
        high = c.submit(["sh", "-c", "echo urgent"], cpu=1, priority=10)
        assert c.wait(high.id, timeout=30).state == "succeeded"
        assert gone(pid), "the preempted attempt must be stopped"
        requeued = wait_until(lambda: (t := c.get(low.id)).attempt == 2 and t.state == "running" and t,
                              what="low requeued and running again")
        assert requeued.history[0].state == "preempted"
        assert requeued.failures == 0  # preemption is not a failure
        c.cancel(low.id)


@pytest.mark.parametrize("fault", ["kill9", "hang"])
def test_a_lost_nodes_attempt_fences_itself_before_its_replacement_starts(agents, tmp_path, fault):
    """kill -9 (or SIGSTOP: hung) of an agent whose task writes a token every 100 ms: the
    attempt kills itself when its lease runs out, before the leader requeues it (no failure
    counted); the replacement's first token comes after the old attempt's last one."""
    voter = agents("voter", "--labels", "pool=control")
    a = agents("worker-a", "--join", voter.address, "--labels", "pool=gpu")
    b = agents("worker-b", "--join", voter.address, "--labels", "pool=gpu")
    tokens = tmp_path / "tokens"
    with Client(voter.address) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 3, what="3 nodes")
        node_of = {n.id: n for n in c.nodes()}
        t = c.submit(shell=f'while :; do echo "$LEPTON_ATTEMPT $(date +%s.%N)" >> {tokens}; sleep 0.1; done',
                     constraints={"pool": "gpu"}, max_retries=0)
        first = wait_until(lambda: (x := c.get(t.id)).state == "running" and x, what="running")
        victim = a if node_of[first.node_id].name == "worker-a" else b
        survivor = b if victim is a else a
        old_pid = attempt_pid(victim, t.id, 1)
        wait_until(lambda: tokens.exists() and tokens.read_text().count("\n") > 3, what="tokens")
        if fault == "kill9":
            victim.kill9()
        else:
            os.kill(victim.proc.pid, signal.SIGSTOP)
        moved = wait_until(lambda: (x := c.get(t.id)).attempt == 2 and x.state == "running" and x,
                           timeout=60, what="the replacement on the other node")
        assert node_of[moved.node_id].name == survivor.name
        assert moved.failures == 0 and moved.node_losses == 1  # node loss is not a failure
        assert moved.history[0].reason.startswith("node_lost")
        assert gone(old_pid), "the old attempt outlived its lease"
        wait_until(lambda: any(line.startswith("2 ") for line in tokens.read_text().splitlines()),
                   what="the replacement's tokens")
        times: dict[str, list[float]] = {"1": [], "2": []}
        for line in tokens.read_text().splitlines():
            attempt, _, at = line.partition(" ")
            times[attempt].append(float(at))
        assert max(times["1"]) < min(times["2"]), "the two attempts overlapped"
        assert (victim.data_dir / "tasks" / t.id / "1" / "fenced").exists()
        if fault == "kill9":
            victim.start()  # it reports the fenced attempt; the replacement is untouched
        else:
            os.kill(victim.proc.pid, signal.SIGCONT)
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 3, what="victim back")
        assert c.get(t.id).attempt == 2 and c.get(t.id).state == "running"
        c.cancel(t.id)


def test_cancel_stops_the_process_group(agents):
    node = agents("solo")
    with Client(node.address) as c:
        t = c.submit(shell="sleep 60 & sleep 60; wait", grace=1)
        wait_until(lambda: state_of(c, t.id) == "running", what="running")
        pid = attempt_pid(node, t.id, 1)
        children = psutil.Process(pid).children(recursive=True)
        assert c.cancel(t.id).state == "cancelled"
        wait_until(lambda: gone(pid) and all(gone(ch.pid) for ch in children), what="process group gone")
    out = run_ctl("tasks", "cancel", t.id, server=node.address)
    assert out.returncode == 1 and "already cancelled" in out.stderr


def test_timeout_is_enforced(agents):
    node = agents("solo")
    with Client(node.address) as c:
        t = c.submit(["sleep", "60"], timeout=0.5, grace=0.5)
        done = c.wait(t.id, timeout=30)
        assert done.state == "failed"
        assert "timeout" in done.reason


def test_logs_follow_streams_live_output(agents):
    node = agents("solo")
    with Client(node.address) as c:
        t = c.submit(shell="for i in 1 2 3; do echo line $i; sleep 0.2; done; echo oops >&2")
        data = b"".join(c.logs(t.id, follow=True))
        assert data.decode().splitlines() == ["line 1", "line 2", "line 3", "oops"]
    out = run_ctl("logs", t.id, server=node.address, check=True)
    assert "line 3" in out.stdout


# 8 blocks of 128 KiB (1 MiB) of numbered lines; after each, the task waits until the agent
# has rotated its output.log (it shrinks below a block), so the cap is seen to hold throughout.
CAPPED_WRITER = """
import os, sys, time
# The attempt's folder holds output.log; a task user's task works in its `work` folder below.
log = "output.log" if os.path.exists("output.log") else "../output.log"
for b in range(8):
    os.write(1, b"".join(b"%03d-%05d ".ljust(63, b".") % (b, i) + b"\\n" for i in range(2048)))
    deadline = time.monotonic() + 30
    while os.stat(log).st_size >= 128 * 1024:
        if time.monotonic() > deadline:
            sys.exit(3)
        time.sleep(0.01)
"""


def test_task_output_is_capped_and_still_readable(agents):
    node = agents("solo", "--task-log-max-bytes", "64KiB")
    last = b"007-02047 ".ljust(63, b".") + b"\n"
    with Client(node.address) as c:
        t = c.submit([sys.executable, "-c", CAPPED_WRITER])
        followed = b"".join(c.logs(t.id, follow=True))
        assert c.wait(t.id, timeout=60).state == "succeeded"
        att = node.data_dir / "tasks" / t.id / "1"
        sizes = {f.name: f.stat().st_size for f in att.iterdir() if f.name.startswith("output.log")}
        assert sizes.keys() == {"output.log", "output.log.1"}
        assert sum(sizes.values()) <= 2 * 128 * 1024 + 64 * 1024, sizes
        assert followed.endswith(last)  # a follower left behind gets notes, and goes on
        kept = b"".join(c.logs(t.id))
        assert kept.startswith(b"[lepton: output rotated: ") and kept.endswith(last)
        assert len(kept) < 2 * 128 * 1024 + 64 * 1024 + 100
    out = run_ctl("logs", t.id, server=node.address, check=True)
    assert out.stdout.encode() == kept


def test_run_streams_and_exits_with_the_task_code(agents):
    node = agents("solo")
    out = run_ctl("run", "--", "sh", "-c", "echo hello from the task; exit 3", server=node.address)
    assert out.returncode == 3
    assert "hello from the task" in out.stdout
    submitted = run_ctl("submit", "--cpu", "0.1", "--", "true", server=node.address, check=True)
    assert submitted.stdout.strip().startswith("t-") and len(submitted.stdout.split()) == 1


def test_gpus_are_assigned_as_distinct_devices(agents):
    node = agents("gpu-box", "--fake-gpus", "2")
    with Client(node.address) as c:
        tasks = [c.submit(shell='echo "$CUDA_VISIBLE_DEVICES"; sleep 1', gpus=1) for _ in range(2)]
        seen = sorted(b"".join(c.logs(t.id, follow=True)).decode().strip() for t in tasks)
        assert seen == ["0", "1"]
        assert all(c.wait(t.id, timeout=30).state == "succeeded" for t in tasks)
        big = c.submit(["true"], gpus=4)
        reason = wait_until(lambda: c.get(big.id).reason.startswith("unschedulable") and c.get(big.id).reason,
                            what="a reason")
        assert reason == "unschedulable: needs 4 gpus, largest node has 2"
        assert c.get(big.id).state == "pending"


def test_resubmission_with_the_same_request_id_runs_once(agents):
    node = agents("solo")
    with Client(node.address) as c:
        first = c.submit(["true"], request_id="job-42")
        again = c.submit(["true"], request_id="job-42")
        assert again.id == first.id
        assert [t.id for t in c.list()] == [first.id]


def test_a_batch_is_stored_in_order_idempotently_and_refused_whole(agents):
    node = agents("solo")
    sweep = [dict(argv=["true"], constraints={"zone": "nowhere"}, name=f"lr-{i}", request_id=f"sweep-{i}")
             for i in range(1500)]
    with Client(node.address) as c:
        tasks = c.submit_many(sweep)  # two calls: 1,000 and 500
        assert [t.name for t in tasks] == [f"lr-{i}" for i in range(1500)]
        assert len({t.id for t in tasks}) == 1500 and all(t.state == "pending" for t in tasks)
        again = c.submit_many(sweep[:10] + [dict(argv=["true"], request_id="new-one")])
        assert [t.id for t in again[:10]] == [t.id for t in tasks[:10]]
        with pytest.raises(InvalidArgument, match=r"tasks\[1\]"):
            c.submit_many([dict(argv=["true"]), dict(argv=["true"], cpu=-1)])
        stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(node.address))
        for specs, fragment in [
            ([tasks_pb2.TaskSpec(argv=["true"]), tasks_pb2.TaskSpec()], "specs[1]: the command is empty"),
            ([], "1 to 1000"),
            ([tasks_pb2.TaskSpec(argv=["true"])] * 1001, "1 to 1000"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                stub.SubmitTasks(coordinator_pb2.SubmitTasksRequest(specs=specs), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in info.value.details()
        assert len(c.list()) == 1501
        out = run_ctl("submit", "--sweep", "x=1,2,3", "--label", "zone=none", "--name", "echo-{x}",
                      "--", "echo", "{x}", server=node.address, check=True)
        ids = out.stdout.split()
        assert len(ids) == 3 and [c.get(i).name for i in ids] == ["echo-1", "echo-2", "echo-3"]
        out = run_ctl("submit", "--sweep", "x=1,2", "--", "echo", "{y}", server=node.address)
        assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1
        assert len(c.list()) == 1504


def test_threads_sharing_a_client_each_get_their_own_task(agents):
    from concurrent.futures import ThreadPoolExecutor

    node = agents("solo")
    with Client(node.address) as c:
        def submit(i: int):
            if i == 99:  # refused by the server alone: the others in its batch still land
                return c.submit(["true"], name="bad", env={"1BAD": "x"})
            return c.submit(["true"], name=f"n{i}", constraints={"zone": "none"}, request_id=f"r{i}")

        def outcome(i: int):
            try:
                return submit(i).name
            except InvalidArgument as err:
                return err.message

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(outcome, range(400)))
        assert got[:99] + got[100:] == [f"n{i}" for i in range(400) if i != 99]
        assert "env name" in got[99]
        stored = c.list()
        assert sorted(t.name for t in stored) == sorted(f"n{i}" for i in range(400) if i != 99)
        assert len({t.id for t in stored}) == 399


def test_bad_specs_are_rejected_and_nothing_is_stored(agents):
    node = agents("solo")
    with Client(node.address) as c:
        with pytest.raises(InvalidArgument):
            c.submit([])
        with pytest.raises(InvalidArgument):
            c.submit(["true"], cpu=-1)
        stub = coordinator_pb2_grpc.CoordinatorStub(grpc.insecure_channel(node.address))
        bad = [
            (tasks_pb2.TaskSpec(), "command is empty"),
            (tasks_pb2.TaskSpec(argv=["true"], resources=tasks_pb2.Resources(cpu=-2)), "resources.cpu"),
            (tasks_pb2.TaskSpec(argv=["true"], shell="true"), "not both"),
            (tasks_pb2.TaskSpec(argv=["true"], env={"1BAD": "x"}), "env name"),
            (tasks_pb2.TaskSpec(argv=["true"], request_id="../x"), "request_id"),
            (tasks_pb2.TaskSpec(argv=["true"], timeout_s=float("nan")), "timeout_s"),
        ]
        for spec, fragment in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec), timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in info.value.details()
        assert c.list() == []
    out = run_ctl("submit", "--cpu", "-3", "--", "true", server=node.address)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1


def test_agent_restart_reconciles_running_tasks(agents, tmp_path):
    # Slow failure detection here: the agent must be back before its node is declared down.
    voter = agents("voter", "--labels", "pool=control", "--suspect-after", "8", "--down-after", "10")
    worker = agents("worker", "--join", voter.address, "--labels", "pool=work")
    go = tmp_path / "go"
    with Client(voter.address) as c:
        t = c.submit(shell=f"while [ ! -f {go} ]; do sleep 0.1; done; echo finished", constraints={"pool": "work"})
        wait_until(lambda: state_of(c, t.id) == "running", what="running")
        pid = attempt_pid(worker, t.id, 1)
        fence = int((worker.data_dir / "task-fence.lock").read_text())  # the attempt's parent
        os.kill(worker.proc.pid, signal.SIGKILL)  # the agent dies; its task and its fence do not
        worker.proc.wait(10)
        assert not gone(pid) and not gone(fence)
        worker.start()  # back before the node is declared down: it re-adopts the attempt
        wait_until(lambda: any(n.name == "worker" and n.state == "ready" for n in c.nodes()), what="worker back")
        assert int((worker.data_dir / "task-fence.lock").read_text()) == fence  # the same fence, reused
        go.touch()
        done = c.wait(t.id, timeout=30)
        assert done.state == "succeeded" and done.attempt == 1


def test_a_graceful_agent_stop_requeues_its_tasks_instead_of_failing_them(agents):
    voter = agents("voter")
    worker = agents("worker", "--join", voter.address, "--labels", "pool=work")
    with Client(voter.address) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 2, what="2 nodes")
        t = c.submit(shell="sleep 60", constraints={"pool": "work"}, max_retries=0, grace=1)
        wait_until(lambda: state_of(c, t.id) == "running", what="running on the worker")
        assert worker.terminate() == 0  # SIGTERM: the agent stops its tasks, then leaves
        task = wait_until(lambda: (x := c.get(t.id)).state == "pending" and x, what="requeued")
        assert task.failures == 0 and task.attempt == 2
        # The requeue's own reason stands until the next scheduling pass looks at the task
        # (passes coalesce, so not necessarily at once); then: no other pool=work node.
        task = wait_until(lambda: (x := c.get(t.id)).reason != "requeued after agent stopping" and x,
                          what="a scheduling pass's reason")
        assert task.state == "pending" and task.attempt == 2
        assert "waiting" in task.reason or "unschedulable" in task.reason
        c.cancel(t.id)
