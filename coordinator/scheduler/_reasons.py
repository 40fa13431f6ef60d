"""Readable explanations for tasks the scheduler could not place."""

from __future__ import annotations

import json

import numpy as np

from ._state import ClusterState
from .types import UNSCHEDULABLE, WAITING, TaskRequest


def fmt_bytes(n: int) -> str:
    """1073741824 -> '1 GiB'; exact enough for a person, deterministic for tests."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"


def _labels(task: TaskRequest) -> str:
    return json.dumps(dict(task.constraints), sort_keys=True)


def never_fits(state: ClusterState, task: TaskRequest, label_key: tuple) -> str:
    """Why `task` fits no node even if every node were empty. Narrows the candidate set
    one requirement at a time and names the first one that empties it."""
    if state.n == 0:
        return f"{UNSCHEDULABLE} the cluster has no nodes"
    if not state.schedulable.any():
        return f"{UNSCHEDULABLE} none of {state.n} nodes is schedulable (draining, down or left)"
    cand = state.label_mask(label_key)
    if not cand.any():
        return f"{UNSCHEDULABLE} no schedulable node matches labels {_labels(task)}"
    where = "largest node" if not label_key else f"largest node matching {_labels(task)}"
    if task.gpus:
        have = int(state.gpus_total(task.gpu_memory_bytes)[cand].max())
        if have < task.gpus:
            each = f" with {fmt_bytes(task.gpu_memory_bytes)} each" if task.gpu_memory_bytes else ""
            return f"{UNSCHEDULABLE} needs {task.gpus} gpus{each}, {where} has {have}"
    if task.cpu_millis:
        have = int(state.tot_cpu[cand].max())
        if have < task.cpu_millis:
            return f"{UNSCHEDULABLE} needs {task.cpu_millis}m cpu, {where} has {have}m"
    if task.memory_bytes:
        have = int(state.tot_mem[cand].max())
        if have < task.memory_bytes:
            return (f"{UNSCHEDULABLE} needs {fmt_bytes(task.memory_bytes)} memory, "
                    f"{where} has {fmt_bytes(have)}")
    return (f"{UNSCHEDULABLE} no single node has {task.cpu_millis}m cpu, "
            f"{fmt_bytes(task.memory_bytes)} memory and {task.gpus} gpus together")


def no_room(static: np.ndarray, preemption: bool) -> str:
    """Fits some node in principle, none now."""
    k = int(np.count_nonzero(static))
    nodes = "the 1 node that could fit it is" if k == 1 else f"all {k} nodes that could fit it are"
    tail = "; preempting lower-priority tasks would not free enough" if preemption else ""
    return f"{WAITING} {nodes} busy{tail}"
