"""Issue 14a end to end: over-cap requests are refused before anything is logged and the log
keeps committing; a state larger than any message (16 MiB) still reaches a voter that was
down (InstallSnapshot in chunks), a worker (its assignment set in chunks), and a backup
(snapshot save in chunks) that restores."""

from __future__ import annotations

import json
import re

import grpc
import pytest

from lepton.client import Client
from lepton.common.errors import InvalidArgument
from lepton.common.grpc_util import MAX_MESSAGE_BYTES
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1 import tasks_pb2
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub
from lepton.v1.datasets_pb2_grpc import DatasetsStub
from tests.integration.cluster import leader_of, run_ctl, servers, start_voters, wait_until

pytestmark = pytest.mark.integration

# A large-but-allowed task: ~840 KB of arguments (under the 1 MiB spec cap and exec's
# limit); `sh -c 'sleep 600' a x...` ignores them.
BIG_ARGS = ["x" * 120_000] * 7


def big_task(c: Client, i: int, **options):
    return c.submit(["sh", "-c", "sleep 600", f"big-{i}", *BIG_ARGS], cpu=0.01, **options)


def refusal_on_leader(c: Client, call) -> grpc.RpcError:
    """The error `call(channel)` gets from the leader (asked again if leadership moved)."""
    def attempt():
        with grpc.insecure_channel(c.cluster_status().leader) as ch:
            try:
                call(ch)
            except grpc.RpcError as err:
                return None if err.code() == grpc.StatusCode.UNAVAILABLE else err
        raise AssertionError("the call was not refused")

    return wait_until(attempt, timeout=60, what="an answer from the leader")


def test_over_cap_requests_are_refused_and_the_log_keeps_committing(agents):
    voters = start_voters(agents)
    with Client(servers(voters), timeout=30) as c:
        wait_until(lambda: c.cluster_status().leader, what="a leader")
        huge = ["echo"] + ["y" * (16 << 10)] * 1020  # ~16.7 MB: fits the message limit
        refusals = {
            "16 MiB submit": dict(argv=huge),
            "9.8 MB argv": dict(argv=["echo"] + ["a" * 100_000] * 98),
            "2 MB env": dict(argv=["env"], env={f"V{i}": "e" * 100_000 for i in range(20)}),
            "1.5 MiB spec": dict(argv=["echo"] + ["b" * 120_000] * 13),  # exec would take it
        }
        assert sum(len(a) for a in huge) < MAX_MESSAGE_BYTES
        before = c.cluster_status().commit_index
        for what, kwargs in refusals.items():
            with pytest.raises(InvalidArgument) as err:
                c.submit(**kwargs)
            message = err.value.message
            assert re.search(r"at most \d+", message), f"{what}: {message}"
            if what == "1.5 MiB spec":
                assert "at most 1048576 (the cluster's --max-spec-bytes)" in message
            else:
                assert "exec allows at most" in message, f"{what}: {message}"
        # The CLI says so in one line (its own exec caps what it can be given: 1.5 MiB here).
        out = run_ctl("submit", "--", "echo", *(["b" * 120_000] * 13), server=voters[0].address)
        assert out.returncode != 0 and "--max-spec-bytes" in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        # Nothing was logged for them, and writes still commit on every voter.
        task = c.submit(["true"], constraints={"pool": "none"})
        assert c.get(task.id).id == task.id
        status = c.cluster_status()
        assert status.commit_index > before

        def replicated():
            s = c.cluster_status()
            return all(v.match_index >= status.commit_index for v in s.voters)

        wait_until(replicated, what="every voter to hold the new entry")
        # Four allowed specs, too many bytes for one SubmitTasks (one log entry).
        spec = tasks_pb2.TaskSpec(argv=["sh", "-c", "true", *BIG_ARGS], constraints={"pool": "none"})
        err = refusal_on_leader(c, lambda ch: CoordinatorStub(ch).SubmitTasks(
            cpb.SubmitTasksRequest(specs=[spec] * 4), timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one SubmitTasks carries at most 3145728" in err.details()
        # A dataset whose record could never be one log entry is refused before any upload.
        shards = [dpb.Shard(id=f"{i:064x}", size=1, rows=1, dtype="<f4") for i in range(60_000)]
        err = refusal_on_leader(c, lambda ch: DatasetsStub(ch).PlanPut(
            dpb.PlanPutRequest(name="huge", shards=shards), timeout=60))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "a log entry holds at most 4194304 (use fewer, bigger shards)" in err.details()
        # submit_many cuts the same four into calls that fit.
        assert len(c.submit_many([dict(argv=["sh", "-c", "true", *BIG_ARGS], constraints={"pool": "none"})] * 4)) == 4


def test_a_voter_that_was_down_catches_up_through_a_snapshot_over_16_mib(agents):
    voters = start_voters(agents, 3, "--snapshot-every", "16")
    worker = agents("worker", "--join", servers(voters), "--labels", "pool=big", "--cpus", "4")
    with Client(servers(voters), timeout=60) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 4, what="4 nodes")
        leader = leader_of(c, voters)
        lagging = next(v for v in voters if v is not leader)
        assert lagging.terminate() == 0
        # ~25 MB of task specs: more than any message, all held by one worker at once.
        big = [big_task(c, i, constraints={"pool": "big"}).id for i in range(30)]
        for i in range(20):  # enough entries after them that a snapshot holds them all
            c.submit(["true"], constraints={"pool": "none"}, name=f"small-{i}")
        # One by one: a list of them all would itself pass 16 MiB without pagination.
        wait_until(lambda: all(c.get(t).state == "running" for t in big), timeout=120,
                   what="all 30 big tasks running on the worker (its set came in chunks)")
        assert "assignments (term" in worker.log_path.read_text()

        lagging.start()
        wait_until(lambda: next(v for v in c.cluster_status().voters
                                if v.address == lagging.address).lag == 0,
                   timeout=120, what="the restarted voter caught up")
        installed = [int(m) for m in re.findall(r"installing snapshot at \d+ \(term \d+, (\d+) bytes\)",
                                                lagging.log_path.read_text())]
        assert installed and max(installed) > MAX_MESSAGE_BYTES, installed
        # The install was durable: restarted, it starts from the snapshot it stored.
        assert lagging.terminate() == 0
        lagging.start()
        wait_until(lambda: next(v for v in c.cluster_status().voters
                                if v.address == lagging.address).lag == 0,
                   timeout=120, what="the voter back after its restart")
        assert len(re.findall(r"installing snapshot at", lagging.log_path.read_text())) == len(installed)


def test_snapshot_save_and_restore_round_trip_a_state_over_16_mib(agents, tmp_path):
    voter = agents("voter")
    srv = voter.address
    with Client(srv, timeout=60) as c:
        ids = [big_task(c, i, constraints={"pool": "none"}).id for i in range(22)]
        before = [(t, c.get(t).state) for t in ids]  # one by one: all at once is over 16 MiB
    backup = tmp_path / "big.lbk"
    saved = json.loads(run_ctl("-o", "json", "snapshot", "save", str(backup), server=srv, check=True).stdout)
    assert saved["bytes"] > MAX_MESSAGE_BYTES and backup.stat().st_size == saved["bytes"]
    assert voter.terminate() == 0
    out = run_ctl("snapshot", "restore", str(backup), "--data-dir", str(voter.data_dir), server=srv, check=True)
    assert saved["cluster_id"] in out.stdout
    voter.start()
    with Client(srv, timeout=60) as c:
        wait_until(lambda: c.cluster_status().leader, what="the voter to lead again")
        assert [(t, c.get(t).state) for t in ids] == before
