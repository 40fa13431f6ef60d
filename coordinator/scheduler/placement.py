"""`schedule`: one pure scheduling pass from a cluster snapshot to a Plan."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lepton.common.errors import InvalidArgument

from ._preempt import find_victims
from ._reasons import never_fits, no_room
from ._state import ClusterState
from .types import (
    UNSCHEDULABLE,
    WAITING,
    ClusterSnapshot,
    Placement,
    Plan,
    Policy,
    Preemption,
    TaskRequest,
    known_failure,
    request_shape,
)

_INF = np.inf
# Added to GPU nodes' load for CPU-only tasks (Policy.reserve_gpu_nodes). Feasible
# loads lie in [0, 1], so this orders every GPU-less node first.
_GPU_NODE_BIAS = 4.0

_Shape = tuple  # (cpu, mem, gpus, gpu_mem, label key): what feasibility depends on


def schedule(
    snapshot: ClusterSnapshot,
    pending: Sequence[TaskRequest],
    *,
    now_ms: int,
    policy: Policy = Policy(),  # noqa: B008 - frozen, so a shared default is safe
) -> Plan:
    """Decide where pending tasks go, and what to preempt for them.

    Pure: reads only its arguments (`now_ms` stands in for the clock, for aging),
    mutates none of them, and returns the same Plan for the same inputs.

    Tasks are taken in order of effective priority (aging included, higher first),
    then submission time (older first), then task id. A gang is taken at the position
    of its first member and placed all-or-nothing. Each task goes to the feasible node
    with the best score (spread: lowest load after placement, load being the max of
    the cpu, memory and, for GPU tasks, GPU fractions; binpack: highest), ties broken
    by node id; a feasible preferred node beats every other (ties among preferred
    nodes go to the one listed first). A task of a spread group goes to a node without
    one of its group while one fits, else wherever it fits. A task that fits nowhere may preempt strictly
    lower base-priority allocations (see the package docstring).

    Raises InvalidArgument when two pending tasks share an id or two nodes share one.
    """
    return _Pass(snapshot, policy).run(pending, now_ms)


# The columns of the last snapshot a pass read, kept with that snapshot: the leader hands
# the same snapshot object in until the cluster changes, and building the columns was most
# of a pass's cost when nothing could be placed. Each pass mutates its own fork.
_last_state: tuple[ClusterSnapshot, ClusterState] | None = None


def _state_of(snapshot: ClusterSnapshot) -> ClusterState:
    global _last_state
    last = _last_state
    if last is None or last[0] is not snapshot:
        last = _last_state = (snapshot, ClusterState(snapshot))
    return last[1].fork()


class _Pass:
    def __init__(self, snapshot: ClusterSnapshot, policy: Policy) -> None:
        self.state = _state_of(snapshot)
        self.policy = policy
        self.binpack = policy.scoring == "binpack"
        st = self.state
        # Policy.reserve_gpu_nodes: GPU nodes score worse by this much for CPU-only
        # tasks (folded into the per-request terms, see _term).
        self.gpu_bias = (
            st.has_gpus * (-_GPU_NODE_BIAS if self.binpack else _GPU_NODE_BIAS)
            if policy.reserve_gpu_nodes and st.has_gpus.any() else None
        )
        self._terms: dict[tuple, np.ndarray] = {}
        self._bad_base: dict[tuple, np.ndarray | None] = {}
        self.placements: dict[str, Placement] = {}
        self.preemptions: list[Preemption] = []
        self.reasons: dict[str, str] = {}
        self._static: dict[_Shape, np.ndarray] = {}
        # shape -> (highest base priority that failed, reason). Placements only shrink
        # free capacity, so a task of that shape and no higher priority fails too;
        # cleared whenever an eviction frees capacity.
        self._failed: dict[_Shape, tuple[float, str]] = {}

    # -- driver -----------------------------------------------------------------------

    def run(self, pending: Sequence[TaskRequest], now_ms: int) -> Plan:
        ids: set[str] = set()
        units: list[tuple[tuple, TaskRequest | None, str | None]] = []
        gangs: dict[str, list[tuple[tuple, TaskRequest]]] = {}
        for t in pending:
            if t.task_id in ids:
                raise InvalidArgument(f"task {t.task_id} is pending twice")
            ids.add(t.task_id)
            key = (-self.policy.effective_priority(t, now_ms), t.submitted_at_ms, t.task_id)
            if t.gang_id is None:
                units.append((key, t, None))
            else:
                gangs.setdefault(t.gang_id, []).append((key, t))
        for gid, members in gangs.items():
            units.append((min(k for k, _ in members), None, gid))
        units.sort(key=lambda u: u[0])  # keys are unique: they end in a task id

        for _, task, gid in units:
            if task is not None:
                self._single(task)
            else:
                self._gang(gid, [t for _, t in gangs[gid]])
            self.state.release()
        return Plan(self.placements, tuple(self.preemptions), self.reasons, len(ids),
                    dict(self._failed))

    # -- one task ---------------------------------------------------------------------

    def _single(self, t: TaskRequest) -> None:
        if t.task_id in self.state.running_ids:
            self.reasons[t.task_id] = f"{UNSCHEDULABLE} task is already running"
            return
        shape = request_shape(t)
        lk = shape[4]
        failed = self._failed.get(shape)
        known = known_failure(self._failed, t, self.policy)
        if known is not None:
            self.reasons[t.task_id] = known
            return
        i = -1
        if t.spread_group is not None:
            i = self._best(t, lk, sorted(self.state.group_rows.get(t.spread_group, ())))
        if i < 0:
            i = self._best(t, lk, ())
        if i >= 0:
            self._record(self._take(t, i))
            return
        static = self._static_mask(shape, t, self.state.label_mask(lk))
        if not static.any():
            reason = never_fits(self.state, t, lk)
            self._failed[shape] = (_INF, reason)
        else:
            pre = self._preempt(t, static, ())
            if pre is not None:
                self._record(self._take(t, pre[0]), pre[1])
                return
            reason = no_room(static, self.policy.preemption)
            self._failed[shape] = (max(t.priority, failed[0] if failed else -_INF), reason)
        self.reasons[t.task_id] = reason

    def _gang(self, gid: str, members: list[TaskRequest]) -> None:
        def fail(reason: str) -> None:
            for t in members:
                self.reasons[t.task_id] = reason

        sizes = sorted({t.gang_size for t in members})
        if len(sizes) > 1:
            return fail(f"{UNSCHEDULABLE} gang {gid} members disagree on gang_size {sizes}")
        if len({t.gang_distinct_nodes for t in members}) > 1:
            return fail(f"{UNSCHEDULABLE} gang {gid} members disagree on gang_distinct_nodes")
        size = sizes[0]
        if len(members) > size:
            return fail(f"{UNSCHEDULABLE} gang {gid} has {len(members)} members pending "
                        f"but gang_size {size}")
        if len(members) < size:
            return fail(f"{WAITING} gang {gid} has {len(members)} of {size} members pending")
        running = [t.task_id for t in members if t.task_id in self.state.running_ids]
        if running:
            return fail(f"{UNSCHEDULABLE} gang {gid}: {running[0]} is already running")
        distinct = members[0].gang_distinct_nodes
        # Most constrained first, so a big member is not squeezed out by small mates.
        members = sorted(members, key=lambda t: (-t.gpus, -t.gpu_memory_bytes, -t.cpu_millis,
                                                 -t.memory_bytes, t.task_id))
        st = self.state
        plans: list[tuple[TaskRequest, tuple, np.ndarray]] = []
        union = np.zeros(st.n, bool)
        for t in members:
            lk = _label_key(t)
            base = st.label_mask(lk)
            static = self._static_mask(
                (t.cpu_millis, t.memory_bytes, t.gpus, t.gpu_memory_bytes, lk), t, base)
            if not static.any():
                why = never_fits(st, t, lk).removeprefix(UNSCHEDULABLE).strip()
                return fail(f"{UNSCHEDULABLE} gang {gid}: member {t.task_id} {why}")
            union |= static
            plans.append((t, lk, static))
        if distinct and int(union.sum()) < size:
            return fail(f"{UNSCHEDULABLE} gang {gid} needs {size} distinct nodes, only "
                        f"{int(union.sum())} could ever hold its members")

        mark = st.mark()
        used: list[int] = []
        done: list[tuple[Placement, list[int]]] = []
        for t, lk, static in plans:
            exclude = used if distinct else ()
            i = self._best(t, lk, exclude)
            victims: list[int] = []
            if i < 0:
                pre = self._preempt(t, static, exclude)
                if pre is None:
                    st.rollback(mark)  # no partial reservation survives a failed gang
                    return fail(f"{WAITING} gang {gid}: only {len(done)} of {size} members "
                                "fit at once; all-or-nothing, so none is placed")
                i, victims = pre
            done.append((self._take(t, i), victims))
            used.append(i)
        for placement, victims in done:
            self._record(placement, victims)

    # -- helpers ----------------------------------------------------------------------

    def _best(self, t: TaskRequest, lk: tuple, exclude: Sequence[int]) -> int:
        """Row of the best feasible node for `t` now, or -1. The hot path: about ten
        vector ops over all nodes, no Python loop over them.

        Score = load after placement = max over resources of the used fraction (GPU
        fraction only for GPU tasks); spread takes the lowest, binpack the highest.
        Ties go to the lowest row, i.e. the smallest node id."""
        st = self.state
        if st.n == 0:
            return -1
        c, m, g = t.cpu_millis, t.memory_bytes, t.gpus
        bias = not g and self.gpu_bias is not None
        bad = st.free_cpu < c
        bad |= st.free_mem < m
        bad_base = self._bad_base.get(lk, False)
        if bad_base is False:
            base = st.label_mask(lk)
            bad_base = self._bad_base[lk] = None if base.all() else ~base
        if bad_base is not None:
            bad |= bad_base
        if g:
            bad |= st.gpus_available(t.gpu_memory_bytes) < g
        if len(exclude):
            bad[list(exclude)] = True
        score = st.cpu_load + self._term("cpu", c, bias)
        np.maximum(score, st.mem_load + self._term("mem", m, bias), out=score)
        if g:
            np.maximum(score, st.gpu_load + g * st.inv_gpu, out=score)
        if self.binpack:  # highest load wins: same code on the negated scale
            np.negative(score, out=score)
        np.putmask(score, bad, _INF)
        if t.preferred_nodes:
            rows = [st.index[n] for n in t.preferred_nodes if n in st.index]
            if rows:
                sub = score[rows]
                j = int(sub.argmin())
                if sub[j] != _INF:
                    return rows[j]
        i = int(score.argmin())
        return i if score[i] != _INF else -1

    def _term(self, kind: str, amount: int, bias: bool) -> np.ndarray:
        """amount / capacity per node (+ GPU-node bias): the request's share of each
        node, cached because a queue holds few distinct shapes."""
        key = (kind, amount, bias)
        term = self._terms.get(key)
        if term is None:
            if len(self._terms) >= 1024:
                self._terms.clear()  # bound memory on queues of all-distinct shapes
            st = self.state
            term = amount * (st.inv_cpu if kind == "cpu" else st.inv_mem)
            if bias:
                term = term + self.gpu_bias
            self._terms[key] = term
        return term

    def _static_mask(self, shape: _Shape, t: TaskRequest, base: np.ndarray) -> np.ndarray:
        """Nodes that could hold `t` if they were empty."""
        mask = self._static.get(shape)
        if mask is None:
            st = self.state
            mask = base & (st.tot_cpu >= t.cpu_millis) & (st.tot_mem >= t.memory_bytes)
            if t.gpus:
                mask &= st.gpus_total(t.gpu_memory_bytes) >= t.gpus
            self._static[shape] = mask
        return mask

    def _preempt(
        self, t: TaskRequest, static: np.ndarray, exclude: Sequence[int]
    ) -> tuple[int, list[int]] | None:
        """Evict for `t` (journaled); returns (node row, victims) or None."""
        if not self.policy.preemption:
            return None
        found = find_victims(self.state, t, static, exclude)
        if found is None:
            return None
        i, victims = found
        mark = self.state.mark()
        for k in victims:
            self.state.evict(k)
        if self._best_on(t, i):
            return i, victims
        self.state.rollback(mark)  # only on a snapshot with doubly-held GPUs
        return None

    def _best_on(self, t: TaskRequest, i: int) -> bool:
        st = self.state
        return bool(st.free_cpu[i] >= t.cpu_millis and st.free_mem[i] >= t.memory_bytes
                    and (not t.gpus or st.gpus_available(t.gpu_memory_bytes)[i] >= t.gpus))

    def _take(self, t: TaskRequest, i: int) -> Placement:
        st = self.state
        slots = st.choose_slots(i, t.gpus, t.gpu_memory_bytes)
        st.take(i, t.cpu_millis, t.memory_bytes, slots)
        if t.spread_group is not None:
            st.group_rows.setdefault(t.spread_group, set()).add(i)
        return Placement(t.task_id, st.node_ids[i], st.devices(i, slots))

    def _record(self, placement: Placement, victims: Sequence[int] = ()) -> None:
        self.placements[placement.task_id] = placement
        if victims:
            st = self.state
            for k in victims:
                a = st.allocs[k]
                self.preemptions.append(Preemption(a.task_id, a.node_id, placement.task_id))
            self._failed.clear()  # capacity was freed: earlier failures may now fit


def _label_key(t: TaskRequest) -> tuple[tuple[str, str], ...]:
    return request_shape(t)[4]
