"""A replica's node lost (issue 19): kill -9 of the agent hosting a replica; the serving loop
replaces that replica as soon as the node is declared down, on the node still alive, with a
new task (the lost one is drained and cancelled), instead of waiting for the node's attempts
to be requeued after their lease (the fence wait). The figures (kill -> down -> replacement
ready) are printed: run with -s to see them."""

from __future__ import annotations

import time

import pytest

from lepton.client import Client
from tests.integration.cluster import wait_until
from tests.integration.test_serving import (
    REPLICA_CPU,
    digits_model,
    ready_replicas,
    store_model,
    wait_ready,
)

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)  # replicas import torch: tens of seconds each on a loaded machine
def test_a_lost_nodes_replica_is_replaced_once_the_node_is_down(agents, tmp_path, tasks_exec_python):
    model, _rows = digits_model(tmp_path / "m.safetensors", seed=0, epochs=5)
    voter = agents("voter")
    worker = agents("worker", "--join", voter.address)
    with Client(voter.address, timeout=30) as c:
        wait_until(lambda: len(c.nodes(states=["ready"])) == 2, timeout=60, what="two ready nodes")
        store_model(c, "digits", model, copies=2)  # a copy on the survivor
        c.create_deployment("web", "digits", replicas=2, cpu=REPLICA_CPU)
        wait_ready(c, "web", 2, [voter, worker], "a replica on each node",
                   nodes=lambda on: on == {voter.node_id, worker.node_id})
        lost = next(r.task_id for r in ready_replicas(c, "web") if r.node_id == worker.node_id)

        killed_at = time.monotonic()
        worker.kill9()
        wait_until(lambda: c.node(worker.node_id).state == "down", timeout=60, what="the worker declared down")
        down_at = time.monotonic()
        wait_ready(c, "web", 2, [voter], "the lost replica replaced on the voter",
                   nodes=lambda on: on == {voter.node_id})
        ready_at = time.monotonic()
        # Replaced by a new task, the lost one drained and cancelled: not requeued once
        # its lease was surely over (the fence wait: the same task, much later).
        assert lost not in {r.task_id for r in ready_replicas(c, "web")}
        assert c.get(lost).state == "cancelled", c.get(lost)
        print(f"\nnode loss: kill -> down {down_at - killed_at:.1f}s, down -> replacement ready "
              f"{ready_at - down_at:.1f}s, kill -> ready {ready_at - killed_at:.1f}s")
