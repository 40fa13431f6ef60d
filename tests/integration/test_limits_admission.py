"""Issue 14c end to end on real agents: per-user quotas (set by an admin with lepton-ctl,
refusals naming the quota), the leader shedding a flood of submissions with a retry hint
that clients wait out to success, and a flood that marks no healthy node down."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from lepton.client import Client, ResourceExhausted
from tests.integration.cluster import run_ctl, servers, start_voters, wait_until
from tests.integration.test_auth import admin_token, ctl, new_token

pytestmark = pytest.mark.integration


def test_quota_refuses_a_user_over_it_naming_it(agents, tmp_path):
    voter = agents("voter", "--auth")
    srv = voter.address
    admin = admin_token(voter)
    alice = new_token(srv, admin, "user", "alice")
    bob = new_token(srv, admin, "user", "bob")

    denied = ctl(srv, alice, "quota", "set", "alice", "--pending-tasks", "1000")
    assert denied.returncode == 1 and "needs role admin" in denied.stderr  # admins only
    shown = json.loads(ctl(srv, admin, "-o", "json", "quota", "set", "alice", "--pending-tasks", "3",
                           "--tokens", "1", check=True).stdout)
    assert shown["pending_tasks"] == {"limit": 3, "used": 0}
    assert shown["tokens"] == {"limit": 1, "used": 1}  # the token made above

    nowhere = {"argv": ["true"], "constraints": {"pool": "none"}}
    with Client(srv, token=alice) as c:
        c.submit_many([nowhere] * 2)
        c.submit(**nowhere)  # the third fits
        with pytest.raises(ResourceExhausted, match='quota pending_tasks of user "alice" is 3: 3 pending'):
            c.submit(**nowhere)
        with pytest.raises(ResourceExhausted, match="this submission adds 2"):
            c.submit_many([nowhere] * 2)
    with Client(srv, token=bob) as c:
        c.submit_many([nowhere] * 5)  # bob has no quota

    again = ctl(srv, admin, "tokens", "create", "--role", "user", "--name", "alice")
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 1 and len(lines) == 1, again.stderr
    assert 'quota tokens of user "alice" is 1' in lines[0]

    # Datasets: refused at planning, before any shard is uploaded.
    ctl(srv, admin, "quota", "set", "alice", "--dataset-bytes", "1KiB", check=True)
    np.save(tmp_path / "big.npy", np.zeros((100, 4), dtype=np.float32))  # 1600 bytes of rows
    put = ctl(srv, alice, "data", "put", str(tmp_path / "big.npy"), "--name", "big", "--replicas", "1")
    lines = put.stderr.strip().splitlines()
    assert put.returncode == 1 and len(lines) == 1, put.stderr
    assert 'quota dataset_bytes of user "alice" is 1024' in lines[0]

    ctl(srv, admin, "quota", "set", "alice", "--pending-tasks", "unlimited", check=True)
    with Client(srv, token=alice) as c:
        c.submit(**nowhere)
    table = json.loads(ctl(srv, admin, "-o", "json", "quota", "show", check=True).stdout)
    assert table == [{"user": "alice", "pending_tasks": {"limit": None, "used": 4},
                      "dataset_bytes": {"limit": 1024, "used": 0}, "tokens": {"limit": 1, "used": 1}}]


class ShedCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "shed by" in record.getMessage():
            self.count += 1


def test_a_flood_is_shed_with_a_hint_and_clients_retry_to_success(agents):
    """With room for one batch in flight, parallel clients are shed and retry until all of
    their tasks are stored, each exactly once."""
    voter = agents("voter", "--max-submit-inflight", "50")
    shed = ShedCounter()
    log = logging.getLogger("lepton.client.client")
    old_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(shed)
    results: dict[int, list[str]] = {}

    def flood(i: int) -> None:
        with Client(voter.address, timeout=120) as c:
            tasks = c.submit_many([{"argv": ["true"], "constraints": {"pool": "none"}}] * 400, batch=50)
            results[i] = [t.id for t in tasks]

    try:
        threads = [threading.Thread(target=flood, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        log.removeHandler(shed)
        log.setLevel(old_level)
    ids = [i for r in results.values() for i in r]
    assert len(results) == 6 and len(ids) == len(set(ids)) == 2400
    assert shed.count > 0  # the leader shed, the clients waited and retried
    with Client(voter.address) as c:
        stored = c.tasks(states=["pending"])
    assert len(stored) == 2400  # nothing lost, nothing twice


def test_a_flood_marks_no_healthy_node_down(agents):
    """Production-like timings (1 s beats; suspect after 3 s, down after 5 s, elections
    after 2 s: a little above the defaults, so that a host shared with other test runs
    does not fail it) while 4 clients submit 20,000 tasks at once: every node stays ready,
    the leader stays. Without admission, 8 clients flooding 100,000 tasks moved the leader
    and marked nodes down at the defaults (benchmarks/burst.py --no-admission)."""
    voters = start_voters(agents, 3, "--heartbeat-interval", "1", "--suspect-after", "3",
                          "--down-after", "5", "--failover-grace", "5",
                          "--raft-heartbeat", "0.1", "--election-timeout", "2")
    srv = servers(voters)
    agents("worker", "--join", srv, "--heartbeat-interval", "1")
    with Client(srv) as c:
        wait_until(lambda: sum(n.state == "ready" for n in c.nodes()) == 4, timeout=60, what="4 nodes ready")
        term = c.cluster_status().term

    def flood() -> None:
        with Client(srv, timeout=300) as c:
            c.submit_many([{"argv": ["true"], "constraints": {"pool": "none"}}] * 5000)

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    with Client(srv) as c:
        assert c.cluster_status().term == term  # no election
        events = run_ctl("-o", "json", "nodes", "list", server=srv, check=True)
        assert all(n["state"] == "ready" for n in json.loads(events.stdout))
    for v in voters:
        text = v.log_path.read_text(errors="replace")
        assert " is suspect:" not in text and " is down:" not in text, v.name
