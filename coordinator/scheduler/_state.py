"""Column-oriented, mutable copy of a ClusterSnapshot for one scheduling pass.

Nodes are rows, sorted by node id (the deterministic tie-break). Capacity and free
resources are numpy arrays so that feasibility and scoring for one task are a handful
of vector operations over all nodes. Mutations go through `take`/`evict`, which keep
the derived load arrays exact and are journaled, so that a gang that does not
fully fit is rolled back without leaving any reservation behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lepton.common.errors import InvalidArgument

from .types import ClusterSnapshot

_I64 = np.int64
# The arrays `take`/`evict` write: what `fork` copies.
_PER_PASS = ("free_cpu", "free_mem", "cpu_load", "mem_load", "gpu_load", "gpu_hold",
             "gpu_free", "free_gpus", "alive")


class ClusterState:
    """Free capacity of every node, plus the running allocations (for preemption)."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        nodes = sorted(snapshot.nodes, key=lambda n: n.node_id)
        self.nodes = nodes
        self.node_ids: list[str] = [n.node_id for n in nodes]
        self.index: dict[str, int] = {nid: i for i, nid in enumerate(self.node_ids)}
        if len(self.index) != len(nodes):
            raise InvalidArgument("snapshot lists a node id twice")
        n = self.n = len(nodes)
        self.tot_cpu = np.fromiter((x.cpu_millis for x in nodes), _I64, n)
        self.tot_mem = np.fromiter((x.memory_bytes for x in nodes), _I64, n)
        self.schedulable = np.fromiter((x.schedulable for x in nodes), bool, n)

        # GPUs: one padded slot matrix, slots in ascending device index so "lowest free
        # slots" are the lowest free device indices.
        width = max((len(x.gpus) for x in nodes), default=0)
        self.gpu_dev = np.full((n, width), -1, _I64)
        self.gpu_mem = np.zeros((n, width), _I64)
        self.gpu_free = np.zeros((n, width), bool)
        # holders per slot: a bad snapshot may list one device twice; it is free only
        # once every holder is gone.
        self.gpu_hold = np.zeros((n, width), np.int32)
        self._slot_of: dict[int, dict[int, int]] = {}
        for i, x in enumerate(nodes):
            if x.gpus:
                devs = sorted(x.gpus)
                k = len(devs)
                self.gpu_dev[i, :k] = devs
                self.gpu_mem[i, :k] = [x.gpus[d] for d in devs]
                self.gpu_free[i, :k] = True
                self._slot_of[i] = {d: s for s, d in enumerate(devs)}
        self.tot_gpus = self.gpu_free.sum(axis=1).astype(_I64)
        self.has_gpus = self.tot_gpus > 0

        self._load_allocations()

        self.inv_cpu = 1.0 / np.maximum(self.tot_cpu, 1)
        self.inv_mem = 1.0 / np.maximum(self.tot_mem, 1)
        self.inv_gpu = 1.0 / np.maximum(self.tot_gpus, 1)
        self.cpu_load = (self.tot_cpu - self.free_cpu) * self.inv_cpu
        self.mem_load = (self.tot_mem - self.free_mem) * self.inv_mem
        self.gpu_load = (self.tot_gpus - self.free_gpus) * self.inv_gpu
        self._tot_cpu: list[int] = self.tot_cpu.tolist()
        self._tot_mem: list[int] = self.tot_mem.tolist()
        self._inv_cpu: list[float] = self.inv_cpu.tolist()
        self._inv_mem: list[float] = self.inv_mem.tolist()

        self.journal: list[tuple] = []  # undo log since the oldest open savepoint
        self._label_values: dict[str, np.ndarray] = {}
        self._label_masks: dict[tuple[tuple[str, str], ...], np.ndarray] = {}
        self._gpu_mem_ok: dict[int, np.ndarray] = {}

    def fork(self) -> ClusterState:
        """A copy one pass may mutate: the columns `take`/`evict` change are copied; the
        rest (capacity, allocations, the mask caches) depends on the snapshot alone and is
        shared."""
        new = object.__new__(ClusterState)
        new.__dict__.update(self.__dict__)
        for name in _PER_PASS:
            setattr(new, name, getattr(self, name).copy())
        new.group_rows = {g: set(rows) for g, rows in self.group_rows.items()}
        new.journal = []
        return new

    # -- construction -------------------------------------------------------------

    def _load_allocations(self) -> None:
        allocs = [a for x in self.nodes for a in x.allocations]
        self.allocs = allocs
        m = len(allocs)
        index = self.index
        self.alloc_node = np.fromiter((index[a.node_id] for a in allocs), _I64, m)
        self.alloc_prio = np.fromiter((a.priority for a in allocs), _I64, m)
        self.alloc_cpu = np.fromiter((a.cpu_millis for a in allocs), _I64, m)
        self.alloc_mem = np.fromiter((a.memory_bytes for a in allocs), _I64, m)
        self.alive = np.ones(m, bool)  # False once evicted in this plan
        # Python-int copies for the per-allocation loops of preemption (numpy scalar
        # indexing is several times slower there).
        self.prio_of: list[int] = self.alloc_prio.tolist()
        self.node_of: list[int] = self.alloc_node.tolist()
        self.cpu_of: list[int] = self.alloc_cpu.tolist()
        self.mem_of: list[int] = self.alloc_mem.tolist()
        self.running_ids = {a.task_id for a in allocs}

        # integer sums (np.add.at), not float bincount: memory totals must stay exact
        self.free_cpu = self.tot_cpu.copy()
        np.add.at(self.free_cpu, self.alloc_node, -self.alloc_cpu)
        self.free_mem = self.tot_mem.copy()
        np.add.at(self.free_mem, self.alloc_node, -self.alloc_mem)

        # GPU slots held per allocation; devices unknown to the node are ignored.
        self.alloc_slots: list[tuple[int, ...]] = [()] * m
        self.gang_allocs: dict[str, list[int]] = {}
        # spread group -> node rows holding one of it (TaskRequest.spread_group); rows
        # added by this pass's placements too (an eviction leaves its row in: conservative)
        self.group_rows: dict[str, set[int]] = {}
        hold_rows: list[int] = []
        hold_cols: list[int] = []
        node_of = self.node_of
        for k, a in enumerate(allocs):
            if a.gpu_indices:
                i = node_of[k]
                slot_of = self._slot_of.get(i, {})
                slots = tuple(sorted({slot_of[d] for d in a.gpu_indices if d in slot_of}))
                self.alloc_slots[k] = slots
                hold_rows.extend([i] * len(slots))
                hold_cols.extend(slots)
            if a.gang_id is not None:
                self.gang_allocs.setdefault(a.gang_id, []).append(k)
            if a.spread_group is not None:
                self.group_rows.setdefault(a.spread_group, set()).add(node_of[k])
        np.add.at(self.gpu_hold, (np.asarray(hold_rows, np.intp), np.asarray(hold_cols, np.intp)), 1)
        self.alloc_ngpu = np.fromiter((len(s) for s in self.alloc_slots), _I64, m)
        self.gpu_free &= self.gpu_hold == 0
        self.free_gpus = self.gpu_free.sum(axis=1).astype(_I64)

        # node -> its allocation indices, as slices of one sorted order (no Python loop)
        self._by_node = np.argsort(self.alloc_node, kind="stable")
        self._node_start = np.searchsorted(self.alloc_node[self._by_node], np.arange(self.n + 1))

    def allocs_on(self, i: int) -> Sequence[int]:
        """Indices of every allocation (alive or not) on node row `i`."""
        return self._by_node[self._node_start[i]:self._node_start[i + 1]].tolist()

    # -- cached masks ---------------------------------------------------------------

    def label_mask(self, key: tuple[tuple[str, str], ...]) -> np.ndarray:
        """Schedulable nodes whose labels match every (key, value). Do not mutate."""
        mask = self._label_masks.get(key)
        if mask is None:
            mask = self.schedulable.copy()
            for k, v in key:
                vals = self._label_values.get(k)
                if vals is None:
                    vals = np.empty(self.n, dtype=object)
                    vals[:] = [x.labels.get(k) for x in self.nodes]
                    self._label_values[k] = vals
                mask &= vals == v
            self._label_masks[key] = mask
        return mask

    def gpu_mem_ok(self, gpu_mem: int) -> np.ndarray:
        """Slot matrix: device exists and has at least `gpu_mem` bytes. Do not mutate."""
        ok = self._gpu_mem_ok.get(gpu_mem)
        if ok is None:
            ok = (self.gpu_mem >= gpu_mem) & (self.gpu_dev >= 0)
            self._gpu_mem_ok[gpu_mem] = ok
        return ok

    def gpus_available(self, gpu_mem: int) -> np.ndarray:
        """Free devices per node with at least `gpu_mem` bytes each."""
        if gpu_mem <= 0:
            return self.free_gpus
        return (self.gpu_free & self.gpu_mem_ok(gpu_mem)).sum(axis=1)

    def gpus_total(self, gpu_mem: int) -> np.ndarray:
        """Devices per node with at least `gpu_mem` bytes, free or not."""
        if gpu_mem <= 0:
            return self.tot_gpus
        return self.gpu_mem_ok(gpu_mem).sum(axis=1)

    def choose_slots(self, i: int, count: int, gpu_mem: int) -> tuple[int, ...]:
        """Lowest free slots on node `i` with enough memory (caller checked there are)."""
        if count == 0:
            return ()
        ok = self.gpu_free[i] & self.gpu_mem_ok(gpu_mem)[i]
        return tuple(np.flatnonzero(ok)[:count].tolist())

    def devices(self, i: int, slots: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.gpu_dev[i, list(slots)].tolist()) if slots else ()

    # -- mutation (journaled) ---------------------------------------------------------

    def _adjust(self, i: int, cpu: int, mem: int, slots: tuple[int, ...], sign: int) -> None:
        # sign -1: take resources, +1: give them back. Loads are recomputed from the
        # integer columns so undo restores them bit for bit. Python scalars here:
        # numpy scalar arithmetic costs more than it saves for one element.
        if cpu:
            free = int(self.free_cpu[i]) + sign * cpu
            self.free_cpu[i] = free
            self.cpu_load[i] = (self._tot_cpu[i] - free) * self._inv_cpu[i]
        if mem:
            free = int(self.free_mem[i]) + sign * mem
            self.free_mem[i] = free
            self.mem_load[i] = (self._tot_mem[i] - free) * self._inv_mem[i]
        if slots:
            sl = list(slots)
            self.gpu_hold[i, sl] -= sign
            self.gpu_free[i, sl] = self.gpu_hold[i, sl] == 0
            free = int(np.count_nonzero(self.gpu_free[i]))
            self.free_gpus[i] = free
            self.gpu_load[i] = (int(self.tot_gpus[i]) - free) * float(self.inv_gpu[i])

    def take(self, i: int, cpu: int, mem: int, slots: tuple[int, ...]) -> None:
        """Consume resources on node row `i` for a new placement."""
        self._adjust(i, cpu, mem, slots, -1)
        self.journal.append(("take", i, cpu, mem, slots))

    def evict(self, k: int) -> None:
        """Free allocation `k`'s resources for the rest of this plan."""
        self.alive[k] = False
        self._adjust(int(self.alloc_node[k]), int(self.alloc_cpu[k]), int(self.alloc_mem[k]),
                     self.alloc_slots[k], +1)
        self.journal.append(("evict", k))

    def mark(self) -> int:
        """A savepoint: `rollback(mark)` undoes every take/evict made after it."""
        return len(self.journal)

    def release(self) -> None:
        """Forget the journal; call only when no savepoint is outstanding."""
        self.journal.clear()

    def rollback(self, mark: int) -> None:
        journal = self.journal
        while len(journal) > mark:
            entry = journal.pop()
            if entry[0] == "take":
                _, i, cpu, mem, slots = entry
                self._adjust(i, cpu, mem, slots, +1)
            else:
                k = entry[1]
                self.alive[k] = True
                self._adjust(int(self.alloc_node[k]), int(self.alloc_cpu[k]),
                             int(self.alloc_mem[k]), self.alloc_slots[k], -1)
