"""Node liveness: heartbeats are leader-local soft state; only transitions are commands.

5,000 agents at 1 Hz are 5,000 dictionary writes a second here, not 5,000 log entries.
A new leader starts with empty timers and gives every node `failover_grace_s` before it
may be declared down.

The heartbeat budget (Nomad's `max_heartbeats_per_second`): the leader hands every agent
`interval = max(heartbeat_interval_s, live_nodes / max_heartbeats_per_s)`, so its
heartbeat cost stays bounded as the cluster grows, and stretches the suspect/down
thresholds by the same factor, so a node is never suspected for beating as slowly as it
was told to.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lepton.common.errors import FailedPrecondition, NotFound
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState
from lepton.v1 import common_pb2, state_pb2

logger = logging.getLogger(__name__)

Propose = Callable[[state_pb2.Command], Awaitable[object]]


# The factor moves in steps of a twentieth (50 ms at a 1 s base; rounded up: still within
# budget), so each node joining or leaving a large cluster does not change every agent's
# interval (each change costs an extra answer per stream and a hold of the thresholds).
FACTOR_STEPS = 20


@dataclass(frozen=True, slots=True)
class LivenessTimings:
    suspect_after_s: float
    down_after_s: float
    failover_grace_s: float
    heartbeat_interval_s: float = 1.0  # the base interval, handed out while within budget
    max_heartbeats_per_s: float = math.inf  # the leader's budget; inf: never stretch


def budget_factor(live_nodes: int, heartbeat_interval_s: float, max_heartbeats_per_s: float) -> float:
    """How many base intervals each agent should wait between beats so that `live_nodes`
    agents send at most `max_heartbeats_per_s` beats a second: 1.0 while they fit.

    interval = heartbeat_interval_s * factor = max(heartbeat_interval_s,
    live_nodes / max_heartbeats_per_s), rounded up to a twentieth of the base interval.
    """
    need = live_nodes / (max_heartbeats_per_s * heartbeat_interval_s)
    if need <= 1.0:
        return 1.0
    return math.ceil(need * FACTOR_STEPS - 1e-9) / FACTOR_STEPS


def scaled_thresholds(timings: LivenessTimings, factor: float) -> tuple[float, float]:
    """(suspect_after_s, down_after_s) for agents told to beat every `factor` base intervals."""
    return timings.suspect_after_s * factor, timings.down_after_s * factor


class HeartbeatBudget:
    """The current factor, and the one thresholds use: after a change they keep the larger
    of the old and new factor for one grace period (the old down_after), the time agents
    need to hear the new interval and beat at it. Pure: the caller passes the clock."""

    def __init__(self, timings: LivenessTimings):
        self._timings = timings
        self.factor = 1.0
        self._held = 1.0  # the factor before the last change(s), honoured until _held_until
        self._held_until = -math.inf

    @property
    def interval_s(self) -> float:
        return self._timings.heartbeat_interval_s * self.factor

    def update(self, live_nodes: int, now: float) -> bool:
        """Recompute for `live_nodes` beating nodes; True when the interval changed."""
        factor = budget_factor(live_nodes, self._timings.heartbeat_interval_s,
                               self._timings.max_heartbeats_per_s)
        if factor == self.factor:
            return False
        held = self.threshold_factor(now)  # a change inside a grace keeps the larger one
        self._held = held
        self._held_until = now + held * self._timings.down_after_s
        self.factor = factor
        return True

    def threshold_factor(self, now: float) -> float:
        return max(self.factor, self._held) if now < self._held_until else self.factor

    def reset(self, live_nodes: int) -> None:
        """A new leadership: the factor of the node table, no grace (timers restart anyway,
        and agents already beat at what the previous leader computed from the same table)."""
        self.factor = budget_factor(live_nodes, self._timings.heartbeat_interval_s,
                                    self._timings.max_heartbeats_per_s)
        self._held, self._held_until = self.factor, -math.inf


@dataclass(slots=True)
class _Seen:
    at: float  # monotonic seconds
    wall_ms: int
    usage: common_pb2.Usage


class Liveness:
    """Tracks heartbeats on the leader and proposes READY/SUSPECT/DOWN transitions."""

    def __init__(
        self,
        state: ClusterStateMachine,
        propose: Propose,
        timings: LivenessTimings,
        *,
        monotonic: Callable[[], float],
        wall_ms: Callable[[], int],
        on_heartbeat: Callable[[str], None] | None = None,
    ):
        self._state = state
        # Told each accepted heartbeat's node id (metrics); a callback keeps this module
        # free of Prometheus. Settable after construction.
        self.on_heartbeat = on_heartbeat
        self._propose = propose
        self._timings = timings
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._seen: dict[str, _Seen] = {}
        self._leader = False
        self._since = monotonic()  # when this node became leader; silence counts from here
        self.budget = HeartbeatBudget(timings)
        # What the API hands agents (RegisterNode, heartbeat answers); an attribute because
        # the heartbeat stream reads it on every beat.
        self.interval_ms = _ms(self.budget.interval_s)

    def on_leadership(self, is_leader: bool, term: int) -> None:
        """Soft state belongs to one leadership: forget it on every change."""
        self._leader = is_leader
        self._seen.clear()
        self._since = self._monotonic()
        self.budget.reset(self._live_nodes())
        self.interval_ms = _ms(self.budget.interval_s)
        logger.info("liveness: %s in term %d; timers reset; heartbeat interval %.2fs",
                    "leading" if is_leader else "following", term, self.budget.interval_s)

    def _live_nodes(self) -> int:
        """Nodes expected to heartbeat: ready or suspect (suspects still count, so a brief
        partition does not shrink everyone's interval and then grow it back)."""
        live = (NodeState.READY.proto, NodeState.SUSPECT.proto)
        return sum(1 for node in self._state.nodes.values() if node.state in live)

    def last_seen(self, node_id: str) -> tuple[int, common_pb2.Usage | None]:
        """(wall ms of the last heartbeat, its usage), or (0, None) if none since leading."""
        seen = self._seen.get(node_id)
        return (seen.wall_ms, seen.usage) if seen else (0, None)

    async def heartbeat(self, node_id: str, usage: common_pb2.Usage) -> common_pb2.Node:
        """Record a heartbeat; a suspect or down node comes back to READY (one command).

        Raises NotFound for a node the cluster does not know (it must register first).
        """
        node = self._state.nodes.get(node_id)
        if node is None:
            raise NotFound(f'node "{node_id}" is not registered')
        self._seen[node_id] = _Seen(self._monotonic(), self._wall_ms(), usage)
        if self.on_heartbeat is not None:
            self.on_heartbeat(node_id)
        state = NodeState.from_proto(node.state)
        if state in (NodeState.SUSPECT, NodeState.DOWN):
            cmd = state_pb2.Command(
                set_node_state=state_pb2.SetNodeStateCmd(
                    node_id=node_id, state=NodeState.READY.proto, reason="heartbeat resumed"
                )
            )
            await self._propose(cmd)
            logger.info("node %s (%s) is back: %s -> ready", node.name, node_id, state.value)
            return self._state.get_node(node_id)
        return node

    async def run_cycle(self) -> str:
        """Read the node table, decide who went silent, commit the transitions.

        Returns a short sentence saying what it did; it is logged and asserted in tests.
        """
        if not self._leader:
            return "not the leader: nothing to check"
        now = self._monotonic()
        factor = self.budget.threshold_factor(now)
        suspect_after, down_after = scaled_thresholds(self._timings, factor)
        # Scaled too: agents find a hung leader after 3.5 of their (stretched) intervals.
        in_grace = now - self._since < self._timings.failover_grace_s * factor
        suspects: list[str] = []
        downs: list[str] = []
        live = 0
        waiting = 0  # suspect, but not (yet) allowed or due to be declared down
        for node in list(self._state.nodes.values()):
            state = NodeState.from_proto(node.state)
            if state in (NodeState.LEFT, NodeState.DOWN):
                continue
            seen = self._seen.get(node.id)
            silent = now - (seen.at if seen else self._since)
            if state == NodeState.SUSPECT and silent >= down_after and not in_grace:
                await self._transition(node, NodeState.DOWN, f"no heartbeat for {silent:.1f}s")
                downs.append(node.name or node.id)
            elif state == NodeState.READY and silent >= suspect_after:
                await self._transition(node, NodeState.SUSPECT, f"no heartbeat for {silent:.1f}s")
                suspects.append(node.name or node.id)
            elif state == NodeState.SUSPECT:
                waiting += 1
            else:
                live += 1
        # After the decisions: a larger factor reaches the thresholds (here, now) before any
        # agent hears of the longer interval (answers read interval_ms); a smaller one is
        # held by the budget for a grace period.
        if self.budget.update(live + waiting + len(suspects), now):
            self.interval_ms = _ms(self.budget.interval_s)
            logger.info("liveness: %d live nodes; heartbeat interval now %.2fs (budget %g/s)",
                        live + waiting + len(suspects), self.budget.interval_s,
                        self._timings.max_heartbeats_per_s)
        if not suspects and not downs:
            sentence = f"{live} nodes heartbeating"
            if waiting:
                sentence += f", {waiting} suspect"
            return sentence + (" (failover grace)" if in_grace else "")
        parts = []
        if suspects:
            parts.append(f"suspect: {', '.join(suspects)}")
        if downs:
            parts.append(f"down: {', '.join(downs)}")
        return "marked " + "; ".join(parts)

    async def _transition(self, node: common_pb2.Node, state: NodeState, reason: str) -> None:
        cmd = state_pb2.Command(
            set_node_state=state_pb2.SetNodeStateCmd(node_id=node.id, state=state.proto, reason=reason)
        )
        try:
            await self._propose(cmd)
        except FailedPrecondition as err:  # it left or re-registered meanwhile: nothing to do
            logger.info("node %s: %s", node.id, err)
            return
        logger.warning("node %s (%s) is %s: %s", node.name, node.id, state.value, reason)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
