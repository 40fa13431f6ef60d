"""Issue 7: a real agent's Prometheus endpoint, and `lepton-ctl top`, end to end."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lepton.client import Client
from tests.integration.cluster import free_port, run_ctl, wait_until

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[str, float]:
    """Every sample, keyed `name` or `name{k=v,...}` (labels sorted)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_endpoint_and_top(agents, tmp_path: Path):
    port = free_port()
    agent = agents("solo", "--metrics-listen", f"127.0.0.1:{port}", "--fake-gpus", "1")
    url = f"http://127.0.0.1:{port}/metrics"
    assert json.loads((agent.data_dir / "agent.json").read_text())["metrics"] == url

    m = wait_until(lambda: (m := scrape(url))["lepton_nodes{state=ready}"] == 1 and m, what="node ready")
    assert m["lepton_nodes{state=down}"] == 0
    assert m["lepton_raft_term"] >= 1 and m["lepton_raft_is_leader"] == 1
    assert m["lepton_raft_commit_index"] >= 1 and m["lepton_raft_applied_index"] >= 1
    assert "lepton_heartbeat_age_max_seconds" in m and "lepton_scheduling_queue_depth" in m
    wait_until(lambda: scrape(url)["lepton_heartbeat_interval_seconds_count"] > 0, what="heartbeat lag")
    # The agent's side: how long since the leader answered; a number once it has.
    wait_until(lambda: 0 <= scrape(url)["lepton_agent_heartbeat_lag_seconds"] < 60, what="an answer")

    with Client(agent.address) as c:
        task = c.submit(["true"])
        assert c.wait(task.id, timeout=30).state == "succeeded"
        m = wait_until(lambda: (m := scrape(url))["lepton_tasks{state=succeeded}"] == 1 and m, what="task done")
        assert m["lepton_scheduling_latency_seconds_count"] == 1
        assert m["lepton_scheduling_cycle_seconds_count"] >= 1
        assert m["lepton_agent_tasks_running"] == 0

        # Shard bytes: an upload comes in, a download goes out.
        np.save(tmp_path / "x.npy", np.arange(1000, dtype=np.float32))
        c.put_dataset(tmp_path / "x.npy", "x", replicas=1)
        c.get_dataset("x", tmp_path / "back.npy")
    m = scrape(url)
    assert m["lepton_shard_bytes_total{direction=in}"] > 4000
    assert m["lepton_shard_bytes_total{direction=out}"] > 4000

    out = run_ctl("top", "--once", "-o", "json", server=agent.address, check=True)
    (node,) = json.loads(out.stdout)["nodes"]
    assert node["name"] == "solo" and node["state"] == "ready" and len(node["gpus"]) == 1
    assert "solo" in run_ctl("top", "--once", server=agent.address, check=True).stdout
