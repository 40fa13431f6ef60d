"""Issue 15, assignments by change, end to end: a real agent holding many tasks gets its
whole set once, then each task's change as a delta of its own (counted by the leader's
metrics, not timed), and acts on them: what is removed stops."""

from __future__ import annotations

import pytest

from lepton.client import Client
from tests.integration.cluster import free_port, wait_until
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
