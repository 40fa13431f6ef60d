"""A voter whose disk fills stops and exits (crash-stop); the other two keep committing and
nothing acknowledged is lost. Its Raft folder is a 2 MiB tmpfs (needs root to mount)."""

from __future__ import annotations

import os
import subprocess
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lepton.client import Client, LeptonError
from tests.integration.cluster import RAFT_FAST, free_port, servers, wait_until

pytestmark = pytest.mark.integration

FREE_LEFT = 128 << 10  # what the filler leaves: a few dozen log entries


@pytest.fixture
def tiny_raft_dir(tmp_path):
    raft = tmp_path / "voter-3" / "raft"
    raft.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(raft)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.decode().strip()}")
    yield raft
    subprocess.run(["umount", "-l", str(raft)], check=False)


def test_voter_whose_disk_fills_exits_and_the_others_keep_committing(agents, tiny_raft_dir):
    ports = [free_port() for _ in range(3)]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    voters = [agents(f"voter-{i + 1}", "--peers", peers, *RAFT_FAST, port=port) for i, port in enumerate(ports)]
    victim = voters[2]
    statuses: list[int] = []  # what the victim's gRPC health says, as it changes
    channel = grpc.insecure_channel(victim.address)

    def watch_health() -> None:
        try:
            for answer in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()):
                statuses.append(answer.status)
        except grpc.RpcError:
            pass  # the victim went away

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    payload = "x" * 2000  # a large entry, so the disk fills in a few dozen commands
    acked: list[str] = []
    with Client(servers(voters), timeout=20) as c:
        wait_until(lambda: c.cluster_status().leader, timeout=60, what="a leader")
        st = os.statvfs(tiny_raft_dir)
        filler = st.f_bavail * st.f_frsize - FREE_LEFT
        with open(tiny_raft_dir / "filler", "wb") as f:
            f.write(b"\0" * max(0, filler))

        def submit(i: int) -> None:
            rid = f"fill-{i}"
            for _ in range(200):  # the same request id until acknowledged
                try:
                    c.submit(shell=f"echo {payload}", constraints={"pool": "none"}, request_id=rid)
                    acked.append(rid)
                    return
                except LeptonError:
                    wait_until(lambda: c.cluster_status().leader, what="a leader")
            raise AssertionError(f"{rid} never acknowledged")

        i = 0
        while "no longer votes" not in victim.log():  # then it exits; stop filling
            assert i < 2000, "the voter on the full disk never stopped"
            submit(i)
            i += 1
        assert victim.proc.wait(30) != 0
        watcher.join(30)
        channel.close()
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        assert statuses[-2:] == [serving, not_serving], statuses  # it said so before it went
        log = victim.log()
        assert "log store" in log and "No space left on device" in log and "Traceback" not in log
        # The other two go on committing without it.
        for k in range(i, i + 10):
            submit(k)
        # Every acknowledged submission is there exactly once.
        assert sorted(t.request_id for t in c.list()) == sorted(acked)
        # Space freed and restarted (what systemd does): it re-reads its log and catches up.
        (tiny_raft_dir / "filler").unlink()
        victim.start()
        wait_until(lambda: next(v for v in c.cluster_status().voters
                                if v.address == victim.address).lag == 0, timeout=60, what="the voter caught up")
