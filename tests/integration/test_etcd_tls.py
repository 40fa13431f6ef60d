"""Issue 18: TLS to etcd. A real etcd that asks for client certificates; a candidate with
--etcd-ca/--etcd-cert/--etcd-key leads and runs a task; one with another CA stops at start
with the reason on its last stderr line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lepton.client import Client
from lepton.common import tls as lepton_tls
from tests.etcd_server import EtcdCluster
from tests.integration.cluster import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def etcd_tls(tmp_path):
    cluster = EtcdCluster(tmp_path, 1, tls=True)
    yield cluster
    cluster.stop()


def test_a_candidate_with_a_client_certificate_leads_and_runs_tasks(agents, etcd_tls, tmp_path):
    files = etcd_tls.tls
    candidate = agents("tls-candidate", "--state", f"etcd://{etcd_tls.endpoints[0]}",
                       "--etcd-ca", files.ca, "--etcd-cert", files.cert, "--etcd-key", files.key)
    with Client(candidate.address, timeout=30) as c:
        status = wait_until(lambda: (s := c.cluster_status()).leader and s, timeout=60, what="a leader")
        assert (status.state_backend, status.leader) == ("etcd", candidate.address)
        task = c.submit(shell=f"echo ok > {tmp_path / 'out'}")
        wait_until(lambda: c.get(task.id).state == "succeeded", timeout=60, what="the task to succeed")
    assert (tmp_path / "out").read_text() == "ok\n"


def test_another_ca_stops_the_agent_with_the_reason(etcd_tls, tmp_path):
    other = tmp_path / "other-ca"
    lepton_tls.init_ca(other, common_name="not etcd's CA")
    files = etcd_tls.tls
    proc = subprocess.run(
        [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(tmp_path / "agent"), "--listen", "127.0.0.1:0",
         "--task-user", "none", "--state", f"etcd://{etcd_tls.endpoints[0]}",
         "--etcd-ca", str(other / "ca.crt"), "--etcd-cert", files.cert, "--etcd-key", files.key],
        capture_output=True, text=True, timeout=180,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert last.startswith("lepton-agent: cannot start: etcd at ") and "CERTIFICATE_VERIFY_FAILED" in last, last
    assert "Handshake failed" not in proc.stderr  # no gRPC core INFO lines between the agent's own
