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
    that may not be used (a gang's nodes so far). The caller has established that no
    allowed node fits the task without evictions."""
    p = task.priority
    elig = np.flatnonzero(state.alive & (state.alloc_prio < p))
    if not len(elig):
        return None
    cand = static.copy()
    if len(exclude):
        cand[list(exclude)] = False
    rows = np.flatnonzero(cand)
    if not len(rows):
        return None
    bound = _Bounds(state, task, elig, rows)
    rows, lb_top, lb_count = bound.rows, bound.top, bound.count
    if not len(rows):
        return None

    # Visit nodes from the best lower bound up; stop once no later node can win.
    best: tuple | None = None
    best_victims: list[int] = []
    sum_bound_ok = bound.min_prio >= 0  # then a set's priority sum >= its top priority
    for r in np.lexsort((rows, lb_count, lb_top)).tolist():
        i, top, count = int(rows[r]), int(lb_top[r]), int(lb_count[r])
        if best is not None:
            if best[:2] < (top, count):
                break
            if sum_bound_ok and best[:3] <= (top, count, top):
                break  # at best a tie, and ties go to the lower row, which best has
        got = _plan_node(state, task, i, best)
        if got is not None and (best is None or got[0] < best):
            best, best_victims = got
    if best is None:
        return None
    return best[-1], best_victims


class _Bounds:
    """Vectorised lower bounds, per candidate node, on the cost of its eviction set:
    the top victim priority (`top`) and the number of victims (`count`). Nodes that
    cannot fit even after evicting everything eligible are dropped from `rows`."""

    _MAX_LEVELS = 16  # beyond this many distinct victim priorities, use a weaker bound

    def __init__(self, state: ClusterState, task: TaskRequest, elig: np.ndarray,
                 rows: np.ndarray) -> None:
        n = state.n
        where = state.alloc_node[elig]
        prio = state.alloc_prio[elig]
        self.min_prio = int(prio.min())
        dims = []  # (deficit per row, resource per eligible allocation)
        if task.cpu_millis:
            dims.append((task.cpu_millis - state.free_cpu[rows], state.alloc_cpu[elig]))
        if task.memory_bytes:
            dims.append((task.memory_bytes - state.free_mem[rows], state.alloc_mem[elig]))
        if task.gpus:
            # device count only (memory floors ignored): still a valid lower bound
            dims.append((task.gpus - state.gpus_available(task.gpu_memory_bytes)[rows],
                         state.alloc_ngpu[elig]))

        def fits(sel: np.ndarray | None) -> np.ndarray:
            ok = np.ones(len(rows), bool)
            for deficit, res in dims:
                w = res if sel is None else res[sel]
                at = where if sel is None else where[sel]
                ok &= np.bincount(at, weights=w, minlength=n)[rows] >= deficit
            return ok

        possible = fits(None)
        rows = rows[possible]
        dims = [(d[possible], res) for d, res in dims]
        top = np.full(len(rows), self.min_prio, np.int64)
        levels = np.unique(prio)
        if 1 < len(levels) <= self._MAX_LEVELS:
            top[:] = levels[-1]
            done = np.zeros(len(rows), bool)
            for lev in levels[:-1].tolist():
                ok = fits(prio <= lev) & ~done
                top[ok] = lev
                done |= ok
        count = np.ones(len(rows), np.int64)
        for deficit, res in dims:
            biggest = np.zeros(n, np.int64)
            np.maximum.at(biggest, where, res)
            big = np.maximum(biggest[rows], 1)
            count = np.maximum(count, -(-np.maximum(deficit, 0) // big))
        self.rows, self.top, self.count = rows, top, count


def _units(state: ClusterState, p: int, i: int) -> list[_Unit]:
    alive, prio, node = state.alive, state.prio_of, state.node_of
    cpu_of, mem_of = state.cpu_of, state.mem_of
    units: list[_Unit] = []
    seen: set[str] = set()
    for k in state.allocs_on(i):
        if prio[k] >= p or not alive[k]:
            continue
        gang = state.allocs[k].gang_id
        if gang is None:
            members = [k]
            local = members
        else:
            if gang in seen:
                continue
            seen.add(gang)
            members = sorted((x for x in state.gang_allocs[gang] if alive[x]),
                             key=lambda x: state.allocs[x].task_id)
            if any(prio[x] >= p for x in members):
                continue  # evicting it would evict a mate we may not touch
            local = [x for x in members if node[x] == i]
        cpu = sum(cpu_of[x] for x in local)
        mem = sum(mem_of[x] for x in local)
        slots = [s for x in local for s in state.alloc_slots[x]]
        top = max(prio[x] for x in members)
        first = state.allocs[members[0]].task_id
        units.append(_Unit((top, len(members), cpu, mem, len(slots), first),
                           members, cpu, mem, slots))
    units.sort(key=lambda u: u.order)
    return units


def _gpus_fit(state: ClusterState, task: TaskRequest, i: int, units: list[_Unit]) -> bool:
    if not task.gpus:
        return True
    hold = state.gpu_hold[i].copy()
    for u in units:
        for s in u.slots:
            hold[s] -= 1
    usable = (hold == 0) & state.gpu_mem_ok(task.gpu_memory_bytes)[i]
    return int(np.count_nonzero(usable)) >= task.gpus


def _fits(state: ClusterState, task: TaskRequest, i: int, units: list[_Unit]) -> bool:
    return (int(state.free_cpu[i]) + sum(u.cpu for u in units) >= task.cpu_millis
            and int(state.free_mem[i]) + sum(u.mem for u in units) >= task.memory_bytes
            and _gpus_fit(state, task, i, units))


def _plan_node(
    state: ClusterState, task: TaskRequest, i: int, best: tuple | None
) -> tuple[tuple, list[int]] | None:
    """Cheapest eviction set on node row `i` as (cost key, victims), or None when the
    node cannot be made to fit or cannot beat `best`."""
    chosen: list[_Unit] = []
    cpu, mem = int(state.free_cpu[i]), int(state.free_mem[i])
    for u in _units(state, task.priority, i):
        if best is not None and u.order[0] > best[0]:
            return None  # units are sorted: every later set has a worse top priority
        chosen.append(u)
        cpu += u.cpu
        mem += u.mem
        if (cpu >= task.cpu_millis and mem >= task.memory_bytes
                and _gpus_fit(state, task, i, chosen)):
            break
    else:
        return None
    # The last unit was needed (the prefix before it did not fit); try dropping others.
    for j in range(len(chosen) - 2, -1, -1):
        rest = chosen[:j] + chosen[j + 1:]
        if _fits(state, task, i, rest):
            chosen = rest
    victims = [k for u in chosen for k in u.members]
    prios = [state.prio_of[k] for k in victims]
    return (max(prios), len(victims), sum(prios), i), victims
