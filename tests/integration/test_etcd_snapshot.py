"""Issue 18: `lepton-ctl snapshot save` and `snapshot restore --etcd` with the etcd backend.

Save works unchanged against a candidate; the restore into the etcd prefix is offline
(refused while a candidate leads) and refuses another cluster's state; after it the first
candidate started leads from the backup's state."""

from __future__ import annotations

import json

import pytest

from lepton.client import Client
from tests.etcd_server import EtcdCluster
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration

NOWHERE = {"pool": "nowhere"}  # the tasks stay pending: the test is about the state


@pytest.fixture
def etcd1(tmp_path):
    cluster = EtcdCluster(tmp_path, 1)
    yield cluster
    cluster.stop()


def restore(backup, etcd: EtcdCluster, *extra: str):
    return run_ctl("-o", "json", "snapshot", "restore", str(backup), "--etcd", f"etcd://{etcd.endpoints[0]}", *extra,
                   server="127.0.0.1:1")


def test_save_then_restore_into_etcd_brings_back_the_saved_state(agents, etcd1, tmp_path):
    state = ["--state", f"etcd://{etcd1.endpoints[0]}"]
    candidate = agents("candidate", *state)
    backup = tmp_path / "cluster.lbk"
    with Client(candidate.address, timeout=30) as c:
        wait_until(lambda: c.cluster_status().leader, timeout=60, what="a leader")
        saved = {c.submit(["true"], constraints=NOWHERE, request_id=f"saved-{i}").id for i in range(3)}
        out = run_ctl("-o", "json", "snapshot", "save", str(backup), server=candidate.address, check=True)
        cluster_id = json.loads(out.stdout)["cluster_id"]
        later = c.submit(["true"], constraints=NOWHERE, request_id="after-save").id

    refused = restore(backup, etcd1)
    assert refused.returncode != 0 and "a candidate leads" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    assert candidate.terminate() == 0  # a clean stop revokes the lease: the leader key goes
    out = restore(backup, etcd1)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["cluster_id"] == cluster_id and doc["data_dir"].endswith("under /lepton/default")

    candidate.start()
    with Client(candidate.address, timeout=30) as c:
        wait_until(lambda: c.cluster_status().leader, timeout=60, what="a leader after the restore")
        ids = {t.id for t in c.list()}
        assert saved <= ids and later not in ids  # the backup's state, not the one after it
        again = c.submit(["true"], constraints=NOWHERE, request_id="after-restore").id  # the log goes on
        assert again in {t.id for t in c.list()}


def test_restore_refuses_another_clusters_state(agents, etcd1, tmp_path):
    """Two clusters share one etcd under two prefixes: one's backup is refused in the other's."""
    first = agents("first", "--state", f"etcd://{etcd1.endpoints[0]}", "--cluster-name", "first")
    second = agents("second", "--state", f"etcd://{etcd1.endpoints[0]}", "--cluster-name", "second")
    backup = tmp_path / "first.lbk"
    for agent in (first, second):
        with Client(agent.address, timeout=30) as c:
            wait_until(lambda c=c: c.cluster_status().leader, timeout=60, what="a leader")
            wait_until(lambda a=agent: run_ctl("snapshot", "save", str(tmp_path / "probe.lbk"), "--overwrite",
                                               server=a.address).returncode == 0,
                       timeout=60, what="a cluster id")  # the first leader commits one
    run_ctl("snapshot", "save", str(backup), server=first.address, check=True)
    second.terminate()
    out = restore(backup, etcd1, "--cluster-name", "second")
    assert out.returncode != 0 and "belongs to cluster" in out.stderr, out.stderr
