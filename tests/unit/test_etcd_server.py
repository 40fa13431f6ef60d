"""The test etcd servers themselves (tests/etcd_server.py): they start, serve, die and heal."""

from __future__ import annotations

import json
import socket
import urllib.request

import pytest

from tests.etcd_server import EtcdCluster, Proxy


def _health(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as resp:
            return json.loads(resp.read())["health"] == "true"
    except OSError:
        return False


def test_one_member_serves_and_stops(tmp_path):
    cluster = EtcdCluster(tmp_path, n=1)
    try:
        assert _health(cluster.endpoints[0])
        proxy = Proxy(cluster.endpoints[0])
        try:
            assert _health(proxy.address)
            proxy.cut()
            assert not _health(proxy.address)
            proxy.heal()
            assert _health(proxy.address)
        finally:
            proxy.close()
    finally:
        cluster.stop()
    assert not cluster.running(0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", cluster.client_ports[0]), timeout=1).close()


def test_three_members_survive_a_kill_and_restart(tmp_path):
    with EtcdCluster(tmp_path, n=3) as cluster:
        cluster.kill9(0)
        assert not cluster.running(0)
        cluster.wait_healthy([1, 2])
        cluster.restart(0)
        assert all(_health(e) for e in cluster.endpoints)
        cluster.pause(1)
        cluster.resume(1)
        cluster.wait_healthy()


def test_tls_member_refuses_plain_clients(tmp_path):
    with EtcdCluster(tmp_path, n=1, tls=True) as cluster:
        assert cluster.tls is not None and cluster._healthy(0)
        assert not _health(cluster.endpoints[0])  # plain HTTP is refused
