"""What one WatchAssignments stream sends: a node's whole assignment set, then its changes.

The stream remembers what the agent was sent (task id -> attempt). A whole set, sent first
and again whenever a delta cannot be (a new term, a change log the stream fell behind, an
agent that did not ask for deltas), resets that memory. A delta looks only at the task ids
the hub says changed on the node: an attempt the node should now run and was not sent goes
in `assignments`; one it was sent and should no longer run goes in `removed`; a change that
moves neither (an attempt that went from assigned to running) sends nothing. So a task's
state change costs O(1) here, not O(tasks on the node).
"""

from __future__ import annotations

from lepton.common import validation as v
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.coordinator.state.tasks import HOLDING
from lepton.v1 import tasks_pb2


def assignment(state: ClusterStateMachine, t: tasks_pb2.Task) -> tasks_pb2.Assignment:
    return tasks_pb2.Assignment(
        task_id=t.id, attempt=t.attempt, spec=t.spec, gpu_indices=list(t.gpu_indices),
        term=t.assigned_term, restart_count=t.restart_count, master_addr=t.master_addr,
        master_port=t.master_port, task_token=state.security.task_token(t),
    )


class AssignmentStream:
    """The messages of one node's stream, numbered (`AssignmentSet.version`)."""

    def __init__(self, state: ClusterStateMachine, node_id: str) -> None:
        self._state = state
        self._node_id = node_id
        self._sent: dict[str, int] = {}  # task id -> the attempt the agent was sent
        self.version = 0
        self.term = 0  # of the last whole set

    def whole(self, term: int) -> list[tasks_pb2.AssignmentSet]:
        """The node's whole set, in chunks when large (one version for all of them)."""
        holding = [t for t in self._state.tasks.on_node(self._node_id) if t.state in HOLDING]
        self._sent = {t.id: t.attempt for t in holding}
        self.version += 1
        self.term = term
        sets = [assignment(self._state, t) for t in holding]
        # In chunks when large: the set may exceed any single message (issue 14).
        chunks = v.batches_by_size(sets, v.ASSIGNMENT_CHUNK_BYTES) or [[]]
        return [
            tasks_pb2.AssignmentSet(term=term, assignments=chunk, more=k < len(chunks) - 1,
                                    version=self.version)
            for k, chunk in enumerate(chunks)
        ]

    def delta(self, term: int, task_ids: list[str]) -> list[tasks_pb2.AssignmentSet]:
        """What changed among `task_ids` since the last message: none when nothing the agent
        acts on did; several deltas (each a version) when too large for one message."""
        tasks = self._state.tasks.tasks
        added: list[tasks_pb2.Assignment] = []
        removed: list[tasks_pb2.AssignmentRemoval] = []
        for task_id in task_ids:
            t = tasks.get(task_id)
            wanted = t.attempt if t is not None and t.node_id == self._node_id and t.state in HOLDING else None
            was = self._sent.get(task_id)
            if wanted == was:
                continue
            if was is not None:
                removed.append(tasks_pb2.AssignmentRemoval(task_id=task_id, attempt=was))
                del self._sent[task_id]
            if wanted is not None:
                added.append(assignment(self._state, t))
                self._sent[task_id] = wanted
        if not added and not removed:
            return []
        out = []
        # Removals are small: all in the first message. Each message applies on its own.
        for k, chunk in enumerate(v.batches_by_size(added, v.ASSIGNMENT_CHUNK_BYTES) or [[]]):
            self.version += 1
            out.append(tasks_pb2.AssignmentSet(term=term, assignments=chunk, version=self.version, delta=True,
                                               removed=removed if k == 0 else []))
        return out

    def held(self) -> int:
        """Attempts the agent was last told to run."""
        return len(self._sent)
