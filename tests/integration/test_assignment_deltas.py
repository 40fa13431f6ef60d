"""Issue 15, assignments by change, end to end: a real agent holding many tasks gets its
whole set once, then each task's change as a delta of its own (counted by the leader's
metrics, not timed), and acts on them: what is removed stops. After a failover the worker
gets the new leader's whole set, keeps what runs, and follows the deltas after it."""

from __future__ import annotations

import re

import psutil
import pytest

from lepton.client import Client
from tests.integration.cluster import free_port, leader_of, servers, start_voters, wait_until
from tests.integration.test_metrics import scrape

pytestmark = pytest.mark.integration

HELD = 150


def test_a_node_holding_many_tasks_gets_changes_not_its_whole_set(agents):
    port = free_port()
    node = agents("solo", "--metrics-listen", f"127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/metrics"
    with Client(node.address) as c:
        tasks = c.submit_many([{"argv": ["sleep", "600"], "cpu": 0}] * HELD)
        wait_until(lambda: len(c.tasks(states=["running"])) == HELD, timeout=180, what="all running")
        wait_until(lambda: scrape(url)["lepton_agent_tasks_running"] == HELD, timeout=60, what="all started")
        # One at a time: each cancel is a change of one task on a node holding up to HELD.
        for t in tasks:
            c.cancel(t.id)
        wait_until(lambda: scrape(url)["lepton_agent_tasks_running"] == 0, timeout=180, what="all stopped")
        assert {t.state for t in c.tasks()} == {"cancelled"}
    m = scrape(url)
    whole = m["lepton_assignment_sets_sent_total{kind=whole}"]
    deltas = m["lepton_assignment_sets_sent_total{kind=delta}"]
    entries = m["lepton_assignments_sent_total"]
    # Whole sets: one per stream (a reconnect under load may add one); whole sets on every
    # change would be hundreds. Every task came in once and went out once, plus what whole
    # sets carried (at most HELD each): O(changes), where whole sets would be O(HELD^2).
    assert 1 <= whole < HELD / 10
    assert deltas >= 2  # at least the starts and the cancels (changes close together share one)
    assert entries <= 2 * HELD + whole * HELD
    print(f"{HELD} held: {whole:g} whole sets, {deltas:g} deltas, {entries:g} assignments sent")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_after_a_failover_the_worker_reconciles_a_whole_set_then_follows_deltas(agents, tmp_path):
    voters = start_voters(agents)
    worker = agents("worker", "--join", servers(voters), "--labels", "pool=work")
    with Client(servers(voters), timeout=20) as c:
        wait_until(lambda: c.cluster_status().leader, what="a leader")
        wait_until(lambda: any(n.name == "worker" and n.state == "ready" for n in c.nodes()), what="the worker")

        def sleeper(name: str) -> dict:
            # Each start appends a line; the pid is the sleep's (exec keeps it).
            return {"shell": f"echo $$ >> {tmp_path / name}; exec sleep 600", "constraints": {"pool": "work"}}

        ids = [t.id for t in c.submit_many([sleeper(f"s{i}") for i in range(4)])]
        wait_until(lambda: all(c.get(i).state == "running" for i in ids), timeout=60, what="all running")
        pids = [int(wait_until(lambda i=i: (tmp_path / f"s{i}").read_text().split(), what="pid")[0])
                for i in range(4)]
        old = leader_of(c, voters)
        old_term = c.cluster_status().term
        old.kill9()
        new = wait_until(lambda: (s := c.cluster_status()).leader not in ("", old.address) and s,
                         what="a new leader")
        # The worker's new stream starts with the whole set of the new term: it keeps what runs.
        def whole_set_terms() -> list[int]:
            return [int(t) for t in re.findall(r"assignments \(term (\d+), whole set\)",
                                                  worker.log_path.read_text(errors="replace"))]

        wait_until(lambda: max(whole_set_terms(), default=0) > old_term, timeout=60, what="a new term's whole set")
        assert new.term > old_term
        # Then changes: two cancelled stop, a new task starts, the others run on, started once.
        for i in ids[:2]:
            c.cancel(i)
        extra = c.submit(**sleeper("s4"))
        wait_until(lambda: c.get(extra.id).state == "running", timeout=60, what="the new task running")
        wait_until(lambda: not alive(pids[0]) and not alive(pids[1]), timeout=60, what="the cancelled stopped")
        assert alive(pids[2]) and alive(pids[3])
        # "running" comes when the attempt starts; its shell writes the pid a moment later.
        wait_until(lambda: (tmp_path / "s4").exists() and (tmp_path / "s4").read_text().split(),
                   what="the new task's pid")
        assert [len((tmp_path / f"s{i}").read_text().split()) for i in range(5)] == [1] * 5
        assert [c.get(i).attempt for i in ids[2:]] == [1, 1]
        for i in [*ids[2:], extra.id]:
            c.cancel(i)
