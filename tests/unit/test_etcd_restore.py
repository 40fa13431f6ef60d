"""Reading a cluster's state out of etcd and installing a backup's snapshot into it."""

from __future__ import annotations

import asyncio
import json

import pytest
from aetcd import rpc

from lepton.common import backup
from lepton.common.errors import FailedPrecondition
from lepton.coordinator import restore as restore_cli
from lepton.coordinator.etcd.connection import EtcdConnection, prefix_end
from lepton.coordinator.etcd.consensus import EtcdConsensus
from lepton.coordinator.etcd.restore import install_snapshot, load_state
from lepton.coordinator.state.state_machine import ClusterStateMachine
from tests.etcd_server import EtcdCluster
from tests.unit.test_consensus_contract import CountingMachine
from tests.unit.test_etcd_contract import EtcdHarness


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), n=1)
    yield cluster
    cluster.stop()


async def keys_under(etcd: EtcdCluster, prefix: str) -> dict[bytes, bytes]:
    conn = EtcdConnection(etcd.endpoints, None)
    try:
        start = prefix.encode() + b"/"
        resp = await conn.call(conn.kv.Range, rpc.RangeRequest(key=start, range_end=prefix_end(start)), timeout=10)
        return {kv.key: kv.value for kv in resp.kvs}
    finally:
        await conn.close()


async def test_install_replaces_the_state_and_the_cluster_goes_on_from_it(etcd):
    prefix = "/lepton/restore"
    h = EtcdHarness(etcd, candidates=1, prefix=prefix, snapshot_every=5)
    await h.start()
    for i in range(12):
        await h.leader().propose(f"old{i}".encode(), timeout=10)
    with pytest.raises(FailedPrecondition, match="stop every candidate"):
        await install_snapshot(etcd.endpoints, prefix, None, b"a\nb", 40, cluster="")
    await h.stop()

    read = CountingMachine()
    assert await load_state(etcd.endpoints, prefix, None, read) == 12
    assert read.log == [f"old{i}".encode() for i in range(12)]

    await install_snapshot(etcd.endpoints, prefix, None, b"a\nb", 40, cluster="")
    await h.start()
    try:
        assert h.sm.log == [b"a", b"b"] and h.sm.applied_index == 40
        assert await h.leader().propose(b"new", timeout=10) == 3
        assert h.sm.applied_index == 41
    finally:
        await h.stop()
    again = CountingMachine()
    assert await load_state(etcd.endpoints, prefix, None, again) == 41
    assert again.log == [b"a", b"b", b"new"]


async def test_install_refuses_another_clusters_prefix_and_writes_nothing(etcd):
    """<prefix>/meta names the cluster whose state the prefix holds: a restore for another
    cluster is refused as that cluster's candidate would be at start, before any write."""
    prefix = "/lepton/owned"
    owner = EtcdConsensus("a", "a:1", etcd.endpoints, prefix, CountingMachine(), cluster="alpha")
    await owner.start()
    await owner.stop()
    before = await keys_under(etcd, prefix)
    with pytest.raises(FailedPrecondition, match="holds the state of cluster 'alpha', not 'beta'"):
        await install_snapshot(etcd.endpoints, prefix, None, b"x", 7, cluster="beta")
    assert await keys_under(etcd, prefix) == before

    await install_snapshot(etcd.endpoints, prefix, None, b"x", 7, cluster="alpha")
    assert (await keys_under(etcd, prefix)).keys() > before.keys()


async def test_install_into_an_empty_prefix_claims_it_for_the_cluster(etcd):
    """A restore is the prefix's first writer: it records the cluster as a start would, so a
    candidate of another cluster pointed there afterwards is refused."""
    prefix = "/lepton/fresh"
    await install_snapshot(etcd.endpoints, prefix, None, b"a", 3, cluster="alpha")
    meta = json.loads((await keys_under(etcd, prefix))[f"{prefix}/meta".encode()])
    assert meta["cluster"] == "alpha"
    stranger = EtcdConsensus("x", "x:1", etcd.endpoints, prefix, CountingMachine(), cluster="beta")
    with pytest.raises(FailedPrecondition, match="holds the state of cluster 'alpha'"):
        await stranger.start()


def run_restore(capsys, *argv: str) -> tuple[int, dict]:
    """main() runs its own event loop (asyncio.run): call it off the test's loop."""
    rc = restore_cli.main(list(argv))
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


async def test_snapshot_restore_command_checks_the_cluster_name(etcd, tmp_path, capsys):
    """`lepton-ctl snapshot restore --etcd` runs this module's main: --cluster-name must be the
    prefix's owner; refused, the answer is one FAILED_PRECONDITION naming the owner."""
    prefix = "/lepton/shared"
    owner = EtcdConsensus("a", "a:1", etcd.endpoints, prefix, CountingMachine(), cluster="alpha")
    await owner.start()
    await owner.stop()
    file = backup.save(ClusterStateMachine().snapshot(), 5, 1, "cluster-id-1", tmp_path / "b.lbk")
    target = [str(file), "--etcd", f"etcd://{etcd.endpoints[0]}", "--etcd-prefix", prefix]

    rc, doc = await asyncio.to_thread(run_restore, capsys, *target, "--cluster-name", "beta")
    assert rc == 1 and doc["code"] == "FAILED_PRECONDITION", doc
    assert "holds the state of cluster 'alpha'" in doc["message"]

    rc, doc = await asyncio.to_thread(run_restore, capsys, *target, "--cluster-name", "alpha")
    assert rc == 0 and doc["index"] == 5 and doc["data_dir"].endswith(f"under {prefix}"), doc
    assert await load_state(etcd.endpoints, prefix, None, ClusterStateMachine()) == 5

