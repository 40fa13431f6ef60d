"""The state machine moves tasks only as lepton.common.states.TASK_MOVES says.

Random walks of commands (tasks, gangs, plans with preemptions, starts, exits, agents
stopping, cancels, nodes going down, lost, leaving and coming back) through a real
ClusterStateMachine; a listener checks every move a task makes.
"""

from __future__ import annotations

import random

import pytest

from lepton.common.states import TASK_MOVES, NodeState, TaskState
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, state_pb2, tasks_pb2

NODES = ("a", "b", "c")
STARTED, EXITED = tasks_pb2.TaskEvent.KIND_STARTED, tasks_pb2.TaskEvent.KIND_EXITED


class Walk:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.sm = ClusterStateMachine()
        self.index = 0
        self.seen: dict[str, TaskState] = {}
        self.moves: set[tuple[TaskState | None, TaskState]] = set()
        self.sm.tasks.listeners.append(self.check)
        for n in NODES:
            self.register(n)

    def check(self, task: tasks_pb2.Task, old_node: str) -> None:
        before, after = self.seen.get(task.id), TaskState.from_proto(task.state)
        if before is None:
            assert after == TaskState.PENDING, f"{task.id} born {after.value}"
        else:
            assert after in TASK_MOVES[before], f"{task.id}: {before.value} -> {after.value}"
        self.moves.add((before, after))
        self.seen[task.id] = after

    def apply(self, **op: object) -> object:
        self.index += 1
        cmd = state_pb2.Command(at_ms=self.index, **op)
        return self.sm.apply(self.index, cmd.SerializeToString())

    def register(self, n: str) -> None:
        self.apply(register_node=state_pb2.RegisterNodeCmd(
            node_id=n, name=n, address=f"10.0.0.{ord(n)}:7070",
            capacity=common_pb2.Capacity(cpu_logical=8, memory_bytes=1 << 30)))

    def tasks(self, *states: TaskState) -> list[tasks_pb2.Task]:
        wanted = {s.proto for s in states}
        return [t for _, t in sorted(self.sm.tasks.tasks.items()) if t.state in wanted]

    def ready(self) -> list[str]:
        return [n for n in NODES if self.sm.nodes[n].state == NodeState.READY.proto]

    # -- steps -------------------------------------------------------------------------
    def submit(self) -> None:
        spec = tasks_pb2.TaskSpec(argv=["x"], max_retries=self.rng.randint(0, 2))
        self.apply(submit_task=state_pb2.SubmitTaskCmd(task_id=f"t{self.index}", spec=spec))

    def submit_job(self) -> None:
        spec = tasks_pb2.TaskSpec(argv=["x"], max_restarts=self.rng.randint(0, 1))
        self.apply(submit_job=state_pb2.SubmitJobCmd(job_id=f"j{self.index}", spec=spec, nodes=2))

    def plan(self) -> None:
        pending, ready = self.tasks(TaskState.PENDING), self.ready()
        if not pending or not ready:
            return
        task = self.rng.choice(pending)
        group = [t for t in pending if task.spec.job_id and t.spec.job_id == task.spec.job_id] or [task]
        if len(group) > len(ready):
            return
        nodes = self.rng.sample(ready, len(group))
        holding = self.tasks(TaskState.ASSIGNED, TaskState.RUNNING)
        victims = self.rng.sample(holding, min(len(holding), self.rng.randint(0, 1)))
        self.apply(apply_plan=state_pb2.ApplyPlanCmd(
            term=1,
            placements=[state_pb2.PlacementCmd(task_id=t.id, attempt=t.attempt, node_id=n)
                        for t, n in zip(group, nodes, strict=True)],
            preemptions=[state_pb2.PreemptionCmd(task_id=v.id, attempt=v.attempt, for_task_id=task.id)
                         for v in victims]))

    def report(self) -> None:
        on_node = self.tasks(TaskState.ASSIGNED, TaskState.RUNNING, TaskState.PREEMPTED)
        if not on_node:
            return
        t = self.rng.choice(on_node)
        kind = self.rng.choice([STARTED, EXITED, EXITED])
        self.apply(task_event=state_pb2.TaskEventCmd(node_id=t.node_id, event=tasks_pb2.TaskEvent(
            task_id=t.id, attempt=t.attempt, kind=kind, exit_code=self.rng.choice([0, 1, -9]),
            requeue=self.rng.random() < 0.2)))

    def cancel(self) -> None:
        live = self.tasks(TaskState.PENDING, TaskState.ASSIGNED, TaskState.RUNNING, TaskState.PREEMPTED)
        if live:
            self.apply(cancel_task=state_pb2.CancelTaskCmd(task_id=self.rng.choice(live).id))

    def node(self) -> None:
        n = self.rng.choice(NODES)
        state = NodeState.from_proto(self.sm.nodes[n].state)
        if state == NodeState.READY:
            to = self.rng.choice([NodeState.SUSPECT, NodeState.LEFT])
        elif state == NodeState.SUSPECT:
            to = self.rng.choice([NodeState.DOWN, NodeState.READY])
        elif state == NodeState.DOWN:
            self.apply(node_lost=state_pb2.NodeLostCmd(node_id=n, reason="node_lost"))
            return
        else:
            self.register(n)
            return
        self.apply(set_node_state=state_pb2.SetNodeStateCmd(node_id=n, state=to.proto, reason="walk"))

    def step(self) -> None:
        self.rng.choices(
            [self.submit, self.submit_job, self.plan, self.report, self.cancel, self.node],
            weights=[3, 1, 5, 6, 1, 1])[0]()


@pytest.mark.parametrize("seed", range(40))
def test_every_move_is_in_the_table(seed: int) -> None:
    walk = Walk(seed)
    for _ in range(300):
        walk.step()
    assert len(walk.moves) > 5  # the walk went somewhere


def test_the_walks_reach_every_move_in_the_table() -> None:
    """Else the table lists a move the state machine never makes (or the walk is too narrow)."""
    moves: set[tuple[TaskState | None, TaskState]] = set()
    for seed in range(40):
        walk = Walk(seed)
        for _ in range(300):
            walk.step()
        moves |= walk.moves
    listed = {(a, b) for a, targets in TASK_MOVES.items() for b in targets}
    assert listed - moves == set()
