"""Reading a cluster's state out of etcd and installing a backup's snapshot into it."""

from __future__ import annotations

import pytest

from lepton.common.errors import FailedPrecondition
from lepton.coordinator.etcd.restore import install_snapshot, load_state
from tests.etcd_server import EtcdCluster
from tests.unit.test_consensus_contract import CountingMachine
from tests.unit.test_etcd_contract import EtcdHarness


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), n=1)
    yield cluster
    cluster.stop()


async def test_install_replaces_the_state_and_the_cluster_goes_on_from_it(etcd):
    prefix = "/lepton/restore"
    h = EtcdHarness(etcd, candidates=1, prefix=prefix, snapshot_every=5)
    await h.start()
    for i in range(12):
        await h.leader().propose(f"old{i}".encode(), timeout=10)
    with pytest.raises(FailedPrecondition, match="stop every lepton-agent"):
        await install_snapshot(etcd.endpoints, prefix, None, b"a\nb", 40)
    await h.stop()

    read = CountingMachine()
    assert await load_state(etcd.endpoints, prefix, None, read) == 12
    assert read.log == [f"old{i}".encode() for i in range(12)]

    await install_snapshot(etcd.endpoints, prefix, None, b"a\nb", 40)
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
