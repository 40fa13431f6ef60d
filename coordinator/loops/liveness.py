"""Node liveness: heartbeats are leader-local soft state; only transitions are commands.

5,000 agents at 1 Hz are 5,000 dictionary writes a second here, not 5,000 log entries.
A new leader starts with empty timers. A node it has not heard from yet is given the
failover grace (`common.failover.failover_grace_s`: the time an agent needs to notice a
frozen leader and find the new one, or the configured grace if longer) before it may be
suspected or declared down. The leader never suspects its own node. A cycle that would
declare down more than `MASS_DOWN_FRACTION` of the nodes at once says more about the
leader (paused, cut off) than about them: it waits one grace instead. A loop that stalled
itself (SIGSTOP, a long GC) restarts its timers the same way.

Marking a node down does not end its attempts: each runs under a lease its agent renews
with every answer from the leader, and kills itself when the lease runs out. The leader
commits `NodeLostCmd` (requeue the node's attempts) only `fence_wait_s` after marking the
node down, when every attempt there is dead whatever happened to its agent.

The loop sleeps until something can be due (`next_due`: the soonest moment a node could
turn suspect or down, a held mass down or a fence wait end), woken early by node changes
and leadership, and at least every `IDLE_WAKE_S`: an idle leader does not poll. Heartbeats
do not wake it; a beat only moves its node's deadline later.

The heartbeat budget (Nomad's `max_heartbeats_per_second`): the leader hands every agent
`interval = max(heartbeat_interval_s, live_nodes / max_heartbeats_per_s)`, so its
heartbeat cost stays bounded as the cluster grows, and stretches the suspect/down
thresholds by the same factor, so a node is never suspected for beating as slowly as it
was told to.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lepton.common.errors import FailedPrecondition, NotFound
from lepton.common.failover import failover_grace_s, fence_wait_s
from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState
from lepton.v1 import common_pb2, state_pb2

logger = logging.getLogger(__name__)

Propose = Callable[[state_pb2.Command], Awaitable[object]]


# The factor moves in steps of a twentieth (50 ms at a 1 s base; rounded up: still within
# budget), so each node joining or leaving a large cluster does not change every agent's
# interval (each change costs an extra answer per stream and a hold of the thresholds).
FACTOR_STEPS = 20
# A cycle that would declare down more than this share of the watched nodes (and more than
# one) waits one grace first: that many silent at once is most likely the leader's problem.
MASS_DOWN_FRACTION = 0.5
# Waking this many cycle intervals (and half suspect_after) past the moment the loop meant
# to means this loop, not the nodes, was stopped (SIGSTOP, a long GC): every node looks as
# silent as it was.
STALL_CYCLES = 5
# With nothing due (no other node, not the leader), the loop still cycles this often: a
# guard against a missed wake-up, not a poll.
IDLE_WAKE_S = 10.0


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

    @property
    def held_until(self) -> float:
        """When the thresholds drop to the current factor (-inf: not held)."""
        return self._held_until

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
    """Tracks heartbeats on the leader and proposes READY/SUSPECT/DOWN transitions, and
    the requeue of a down node's attempts once they have fenced themselves."""

    def __init__(
        self,
        state: ClusterStateMachine,
        propose: Propose,
        timings: LivenessTimings,
        *,
        monotonic: Callable[[], float],
        wall_ms: Callable[[], int],
        on_heartbeat: Callable[[str, float | None], None] | None = None,
        self_id: str = "",
        cycle_interval_s: float = 0.0,
    ):
        self._state = state
        # Told each accepted heartbeat's node id and the seconds since that node's previous
        # one this leadership (None: its first), for metrics; a callback keeps this module
        # free of Prometheus. Settable after construction.
        self.on_heartbeat = on_heartbeat
        self._propose = propose
        self._timings = timings
        self._monotonic = monotonic
        self._wall_ms = wall_ms
        self._self_id = self_id  # this voter's own node: its agent may beat at the old leader
        # The least time between cycles (a burst of node changes is one cycle); 0: unknown
        # (tests calling run_cycle themselves), no stall detection.
        self._cycle_interval_s = cycle_interval_s
        self._seen: dict[str, _Seen] = {}
        self._leader = False
        self._since = monotonic()  # when the timers (re)started; silence counts from here
        self._last_cycle = 0.0  # monotonic time of the last cycle; 0: none this leadership
        self.wake_at = 0.0  # when the loop next cycles unless woken (set by each cycle)
        self.cycles = 0  # run() cycles, for tests: an idle leader's count stays small
        self._wakeup = asyncio.Event()  # a node changed or leadership moved: cycle soon
        state.add_listener(lambda _change: self.wake())
        self._hold_until = -math.inf  # a mass down is waiting until then
        self._held = False  # the current run of mass-down cycles has had its wait
        # Down nodes with attempts on them -> when the fence wait started (this leadership).
        self._down_at: dict[str, float] = {}
        self.budget = HeartbeatBudget(timings)
        # What the API hands agents (RegisterNode, heartbeat answers); an attribute because
        # the heartbeat stream reads it on every beat.
        self.interval_ms = _ms(self.budget.interval_s)

    def on_leadership(self, is_leader: bool, term: int) -> None:
        """Soft state belongs to one leadership: forget it on every change."""
        self._leader = is_leader
        self._restart_timers()
        self._down_at.clear()
        self.budget.reset(self._live_nodes())
        self.interval_ms = _ms(self.budget.interval_s)
        logger.info("liveness: %s in term %d; timers reset; heartbeat interval %.2fs, failover grace %.1fs",
                    "leading" if is_leader else "following", term, self.budget.interval_s, self.grace_s(1.0))
        self.wake()

    def wake(self) -> None:
        """Something may have changed what is due (a node joined, left or changed state;
        leadership moved): cycle soon, not at the deadline computed before."""
        self._wakeup.set()

    def _restart_timers(self) -> None:
        self._seen.clear()
        self._since = self._monotonic()
        self._last_cycle = 0.0
        self._hold_until, self._held = -math.inf, False

    def grace_s(self, factor: float) -> float:
        """The failover grace for agents beating every `factor` base intervals: what an agent
        needs to leave a frozen leader and reach this one (common.failover), or the
        configured grace when that is longer."""
        derived = failover_grace_s(self._timings.heartbeat_interval_s * factor)
        return max(derived, self._timings.failover_grace_s * factor)

    def fence_wait_s(self, factor: float) -> float:
        """How long after marking a node down its attempts are requeued (common.failover)."""
        return fence_wait_s(self._timings.heartbeat_interval_s * factor)

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
        previous = self._seen.get(node_id)
        now = self._monotonic()
        self._seen[node_id] = _Seen(now, self._wall_ms(), usage)
        if self.on_heartbeat is not None:
            self.on_heartbeat(node_id, now - previous.at if previous else None)
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
        """Read the node table, decide who went silent, commit the transitions, and requeue
        the attempts of nodes down for longer than the fence wait.

        Returns a short sentence saying what it did; it is logged and asserted in tests.
        """
        if not self._leader:
            self.wake_at = self._monotonic() + IDLE_WAKE_S  # leadership wakes the loop
            return "not the leader: nothing to check"
        now = self._monotonic()
        factor = self.budget.threshold_factor(now)
        suspect_after, down_after = scaled_thresholds(self._timings, factor)
        grace = self.grace_s(factor)
        stall_after = max(STALL_CYCLES * self._cycle_interval_s, suspect_after / 2)
        if self._cycle_interval_s and self._last_cycle and now - self.wake_at > stall_after:
            # Every node looks silent for as long as this loop did not run: not their fault.
            logger.warning("liveness: this leader's own loop stalled for %.1fs; timers restart "
                           "with a %.1fs grace", now - self.wake_at, grace)
            self._restart_timers()
            now = self._since
        self._last_cycle = now
        # A node not heard from since the timers started is counted as if its last beat came
        # down_after before the grace ends: suspect shortly before, down no earlier.
        unseen_since = self._since + grace - down_after
        in_grace = now < self._since + grace
        suspects: list[str] = []
        due: list[common_pb2.Node] = []  # suspects silent for down_after
        live = 0
        waiting = 0  # suspect, but not (yet) due to be declared down
        me = 0  # 1 when this leader's own node is among the live
        for node in list(self._state.nodes.values()):
            state = NodeState.from_proto(node.state)
            if state in (NodeState.LEFT, NodeState.DOWN):
                continue
            if node.id == self._self_id:  # this leader is alive by definition
                live += 1
                me = 1
                continue
            seen = self._seen.get(node.id)
            silent = now - (seen.at if seen else unseen_since)
            if state == NodeState.SUSPECT and silent >= down_after:
                due.append(node)
            elif state == NodeState.READY and silent >= suspect_after:
                await self._transition(node, NodeState.SUSPECT, f"no heartbeat for {silent:.1f}s")
                suspects.append(node.name or node.id)
            elif state == NodeState.SUSPECT:
                waiting += 1
            else:
                live += 1
        beating = live + waiting + len(suspects) + len(due)
        downs = await self._mark_down(due, beating - me, now, grace, down_after)
        waiting += len(due) - len(downs)
        requeued = await self._requeue_lost(now, factor)
        # After the decisions: a larger factor reaches the thresholds (here, now) before any
        # agent hears of the longer interval (answers read interval_ms); a smaller one is
        # held by the budget for a grace period.
        if self.budget.update(beating - len(downs), now):
            self.interval_ms = _ms(self.budget.interval_s)
            logger.info("liveness: %d live nodes; heartbeat interval now %.2fs (budget %g/s)",
                        beating - len(downs), self.budget.interval_s, self._timings.max_heartbeats_per_s)
        self.wake_at = max(min(self.next_due(now), now + IDLE_WAKE_S), now + self._cycle_interval_s)
        if not suspects and not downs and not requeued:
            sentence = f"{live} nodes heartbeating"
            if waiting:
                sentence += f", {waiting} suspect"
            if now < self._hold_until:
                sentence += " (mass down: waiting)"
            return sentence + (" (failover grace)" if in_grace else "")
        parts = []
        if suspects:
            parts.append(f"suspect: {', '.join(suspects)}")
        if downs:
            parts.append(f"down: {', '.join(downs)}")
        if requeued:
            parts.append(f"requeued the attempts of: {', '.join(requeued)}")
        return "marked " + "; ".join(parts) if suspects or downs else "; ".join(parts)

    def next_due(self, now: float) -> float:
        """The soonest moment a cycle may have something to decide, unless a node changes or
        leadership moves first (those wake the loop): a READY node's suspect deadline, a
        SUSPECT one's down deadline (not before a held mass down ends), the end of the
        budget's hold on the thresholds, a down node's fence wait. inf: nothing pending (a
        follower; a leader alone). A beat only moves its node's deadline later, so a
        deadline passed in a cycle that finds the node heard from is harmless."""
        if not self._leader:
            return math.inf
        factor = self.budget.threshold_factor(now)
        suspect_after, down_after = scaled_thresholds(self._timings, factor)
        unseen_since = self._since + self.grace_s(factor) - down_after  # as in run_cycle
        due = [self.budget.held_until] if self.budget.held_until > now else []
        tasks_on = self._state.tasks.by_node
        for node in self._state.nodes.values():
            if node.id == self._self_id:
                continue
            if node.state in (NodeState.READY.proto, NodeState.SUSPECT.proto):
                seen = self._seen.get(node.id)
                last = seen.at if seen else unseen_since
                if node.state == NodeState.READY.proto:
                    due.append(last + suspect_after)
                else:
                    due.append(max(last + down_after, self._hold_until))
            elif node.state == NodeState.DOWN.proto and tasks_on.get(node.id):
                due.append(self._down_at.get(node.id, now) + self.fence_wait_s(factor))
        return min(due, default=math.inf)

    async def run(self) -> None:
        """Cycle whenever something may be due (`wake_at`, set by each cycle from
        `next_due`), or soon after `wake()`: never twice within the cycle interval. Each
        new sentence is logged once."""
        last = ""
        while True:
            await self._sleep_until_due()
            self._wakeup.clear()  # a change during the cycle wakes the next one
            self.cycles += 1
            try:
                sentence = await self.run_cycle()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("liveness cycle failed")
                self.wake_at = self._monotonic() + max(self._cycle_interval_s, 1.0)
                continue
            if sentence != last:
                logger.info("liveness: %s", sentence)
                last = sentence

    async def _sleep_until_due(self) -> None:
        while (delay := self.wake_at - self._monotonic()) > 0:
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except asyncio.TimeoutError:
                return
            # Woken: due now, but a burst of changes waits out the cycle interval together.
            # Never in the past: the stall check measures lateness from it.
            now = self._monotonic()
            self.wake_at = max(now, min(self.wake_at, self._last_cycle + self._cycle_interval_s))
            if now < self.wake_at:
                self._wakeup.clear()

    async def _mark_down(self, due: list[common_pb2.Node], watched: int, now: float, grace: float,
                         down_after: float) -> list[str]:
        """Declare `due` down, unless that is more than MASS_DOWN_FRACTION of the `watched`
        nodes at once: then wait one grace first (once per run of such cycles)."""
        if not due:
            self._held = False
            return []
        if now < self._hold_until:
            return []
        limit = max(1, int(MASS_DOWN_FRACTION * watched))
        if len(due) > limit:
            if not self._held:
                self._held, self._hold_until = True, now + grace
                logger.warning("liveness: %d of %d nodes silent for %.1fs at once: more likely this "
                               "leader's problem than theirs; waiting %.1fs before declaring any down",
                               len(due), watched, down_after, grace)
                return []
            logger.warning("liveness: %d of %d nodes still silent after waiting; declaring them down",
                           len(due), watched)
        else:
            self._held = False
        downs = []
        for node in due:
            silent = now - (self._seen[node.id].at if node.id in self._seen else self._since)
            if await self._transition(node, NodeState.DOWN, f"no heartbeat for {silent:.1f}s"):
                self._down_at[node.id] = now
            downs.append(node.name or node.id)
        return downs

    async def _requeue_lost(self, now: float, factor: float) -> list[str]:
        """Commit NodeLostCmd for each node down (with attempts on it) for the fence wait: by
        then every attempt there has killed itself, so a replacement never overlaps it."""
        wait = self.fence_wait_s(factor)
        tasks_on = self._state.tasks.by_node
        requeued = []
        for node in list(self._state.nodes.values()):
            if node.state != NodeState.DOWN.proto or not tasks_on.get(node.id):
                self._down_at.pop(node.id, None)
                continue
            # Down before this leadership: the wait starts now (when it began is unknown here).
            since = self._down_at.setdefault(node.id, now)
            if now - since < wait:
                continue
            cmd = state_pb2.Command(node_lost=state_pb2.NodeLostCmd(
                node_id=node.id, reason=f"node_lost: down for {now - since:.0f}s"))
            try:
                await self._propose(cmd)
            except FailedPrecondition as err:  # it came back meanwhile: its attempts live on
                logger.info("node %s: %s", node.id, err)
                continue
            self._down_at.pop(node.id, None)
            logger.warning("node %s (%s) down for %.1fs (past the attempts' lease): its attempts "
                           "are requeued", node.name, node.id, now - since)
            requeued.append(node.name or node.id)
        return requeued

    async def _transition(self, node: common_pb2.Node, state: NodeState, reason: str) -> bool:
        cmd = state_pb2.Command(
            set_node_state=state_pb2.SetNodeStateCmd(node_id=node.id, state=state.proto, reason=reason)
        )
        try:
            await self._propose(cmd)
        except FailedPrecondition as err:  # it left or re-registered meanwhile: nothing to do
            logger.info("node %s: %s", node.id, err)
            return False
        logger.warning("node %s (%s) is %s: %s", node.name, node.id, state.value, reason)
        return True


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
