"""Choosing what to evict so that a pending task fits.

Rules (see also the package docstring):

* Only allocations with base priority strictly lower than the task's base priority
  are candidates; aging never buys the right to preempt.
* An allocation in a gang is evicted together with all its live gang mates, wherever
  they run (all-or-nothing both ways). A gang with any mate at or above the task's
  priority is not a candidate at all.
* Per node, eviction units are taken greedily: lowest priority first, then fewest
  tasks, then smallest cpu, memory and GPU footprint on that node, then task id. When
  they free enough, a pruning pass drops every unit (highest priority first) that
  turned out not to be needed. The result is a minimal set, not always the minimum one
  (that is a knapsack problem).
* Among nodes, the cheapest set wins, compared by: highest victim priority, then
  number of victims (gang mates included), then sum of victim priorities, then node id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._state import ClusterState
from .types import TaskRequest


@dataclass(slots=True)
class _Unit:
    order: tuple  # greedy sort key
    members: list[int]  # allocation indices, all nodes
    cpu: int  # freed on the target node
    mem: int
    slots: list[int]  # GPU slots held on the target node (with repeats per holder)


def find_victims(
    state: ClusterState, task: TaskRequest, static: np.ndarray, exclude: Sequence[int]
) -> tuple[int, list[int]] | None:
    """Best (node row, allocation indices to evict) for `task`, or None.

    `static` marks nodes that could hold the task if empty; `exclude` lists node rows
    that may not be used (a gang's nodes so far)."""
    p = task.priority
    elig = state.alive & (state.alloc_prio < p)
    if not elig.any():
        return None
    # Optimistic vector prefilter: free + every eligible allocation's resources.
    where = state.alloc_node[elig]
    n = state.n
    cand = static.copy()
    if task.cpu_millis:
        got = np.bincount(where, weights=state.alloc_cpu[elig], minlength=n)
        cand &= state.free_cpu + got >= task.cpu_millis
    if task.memory_bytes:
        got = np.bincount(where, weights=state.alloc_mem[elig], minlength=n)
        cand &= state.free_mem + got >= task.memory_bytes
    if task.gpus:
        got = np.bincount(where, weights=state.alloc_ngpu[elig], minlength=n)
        cand &= state.gpus_available(task.gpu_memory_bytes) + got >= task.gpus
    if len(exclude):
        cand[list(exclude)] = False

    best: tuple | None = None
    best_victims: list[int] = []
    for i in np.flatnonzero(cand).tolist():
        got = _plan_node(state, task, i, best)
        if got is not None and (best is None or got[0] < best):
            best, best_victims = got
    if best is None:
        return None
    return best[-1], best_victims


def _units(state: ClusterState, p: int, i: int) -> list[_Unit]:
    alive, prio, node = state.alive, state.alloc_prio, state.alloc_node
    units: list[_Unit] = []
    seen: set[str] = set()
    for k in state.allocs_on(i):
        if not alive[k] or prio[k] >= p:
            continue
        gang = state.allocs[k].gang_id
        if gang is None:
            members = [k]
        else:
            if gang in seen:
                continue
            seen.add(gang)
            members = [x for x in state.gang_allocs[gang] if alive[x]]
            if any(prio[x] >= p for x in members):
                continue  # evicting it would evict a mate we may not touch
        local = [x for x in members if node[x] == i]
        cpu = sum(int(state.alloc_cpu[x]) for x in local)
        mem = sum(int(state.alloc_mem[x]) for x in local)
        slots = [s for x in local for s in state.alloc_slots[x]]
        top = max(int(prio[x]) for x in members)
        first = min(state.allocs[x].task_id for x in members)
        units.append(_Unit((top, len(members), cpu, mem, len(slots), first),
                           members, cpu, mem, slots))
    units.sort(key=lambda u: u.order)
    return units


def _fits(state: ClusterState, task: TaskRequest, i: int, units: list[_Unit]) -> bool:
    if state.free_cpu[i] + sum(u.cpu for u in units) < task.cpu_millis:
        return False
    if state.free_mem[i] + sum(u.mem for u in units) < task.memory_bytes:
        return False
    if not task.gpus:
        return True
    hold = state.gpu_hold[i].copy()
    for u in units:
        for s in u.slots:
            hold[s] -= 1
    usable = (hold == 0) & state.gpu_mem_ok(task.gpu_memory_bytes)[i]
    return int(np.count_nonzero(usable)) >= task.gpus


def _plan_node(
    state: ClusterState, task: TaskRequest, i: int, best: tuple | None
) -> tuple[tuple, list[int]] | None:
    """Cheapest eviction set on node row `i` as (cost key, victims), or None when the
    node cannot be made to fit or cannot beat `best`."""
    chosen: list[_Unit] = []
    for u in _units(state, task.priority, i):
        if best is not None and u.order[0] > best[0]:
            return None  # units are sorted: every later set has a worse top priority
        chosen.append(u)
        if _fits(state, task, i, chosen):
            break
    else:
        return None
    # The last unit was needed (the prefix before it did not fit); try dropping others.
    for j in range(len(chosen) - 2, -1, -1):
        rest = chosen[:j] + chosen[j + 1:]
        if _fits(state, task, i, rest):
            chosen = rest
    victims = [k for u in chosen for k in u.members]
    prios = [int(state.alloc_prio[k]) for k in victims]
    return (max(prios), len(victims), sum(prios), i), victims
