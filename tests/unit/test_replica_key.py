"""Only a replica's own agent may call it (workloads/serving/replica_key.py, agent/serving.py):
the first key presented claims the replica, every other call is PERMISSION_DENIED; the key
is kept root-only beside the attempt's records and survives an agent restart; the replica
process is not dumpable (its memory is root's only)."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lepton.agent.serving import LocalReplica, attempt_key
from lepton.coordinator.loops.serving import replica_spec
from lepton.workloads.serving.replica import parse_args
from lepton.workloads.serving.replica_key import KeyGate
from tests.unit.test_deployments import create, world


async def _check(channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return err.code()


async def test_the_first_key_claims_the_replica_and_every_other_caller_is_refused(tmp_path):
    sock = tmp_path / "serve.sock"
    server = grpc.aio.server(interceptors=[KeyGate()])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"unix:{sock}")
    await server.start()
    try:
        stranger = grpc.aio.insecure_channel(f"unix:{sock}")
        assert await _check(stranger) == grpc.StatusCode.PERMISSION_DENIED  # no key: no claim
        att = tmp_path / "att"
        att.mkdir()
        agent = LocalReplica("t-1", 1, "web", 1, sock, session=os.getsid(0), key=attempt_key(att))
        assert await agent.connect()
        assert await _check(agent.channel) == grpc.StatusCode.OK  # claims it
        assert await _check(agent.channel) == grpc.StatusCode.OK
        thief = LocalReplica("t-1", 1, "web", 1, sock, session=os.getsid(0), key=attempt_key(tmp_path))
        assert await thief.connect()
        assert await _check(thief.channel) == grpc.StatusCode.PERMISSION_DENIED
        assert await _check(stranger) == grpc.StatusCode.PERMISSION_DENIED
        # A restarted agent reads the same key back and is still served.
        again = LocalReplica("t-1", 1, "web", 1, sock, session=os.getsid(0), key=attempt_key(att))
        assert again.key == agent.key and await again.connect()
        assert await _check(again.channel) == grpc.StatusCode.OK
        for replica in (agent, thief, again):
            await replica.close()
        await stranger.close()
    finally:
        await server.stop(0)


def test_the_key_file_is_the_agents_only(tmp_path):
    key = attempt_key(tmp_path)
    assert len(key) == 32 and (tmp_path / "replica.key").stat().st_mode & 0o077 == 0


def test_replicas_the_serving_loop_starts_claim_their_key():
    w = world()
    create(w)
    argv = list(replica_spec(w.sm.deployments.get("web")).argv)
    assert parse_args(argv[3:]).claim_key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_keyed_replica_process_is_not_dumpable():
    code = ("import ctypes, ctypes.util; from lepton.workloads.serving.replica_key import no_dumping; "
            "assert no_dumping(); print(ctypes.CDLL(ctypes.util.find_library('c')).prctl(3, 0, 0, 0, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "0"  # PR_GET_DUMPABLE
