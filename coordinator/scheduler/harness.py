"""In-memory cluster for exercising `schedule` (after Nomad's scheduler Harness).

It plays the leader's part without Raft: keeps nodes, running allocations and the
pending queue, builds snapshots, records every Plan, and applies plans the way the
leader will (bind placements, evict and requeue victims).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from .placement import schedule
from .types import Allocation, ClusterSnapshot, NodeView, Plan, Policy, TaskRequest


class Harness:
    """Mutable cluster state plus a log of the plans `schedule` produced for it."""

    def __init__(
        self,
        nodes: Iterable[NodeView] = (),
        *,
        policy: Policy | None = None,
        now_ms: int = 0,
    ) -> None:
        self.policy = policy or Policy()
        self.now_ms = now_ms
        self.nodes: dict[str, NodeView] = {}
        self.running: dict[str, Allocation] = {}
        self.pending: dict[str, TaskRequest] = {}
        self.requests: dict[str, TaskRequest] = {}  # every request seen, to requeue victims
        self.plans: list[Plan] = []
        self.evicted: list[str] = []  # victims in eviction order, across all plans
        for n in nodes:
            self.add_node(n)

    # -- cluster edits ----------------------------------------------------------------

    def add_node(self, node: NodeView) -> None:
        """Add or replace a node; allocations listed on it become running tasks."""
        for a in node.allocations:
            self.running[a.task_id] = a
        self.nodes[node.node_id] = replace(node, allocations=())

    def set_schedulable(self, node_id: str, schedulable: bool) -> None:
        self.nodes[node_id] = replace(self.nodes[node_id], schedulable=schedulable)

    def seed(self, *allocations: Allocation) -> None:
        """Mark tasks as already running (not requeued if preempted, unless submitted)."""
        for a in allocations:
            self.running[a.task_id] = a

    def submit(self, *tasks: TaskRequest) -> None:
        for t in tasks:
            self.pending[t.task_id] = t
            self.requests[t.task_id] = t

    def finish(self, task_id: str) -> None:
        """A running task ended; its resources are free for the next pass."""
        del self.running[task_id]

    # -- scheduling -------------------------------------------------------------------

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot.from_tables(self.nodes.values(), self.running.values())

    def step(self, *, now_ms: int | None = None, apply: bool = True) -> Plan:
        """Run one scheduling pass over everything pending; record (and apply) its plan."""
        if now_ms is not None:
            self.now_ms = now_ms
        plan = schedule(self.snapshot(), list(self.pending.values()),
                        now_ms=self.now_ms, policy=self.policy)
        self.plans.append(plan)
        if apply:
            self.apply(plan)
        return plan

    def apply(self, plan: Plan) -> None:
        """Commit a plan as the leader would: evictions first, then bindings."""
        for p in plan.preemptions:
            self.running.pop(p.task_id, None)
            self.evicted.append(p.task_id)
            req = self.requests.get(p.task_id)
            if req is not None:
                self.pending[p.task_id] = req
        for p in plan.placements.values():
            t = self.pending.pop(p.task_id)
            self.running[p.task_id] = Allocation(
                p.task_id, p.node_id, t.priority, t.cpu_millis, t.memory_bytes,
                p.gpu_indices, t.gang_id, t.spread_group)

    # -- checks -----------------------------------------------------------------------

    def violations(self) -> list[str]:
        """Everything wrong with the current state: over-committed cpu, memory or GPU
        devices, unknown devices, GPUs below a request's memory floor. Empty is good."""
        out: list[str] = []
        cpu = dict.fromkeys(self.nodes, 0)
        mem = dict.fromkeys(self.nodes, 0)
        gpu_owner: dict[tuple[str, int], str] = {}
        for a in self.running.values():
            node = self.nodes.get(a.node_id)
            if node is None:
                out.append(f"{a.task_id} runs on unknown node {a.node_id}")
                continue
            cpu[a.node_id] += a.cpu_millis
            mem[a.node_id] += a.memory_bytes
            req = self.requests.get(a.task_id)
            if req is not None and len(a.gpu_indices) != req.gpus:
                out.append(f"{a.task_id} got {len(a.gpu_indices)} gpus, asked {req.gpus}")
            for d in a.gpu_indices:
                if d not in node.gpus:
                    out.append(f"{a.task_id} holds missing gpu {d} on {a.node_id}")
                elif req is not None and node.gpus[d] < req.gpu_memory_bytes:
                    out.append(f"{a.task_id} got gpu {d} below its memory floor")
                other = gpu_owner.setdefault((a.node_id, d), a.task_id)
                if other != a.task_id:
                    out.append(f"gpu {d} on {a.node_id} held by {other} and {a.task_id}")
        for nid, node in self.nodes.items():
            if cpu[nid] > node.cpu_millis:
                out.append(f"{nid} cpu over-committed: {cpu[nid]} > {node.cpu_millis}")
            if mem[nid] > node.memory_bytes:
                out.append(f"{nid} memory over-committed: {mem[nid]} > {node.memory_bytes}")
        return out
