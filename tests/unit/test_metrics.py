"""Metrics: scrape a real /metrics endpoint on 127.0.0.1 and parse what it says."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lepton.agent.metrics import (
    AgentMetrics,
    CoordinatorMetrics,
    start_metrics_server,
)
from lepton.coordinator.consensus import ConsensusStatus, VoterStatus
from lepton.v1 import common_pb2, tasks_pb2

NOW_MS = 1_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeConsensus:
    def __init__(self, leader: bool = True):
        self.leader = leader

    def is_leader(self) -> bool:
        return self.leader

    def status(self) -> ConsensusStatus:
        return ConsensusStatus(term=7, leader_id="a", leader_address="10.0.0.1:7070",
                               commit_index=120, applied_index=118,
                               voters=[VoterStatus("b", "10.0.0.2:7070", "follower", 115, 5)])


class FakeLiveness:
    def __init__(self, seen: dict[str, int]):
        self.seen = seen

    def last_seen(self, node_id):
        if node_id not in self.seen:
            return 0, None
        return self.seen[node_id], common_pb2.Usage()


def _sources():
    nodes = {
        "n1": common_pb2.Node(id="n1", state=common_pb2.NODE_STATE_READY),
        "n2": common_pb2.Node(id="n2", state=common_pb2.NODE_STATE_READY, draining=True),
        "n3": common_pb2.Node(id="n3", state=common_pb2.NODE_STATE_SUSPECT),
        "n4": common_pb2.Node(id="n4", state=common_pb2.NODE_STATE_DOWN),
    }
    tasks = {
        "t1": tasks_pb2.Task(id="t1", state=tasks_pb2.TASK_STATE_PENDING),
        "t2": tasks_pb2.Task(id="t2", state=tasks_pb2.TASK_STATE_PENDING),
        "t3": tasks_pb2.Task(id="t3", state=tasks_pb2.TASK_STATE_RUNNING),
    }
    state = SimpleNamespace(nodes=nodes, tasks=SimpleNamespace(tasks=tasks))
    scheduling = SimpleNamespace(reasons={"t1": "unschedulable: needs 8 GPUs", "t2": "waiting: no room"})
    liveness = FakeLiveness({"n1": NOW_MS - 500, "n2": NOW_MS - 2500, "n3": NOW_MS - 4000})
    return dict(state=state, consensus=FakeConsensus(), liveness=liveness, scheduling=scheduling,
                heartbeat_interval_s=1.0, wall_ms=lambda: NOW_MS)


@pytest.fixture
def served():
    servers = []

    def serve(registry):
        server = start_metrics_server("127.0.0.1", _free_port(), registry)
        servers.append(server)
        return server

    yield serve
    for s in servers:
        s.close()


def test_cluster_gauges_over_http(served):
    m = CoordinatorMetrics()
    m.attach(**_sources())
    got = _scrape(served(m.registry).url)
    assert got[("lepton_nodes", (("state", "ready"),))] == 2
    assert got[("lepton_nodes", (("state", "suspect"),))] == 1
    assert got[("lepton_nodes", (("state", "left"),))] == 0
    assert got[("lepton_nodes_draining", ())] == 1
    assert got[("lepton_tasks", (("state", "pending"),))] == 2
    assert got[("lepton_tasks", (("state", "running"),))] == 1
    assert got[("lepton_scheduling_queue_depth", ())] == 2
    assert got[("lepton_scheduling_unschedulable", ())] == 1
    assert got[("lepton_raft_term", ())] == 7
    assert got[("lepton_raft_commit_index", ())] == 120
    assert got[("lepton_raft_applied_index", ())] == 118
    assert got[("lepton_raft_is_leader", ())] == 1
    assert got[("lepton_raft_voter_lag", (("voter", "10.0.0.2:7070"),))] == 5
    assert got[("lepton_heartbeat_age_max_seconds", ())] == 4.0  # n3; n4 is down
    assert got[("lepton_heartbeat_late_nodes", ())] == 2


def test_hooks_feed_histograms(served):
    m = CoordinatorMetrics()
    assigned = tasks_pb2.Task(id="t", state=tasks_pb2.TASK_STATE_ASSIGNED,
                              created_at_ms=1000, assigned_at_ms=1250)
    m.on_task_change(assigned, old_node="")
    m.on_task_change(assigned, old_node="n1")  # not a new assignment
    m.on_task_change(tasks_pb2.Task(id="u", state=tasks_pb2.TASK_STATE_RUNNING), old_node="")
    for interval in (None, 1.0, 1.5):
        m.observe_heartbeat("n1", interval)
    got = _scrape(served(m.registry).url)
    assert got[("lepton_scheduling_latency_seconds_count", ())] == 1
    assert got[("lepton_scheduling_latency_seconds_sum", ())] == pytest.approx(0.25)
    assert got[("lepton_heartbeat_interval_seconds_count", ())] == 2
    assert got[("lepton_heartbeat_interval_seconds_bucket", (("le", "1.0"),))] == 1


def test_agent_metrics_share_a_registry(served):
    registry = CollectorRegistry()
    agent = AgentMetrics(registry)
    coord = CoordinatorMetrics(registry)
    coord.attach(consensus=FakeConsensus(leader=False))
    agent.shard_bytes("in", 4096)
    agent.shard_bytes("out", 10)
    agent.transfer_done("in", ok=False)
    agent.track_running(lambda: 3)
    agent.track_heartbeat_lag(lambda: 0.25)
    agent.on_auth_event(SimpleNamespace(code=SimpleNamespace(name="PERMISSION_DENIED")))
    agent.on_auth_event(SimpleNamespace(code=SimpleNamespace(name="OK")))
    with pytest.raises(ValueError):
        agent.shard_bytes("sideways", 1)
    got = _scrape(served(registry).url)
    assert got[("lepton_shard_bytes_total", (("direction", "in"),))] == 4096
    assert got[("lepton_shard_bytes_total", (("direction", "out"),))] == 10
    assert got[("lepton_shard_transfers_total", (("direction", "in"), ("result", "failed")))] == 1
    assert got[("lepton_agent_tasks_running", ())] == 3
    assert got[("lepton_agent_heartbeat_lag_seconds", ())] == 0.25
    assert got[("lepton_auth_refused_total", (("code", "PERMISSION_DENIED"),))] == 1
    assert ("lepton_auth_refused_total", (("code", "OK"),)) not in got
    assert got[("lepton_raft_is_leader", ())] == 0
    assert ("lepton_nodes", (("state", "ready"),)) not in got  # no state on this process


def test_a_broken_source_does_not_fail_the_scrape(served):
    class Broken:
        def status(self):
            raise RuntimeError("boom")

        def is_leader(self):
            return True

    m = CoordinatorMetrics()
    m.attach(**{**_sources(), "consensus": Broken()})
    got = _scrape(served(m.registry).url)
    assert got[("lepton_nodes", (("state", "ready"),))] == 2
    assert ("lepton_raft_term", ()) not in got


async def test_reads_run_on_the_event_loop(served):
    seen = []
    sources = _sources()

    class OnLoop(FakeConsensus):
        def status(self):
            seen.append(asyncio.get_running_loop())  # raises off the loop
            return super().status()

    m = CoordinatorMetrics()
    m.attach(**{**sources, "consensus": OnLoop(), "loop": asyncio.get_running_loop()})
    server = served(m.registry)
    got = await asyncio.to_thread(_scrape, server.url)
    assert got[("lepton_raft_term", ())] == 7 and seen == [asyncio.get_running_loop()]


def test_port_zero_is_off():
    assert start_metrics_server("127.0.0.1", 0, CollectorRegistry()) is None
    with pytest.raises(ValueError):
        start_metrics_server("127.0.0.1", 70000, CollectorRegistry())


def test_attach_twice_is_an_error():
    m = CoordinatorMetrics()
    m.attach()
    with pytest.raises(RuntimeError):
        m.attach()
