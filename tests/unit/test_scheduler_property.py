"""Scheduler: hypothesis properties over random clusters and queues."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.coordinator.scheduler import (
    UNSCHEDULABLE,
    WAITING,
    Allocation,
    ClusterSnapshot,
    Harness,
    NodeView,
    Policy,
    TaskRequest,
    schedule,
)
from lepton.coordinator.scheduler._preempt import _plan_node, find_victims
from lepton.coordinator.scheduler._state import ClusterState

GiB = 1 << 30


def budget(n: int) -> settings:
    # Generation, not scheduling, dominates (a pass here takes well under 1 ms).
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def clusters(draw) -> ClusterSnapshot:
    nodes = []
    for i in range(draw(st.integers(1, 7))):
        nid = f"n{i}"
        cpu = draw(st.sampled_from([0, 2000, 4000, 4000, 8000]))
        mem = draw(st.integers(2, 16)) * GiB
        devs = draw(st.lists(st.integers(0, 7), max_size=4, unique=True))
        gpus = {d: draw(st.sampled_from([16, 40, 80])) * GiB for d in devs}
        allocs = []
        free_cpu, free_mem, free_dev = cpu, mem, sorted(devs)
        for j in range(draw(st.integers(0, 3))):
            c = draw(st.integers(0, free_cpu))
            m = draw(st.integers(0, free_mem // GiB)) * GiB
            k = draw(st.integers(0, len(free_dev)))
            held, free_dev = tuple(free_dev[:k]), free_dev[k:]
            free_cpu, free_mem = free_cpu - c, free_mem - m
            gang = draw(st.sampled_from([None, None, "ga", "gb"]))
            allocs.append(Allocation(f"{nid}-r{j}", nid, draw(st.integers(0, 5)), c, m, held,
                                     gang))
        nodes.append(NodeView(nid, cpu, mem, gpus, {"zone": draw(st.sampled_from("ab"))},
                              draw(st.booleans() | st.just(True)), tuple(allocs)))
    return ClusterSnapshot(tuple(nodes))


def requests(prefix: str, gang: tuple[str, int] | None = None):
    return st.builds(
        lambda tid, prio, at, cpu, mem, gpus, floor, zone, pref: TaskRequest(
            tid, prio, at, cpu, mem, gpus, floor, {"zone": zone} if zone else {},
            gang[0] if gang else None, gang[1] if gang else 1, True, pref),
        st.just(prefix), st.integers(0, 5), st.integers(0, 600_000),
        st.sampled_from([0, 500, 1000, 2000, 4000]), st.integers(0, 4).map(lambda g: g * GiB),
        st.sampled_from([0, 0, 0, 0, 1, 2]), st.sampled_from([0, 0, 40 * GiB]),
        st.sampled_from([None, None, "a", "b"]),
        st.lists(st.sampled_from(["n0", "n1", "n5", "zz"]), max_size=2).map(tuple),
    )


@st.composite
def queues(draw) -> list[TaskRequest]:
    tasks = [draw(requests(f"t{i}")) for i in range(draw(st.integers(0, 12)))]
    for g in range(draw(st.integers(0, 2))):
        size = draw(st.integers(1, 3))
        present = draw(st.just(size) | st.integers(1, size))
        tasks += [draw(requests(f"G{g}-{m}", (f"G{g}", size))) for m in range(present)]
    return draw(st.permutations(tasks))


policies = st.builds(Policy, st.sampled_from(["spread", "binpack"]), st.sampled_from([0, 1.0]),
                     st.just(60.0), st.booleans(), st.booleans())


def could_ever_fit(node: NodeView, t: TaskRequest) -> bool:
    return (node.schedulable and all(node.labels.get(k) == v for k, v in t.constraints.items())
            and node.cpu_millis >= t.cpu_millis and node.memory_bytes >= t.memory_bytes
            and sum(m >= t.gpu_memory_bytes for m in node.gpus.values()) >= t.gpus)


@budget(120)
@given(clusters(), queues(), policies)
def test_plans_are_sound(snapshot: ClusterSnapshot, pending: list[TaskRequest], policy: Policy):
    now = 600_000
    plan = schedule(snapshot, pending, now_ms=now, policy=policy)
    assert schedule(snapshot, pending, now_ms=now, policy=policy) == plan  # deterministic

    # every task is placed or has a readable reason, never both
    ids = {t.task_id for t in pending}
    assert set(plan.placements) | set(plan.unschedulable) == ids
    assert not set(plan.placements) & set(plan.unschedulable)
    assert plan.considered == len(ids)
    for reason in plan.unschedulable.values():
        assert reason.startswith((UNSCHEDULABLE, WAITING)) and len(reason) > 20

    nodes = {n.node_id: n for n in snapshot.nodes}
    running = {a.task_id: a for a in snapshot.allocations}
    by_id = {t.task_id: t for t in pending}
    for p in plan.placements.values():
        n, t = nodes[p.node_id], by_id[p.task_id]
        assert n.schedulable
        assert all(n.labels.get(k) == v for k, v in t.constraints.items())
        assert list(p.gpu_indices) == sorted(p.gpu_indices)

    # preemption: unique victims, strictly lower base priority, whole gangs
    victims = [v.task_id for v in plan.preemptions]
    assert len(victims) == len(set(victims))
    if not policy.preemption:
        assert not victims
    for v in plan.preemptions:
        a = running[v.task_id]
        assert a.node_id == v.node_id
        assert a.priority < by_id[v.for_task_id].priority
        assert v.for_task_id in plan.placements
        if a.gang_id is not None:
            mates = {x.task_id for x in running.values() if x.gang_id == a.gang_id}
            assert mates <= set(victims)

    # gangs: all or nothing, on distinct nodes
    gangs: dict[str, list[TaskRequest]] = {}
    for t in pending:
        if t.gang_id:
            gangs.setdefault(t.gang_id, []).append(t)
    for members in gangs.values():
        placed = [plan.placements[t.task_id].node_id for t in members
                  if t.task_id in plan.placements]
        assert len(placed) in (0, members[0].gang_size)
        assert len(placed) == len(set(placed))

    # never-fits vs waiting is classified correctly for single tasks
    for tid, reason in plan.unschedulable.items():
        t = by_id[tid]
        if t.gang_id is None:
            ever = any(could_ever_fit(n, t) for n in nodes.values())
            assert ever == reason.startswith(WAITING), reason

    # applying the plan over-commits nothing, and victims get requeued
    h = Harness(snapshot.nodes, policy=policy, now_ms=now)
    h.submit(*pending)
    h.apply(plan)
    assert h.violations() == []
    assert set(victims) <= set(h.pending) | set(victims)

    # without preemption capacity only shrinks, so a waiting single task must not fit
    # anywhere once the plan is applied (no missed placement)
    if not policy.preemption:
        for tid, reason in plan.unschedulable.items():
            t = by_id[tid]
            if t.gang_id is None and reason.startswith(WAITING):
                h2 = Harness(h.nodes.values(), policy=policy)
                h2.running = dict(h.running)
                again = schedule(h2.snapshot(), [t], now_ms=now, policy=policy)
                assert tid not in again.placements


@budget(50)
@given(clusters(), queues(), policies)
def test_repeated_passes_stay_consistent(snapshot, pending, policy):
    h = Harness(snapshot.nodes, policy=policy)
    h.submit(*pending)
    for step in range(3):
        h.step(now_ms=step * 60_000)
        assert h.violations() == []
    assert set(h.pending) | set(h.running) >= {t.task_id for t in pending}


@budget(150)
@given(clusters(), requests("x"), st.integers(0, 6))
def test_bounded_victim_search_matches_exhaustive_search(snapshot, t, prio):
    t = TaskRequest(t.task_id, prio, 0, t.cpu_millis, t.memory_bytes, t.gpus,
                    t.gpu_memory_bytes, t.constraints)
    state = ClusterState(snapshot)
    lk = tuple(sorted(t.constraints.items()))
    static = state.label_mask(lk) & (state.tot_cpu >= t.cpu_millis) & (
        state.tot_mem >= t.memory_bytes) & (state.gpus_total(t.gpu_memory_bytes) >= t.gpus)
    fits_now = static & (state.free_cpu >= t.cpu_millis) & (state.free_mem >= t.memory_bytes) & (
        state.gpus_available(t.gpu_memory_bytes) >= t.gpus)
    if fits_now.any():
        return  # find_victims is only called when nothing fits
    got = find_victims(state, t, static, ())
    options = [r for i in np.flatnonzero(static).tolist()
               if (r := _plan_node(state, t, i, None)) is not None]
    if not options:
        assert got is None
    else:
        key, best_victims = min(options, key=lambda r: r[0])
        assert got == (key[-1], best_victims)
