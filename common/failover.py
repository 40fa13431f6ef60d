"""How fast an agent leaves a silent leader, and what a new leader and a task owe to that.

Shared by both sides on purpose: the agent's link uses these numbers to notice a frozen
leader and find the next one; the leader derives from the same numbers the grace it gives
every node after a failover, and how long it waits after marking a node down before it
replaces the node's work (the attempts' self-fencing lease). One change here moves both.

All durations scale with the heartbeat interval the leader hands out (its heartbeat budget
stretches it in a large cluster), so pass the interval in force.
"""

from __future__ import annotations

# The leader answers every second beat on a heartbeat stream, and the first beat of a
# stream (and any change the agent acts on) at once.
ANSWER_EVERY_BEATS = 2
# An answer one interval later than due still counts (a busy leader, a slow beat).
ANSWER_SLACK_BEATS = 1
# Never less than this: a busy leader may answer late; don't flap below it.
MIN_ANSWER_DEADLINE_S = 2.0
# One try at an address while finding the new leader: open a stream, beat, read the answer
# (a voter that does not lead answers at once, naming the leader); the agent's loop looks
# again one interval later. At least this long on a loaded host.
MIN_TRY_S = 1.0
# The agent's retry backoff doubles from MIN to MAX (with jitter below it). Capped low so
# that finding the new leader stays within the grace below.
MIN_BACKOFF_S = 0.1
MAX_BACKOFF_S = 1.0
# Addresses an agent may try before it reaches the new leader: a voter that names the leader
# (or the leader itself), then the leader.
FIND_TRIES = 2
# The coordinator's wait past an attempt's lease before starting a replacement: the lease
# file is checked every second by the node's attempt fence (agent/tasks/fence.py), then SIGKILL; clocks on two hosts
# run at slightly different rates.
FENCE_CHECK_S = 1.0
FENCE_MARGIN_S = 2.0


def answer_deadline_s(interval_s: float) -> float:
    """Silence on an established stream after which the agent leaves that leader."""
    return max(MIN_ANSWER_DEADLINE_S, (ANSWER_EVERY_BEATS + ANSWER_SLACK_BEATS) * interval_s)


def try_s(interval_s: float) -> float:
    """One try at an address: the beat, its answer, and the loop's next look."""
    return max(MIN_TRY_S, interval_s)


def failover_grace_s(interval_s: float) -> float:
    """The time an agent needs, from the leader freezing, to beat at the new leader:

      detection  the answer deadline, plus one interval (the deadline is checked per beat)
      find       FIND_TRIES x (one full backoff + one try)
      + one interval for the first beat to reach the new leader.

    A new leader counts this from its election, which is after the freeze. Not covered: an
    agent that finds no voter knowing the leader and comes back to the frozen one pays
    another answer deadline; if that is most agents at once, the leader's mass-down wait
    (coordinator/loops/liveness.py) absorbs it. 9 s at the default 1 s interval.
    """
    detection = answer_deadline_s(interval_s) + interval_s
    find = FIND_TRIES * (MAX_BACKOFF_S + try_s(interval_s))
    return detection + find + interval_s


def attempt_lease_s(interval_s: float) -> float:
    """How long a task attempt may run without its agent hearing from the leader.

    An agent renews its attempts' lease on every answer from the leader. A failover silences
    the leader for at most the failover grace (then the agent beats at the new one, whose
    first answer comes at once); one more answer deadline keeps a slow failover from fencing
    work. 12 s at the default 1 s interval.
    """
    return failover_grace_s(interval_s) + answer_deadline_s(interval_s)


def fence_wait_s(interval_s: float) -> float:
    """How long the leader waits, after marking a node down, before it starts replacements
    for the node's attempts: by then each attempt whose agent lost the leader (killed, hung,
    partitioned) has been killed by its own watchdog."""
    return attempt_lease_s(interval_s) + FENCE_CHECK_S + FENCE_MARGIN_S
