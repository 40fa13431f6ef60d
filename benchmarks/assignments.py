"""Assignments by change (issue 15): leader and agent CPU per task state change, by tasks held.

In one process, on a real state machine behind the real CoordinatorService: N tasks placed
and running on one node, one WatchAssignments stream open, then each task exits in turn
(one change each). The leader's time producing each message and the agent's time taking
it (DesiredSet, then a RunSpec per assignment, as the loop does before the runner) are
measured twice in the same run: with deltas (this agent) and with whole sets (what an agent
that does not ask for deltas gets: the old behaviour, the baseline). No processes, no
network: the runner's own spawn cost is benchmarks/tasks.py's.

Prints one JSON object: per N, per-change microseconds (leader, agent) and assignments sent
for both modes, and whole/delta CPU ratios. Flat per-change figures across N: O(1).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from lepton.agent.assignments import DesiredSet, run_spec  # noqa: E402
from lepton.coordinator.api.service import CoordinatorService  # noqa: E402
from lepton.coordinator.api.task_hub import TaskHub  # noqa: E402
from lepton.coordinator.state.state_machine import ClusterStateMachine  # noqa: E402
from lepton.v1 import common_pb2, coordinator_pb2, state_pb2, tasks_pb2  # noqa: E402


class OneNode:
    """A state machine with node n1, applying commands directly (no Raft)."""

    def __init__(self) -> None:
        self.sm = ClusterStateMachine()
        self.hub = TaskHub()
        self.sm.tasks.listeners.append(self.hub.on_task_change)
        self.index = 0

        async def no_barrier() -> None:
            return None

        self.svc = CoordinatorService(SimpleNamespace(
            state=self.sm, hub=self.hub, read=no_barrier, require_leader=lambda: None,
            consensus=SimpleNamespace(term=lambda: 1)))
        self.apply(register_node=state_pb2.RegisterNodeCmd(
            node_id="n1", name="n1", address="127.0.0.1:1", capacity=common_pb2.Capacity(cpu_logical=64)))

    def apply(self, **op) -> None:
        self.index += 1
        result = self.sm.apply(self.index, state_pb2.Command(at_ms=1000, **op).SerializeToString())
        if isinstance(result, Exception):
            raise result

    def event(self, task_id: str, kind: int) -> None:
        ev = tasks_pb2.TaskEvent(task_id=task_id, attempt=1, kind=kind, exit_code=0)
        self.apply(task_event=state_pb2.TaskEventCmd(node_id="n1", event=ev))


async def measure(n: int, deltas: bool) -> dict:
    node = OneNode()
    ids = [f"t-{i:06d}" for i in range(n)]
    for lo in range(0, n, 1000):
        batch = ids[lo:lo + 1000]
        node.apply(submit_tasks=state_pb2.SubmitTasksCmd(tasks=[
            state_pb2.SubmitTaskCmd(task_id=i, spec=tasks_pb2.TaskSpec(argv=["true"])) for i in batch]))
        node.apply(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
            state_pb2.PlacementCmd(task_id=i, attempt=1, node_id="n1") for i in batch]))
    for i in ids:
        node.event(i, tasks_pb2.TaskEvent.KIND_STARTED)
    watch = CoordinatorService.WatchAssignments.__wrapped__  # past the gRPC boundary
    stream = watch(node.svc, coordinator_pb2.WatchAssignmentsRequest(node_id="n1", deltas=deltas), None)
    desired = DesiredSet()
    out = {"leader_s": 0.0, "agent_s": 0.0, "messages": 0, "assignments_sent": 0}

    async def take_one() -> None:
        t0 = time.process_time()
        aset = await stream.__anext__()
        t1 = time.process_time()
        change = desired.add(aset)
        if change is not None:
            [run_spec(a, data_dir="/nonexistent") for a in change.assignments]
        out["leader_s"] += t1 - t0
        out["agent_s"] += time.process_time() - t1
        out["messages"] += 1
        out["assignments_sent"] += len(aset.assignments) + len(aset.removed)

    await take_one()  # the whole set: once per stream in both modes
    first = dict(out)
    for i in ids:
        node.event(i, tasks_pb2.TaskEvent.KIND_EXITED)
        await take_one()
    await stream.aclose()
    changes = {k: out[k] - first[k] for k in out}
    return {
        "leader_us_per_change": round(1e6 * changes["leader_s"] / n, 1),
        "agent_us_per_change": round(1e6 * changes["agent_s"] / n, 1),
        "assignments_sent_per_change": round(changes["assignments_sent"] / n, 1),
    }


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000", help="comma-separated tasks held (whole sets cost O(N^2) in all)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    doc: dict = {"sizes": sizes, "deltas": {}, "whole_sets": {}, "leader_whole_over_delta": {},
                 "agent_whole_over_delta": {}}
    for n in sizes:
        delta, whole = await measure(n, True), await measure(n, False)
        doc["deltas"][n], doc["whole_sets"][n] = delta, whole
        doc["leader_whole_over_delta"][n] = round(whole["leader_us_per_change"] / max(delta["leader_us_per_change"], 0.1), 1)
        doc["agent_whole_over_delta"][n] = round(whole["agent_us_per_change"] / max(delta["agent_us_per_change"], 0.1), 1)
    small, large = str(sizes[0]), str(sizes[-1])
    doc = {k: ({str(n): v for n, v in d.items()} if isinstance(d, dict) else d) for k, d in doc.items()}
    doc["delta_flatness"] = {  # per-change cost at the largest N over the smallest: ~1 is flat
        "leader": round(doc["deltas"][large]["leader_us_per_change"] / doc["deltas"][small]["leader_us_per_change"], 2),
        "agent": round(doc["deltas"][large]["agent_us_per_change"] / doc["deltas"][small]["agent_us_per_change"], 2),
    }
    emit(doc)


if __name__ == "__main__":
    asyncio.run(main())
