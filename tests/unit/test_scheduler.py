"""Scheduler: ordering, aging, feasibility, scoring, GPUs, reasons, determinism."""

from __future__ import annotations

import pytest

from lepton.common.errors import InvalidArgument
from lepton.coordinator.scheduler import (
    UNSCHEDULABLE,
    WAITING,
    Allocation,
    ClusterSnapshot,
    Harness,
    NodeView,
    Placement,
    Plan,
    Policy,
    TaskRequest,
    schedule,
)

GiB = 1 << 30
MIN = 60_000


def node(nid: str, cpu: int = 4000, mem: int = 16 * GiB, gpus: dict[int, int] | None = None,
         labels: dict[str, str] | None = None, schedulable: bool = True,
         allocs: tuple[Allocation, ...] = ()) -> NodeView:
    return NodeView(nid, cpu, mem, gpus or {}, labels or {}, schedulable, allocs)


def task(tid: str, cpu: int = 1000, mem: int = 1 * GiB, prio: int = 0, at: int = 0,
         **kw) -> TaskRequest:
    return TaskRequest(tid, prio, at, cpu, mem, **kw)


def snap(*nodes: NodeView) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(nodes))


def where(plan: Plan) -> dict[str, str]:
    return {t: p.node_id for t, p in plan.placements.items()}


# -- ordering and aging ---------------------------------------------------------------


def test_higher_priority_is_placed_first():
    plan = schedule(snap(node("n1", cpu=1000)),
                    [task("low", prio=1), task("high", prio=5), task("mid", prio=3)], now_ms=0)
    assert where(plan) == {"high": "n1"}
    assert set(plan.unschedulable) == {"low", "mid"}
    assert all(r.startswith(WAITING) for r in plan.unschedulable.values())


def test_equal_priority_goes_oldest_first_then_by_task_id():
    s = snap(node("n1", cpu=1000))
    plan = schedule(s, [task("b", at=5), task("a", at=9), task("c", at=1)], now_ms=10)
    assert list(plan.placements) == ["c"]
    plan = schedule(s, [task("b", at=5), task("a", at=5)], now_ms=10)
    assert list(plan.placements) == ["a"]


def test_placements_are_recorded_in_decision_order():
    plan = schedule(snap(node("n1", cpu=8000)),
                    [task("c", prio=1), task("a", prio=3), task("b", prio=2)], now_ms=0)
    assert list(plan.placements) == ["a", "b", "c"]


def test_aging_lets_an_old_low_priority_task_overtake_a_new_high_one():
    s = snap(node("n1", cpu=1000))
    policy = Policy(aging_per_minute=1.0, max_aging=60)
    old = task("old", prio=0, at=0)
    new = task("new", prio=5, at=10 * MIN)
    # at 10 minutes, old has aged 10 points > 5
    assert where(schedule(s, [old, new], now_ms=10 * MIN, policy=policy)) == {"old": "n1"}
    # at 4 minutes (new submitted "now"), old has only 4 points
    new_early = task("new", prio=5, at=4 * MIN)
    assert where(schedule(s, [old, new_early], now_ms=4 * MIN, policy=policy)) == {"new": "n1"}


def test_aging_is_capped():
    s = snap(node("n1", cpu=1000))
    policy = Policy(aging_per_minute=1.0, max_aging=3)
    plan = schedule(s, [task("ancient", prio=0, at=0), task("new", prio=5, at=10**9)],
                    now_ms=10**9, policy=policy)
    assert where(plan) == {"new": "n1"}
    assert policy.effective_priority(task("x", prio=2, at=0), now_ms=10**9) == 5


def test_aging_off_keeps_strict_priority():
    s = snap(node("n1", cpu=1000))
    plan = schedule(s, [task("old", prio=0, at=0), task("new", prio=1, at=10**9)],
                    now_ms=10**9, policy=Policy(aging_per_minute=0))
    assert where(plan) == {"new": "n1"}


# -- feasibility ----------------------------------------------------------------------


def test_cpu_and_memory_must_fit():
    s = snap(node("small", cpu=1000, mem=1 * GiB), node("big", cpu=8000, mem=32 * GiB))
    plan = schedule(s, [task("cpu", cpu=4000), task("mem", cpu=100, mem=20 * GiB)], now_ms=0)
    assert where(plan) == {"cpu": "big", "mem": "big"}


def test_existing_allocations_consume_capacity():
    busy = node("busy", allocs=(Allocation("r", "busy", 0, 3500, GiB),))
    plan = schedule(snap(busy), [task("t", cpu=1000)], now_ms=0,
                    policy=Policy(preemption=False))
    assert plan.placements == {}
    assert plan.unschedulable["t"] == f"{WAITING} the 1 node that could fit it is busy"


def test_labels_must_match_exactly():
    s = snap(node("a", labels={"zone": "a", "gpu": "h100"}), node("b", labels={"zone": "b"}))
    plan = schedule(s, [task("t1", constraints={"zone": "b"}),
                        task("t2", constraints={"zone": "a", "gpu": "h100"}),
                        task("t3", constraints={"zone": "c"}),
                        task("t4", constraints={"gpu": "a100"})], now_ms=0)
    assert where(plan) == {"t1": "b", "t2": "a"}
    assert plan.unschedulable["t3"] == (
        f'{UNSCHEDULABLE} no schedulable node matches labels {{"zone": "c"}}')
    assert plan.unschedulable["t4"].startswith(UNSCHEDULABLE)


def test_unschedulable_nodes_are_never_targets():
    s = snap(node("drain", cpu=64000, schedulable=False), node("ok", cpu=2000))
    plan = schedule(s, [task("a", cpu=1500), task("b", cpu=1500)], now_ms=0)
    assert where(plan) == {"a": "ok"}
    assert plan.unschedulable["b"].startswith(WAITING)
    plan = schedule(snap(node("drain", schedulable=False)), [task("a")], now_ms=0)
    assert plan.unschedulable["a"] == (
        f"{UNSCHEDULABLE} none of 1 nodes is schedulable (draining, down or left)")


def test_labels_of_unschedulable_nodes_do_not_count():
    s = snap(node("a", labels={"zone": "a"}, schedulable=False), node("b", labels={"zone": "b"}))
    plan = schedule(s, [task("t", constraints={"zone": "a"})], now_ms=0)
    assert plan.unschedulable["t"].startswith(f"{UNSCHEDULABLE} no schedulable node matches")


def test_zero_resource_task_fits_anywhere_schedulable():
    plan = schedule(snap(node("n", cpu=0, mem=0)), [task("t", cpu=0, mem=0)], now_ms=0)
    assert where(plan) == {"t": "n"}


def test_empty_cluster_and_empty_queue():
    plan = schedule(snap(), [task("t")], now_ms=0)
    assert plan.unschedulable == {"t": f"{UNSCHEDULABLE} the cluster has no nodes"}
    plan = schedule(snap(node("n")), [], now_ms=0)
    assert plan == Plan()
    assert plan.summary() == "placed 0 of 0 tasks, preempted 0, 0 unschedulable"


# -- scoring --------------------------------------------------------------------------


def test_spread_prefers_the_least_loaded_node():
    loaded = node("a", allocs=(Allocation("r", "a", 0, 2000, GiB),))
    plan = schedule(snap(loaded, node("b")), [task("t")], now_ms=0)
    assert where(plan) == {"t": "b"}


def test_spread_distributes_a_batch_across_nodes():
    s = snap(*(node(f"n{i}") for i in range(4)))
    plan = schedule(s, [task(f"t{i}") for i in range(8)], now_ms=0)
    per_node: dict[str, int] = {}
    for nid in where(plan).values():
        per_node[nid] = per_node.get(nid, 0) + 1
    assert per_node == {"n0": 2, "n1": 2, "n2": 2, "n3": 2}


def test_binpack_prefers_the_most_loaded_node_that_fits():
    loaded = node("a", allocs=(Allocation("r", "a", 0, 2000, GiB),))
    policy = Policy(scoring="binpack")
    plan = schedule(snap(loaded, node("b")), [task("t")], now_ms=0, policy=policy)
    assert where(plan) == {"t": "a"}
    plan = schedule(snap(*(node(f"n{i}") for i in range(4))),
                    [task(f"t{i}") for i in range(4)], now_ms=0, policy=policy)
    assert set(where(plan).values()) == {"n0"}


def test_score_uses_the_tighter_of_cpu_and_memory():
    # a: cpu 25% used, memory 75% used; b: cpu 50% used, memory 50% used
    a = node("a", allocs=(Allocation("ra", "a", 0, 1000, 12 * GiB),))
    b = node("b", allocs=(Allocation("rb", "b", 0, 2000, 8 * GiB),))
    plan = schedule(snap(a, b), [task("t", cpu=100, mem=0)], now_ms=0)
    assert where(plan) == {"t": "b"}


def test_ties_break_by_node_id_not_input_order():
    plan = schedule(snap(node("z"), node("m"), node("a")), [task("t")], now_ms=0)
    assert where(plan) == {"t": "a"}


def test_cpu_tasks_avoid_gpu_nodes_while_others_fit():
    gpu = node("gpu", cpu=64000, mem=256 * GiB, gpus={0: 80 * GiB})
    cpu = node("cpu", cpu=2000, allocs=(Allocation("r", "cpu", 0, 500, GiB),))
    plan = schedule(snap(gpu, cpu), [task("a"), task("b")], now_ms=0)
    assert where(plan) == {"a": "cpu", "b": "gpu"}  # b no longer fits on cpu
    plan = schedule(snap(gpu, cpu), [task("a")], now_ms=0,
                    policy=Policy(reserve_gpu_nodes=False))
    assert where(plan) == {"a": "gpu"}


def test_preferred_node_wins_when_feasible_and_is_not_required():
    s = snap(node("a"), node("b", allocs=(Allocation("r", "b", 0, 2000, GiB),)))
    plan = schedule(s, [task("t", preferred_nodes=("b",))], now_ms=0)
    assert where(plan) == {"t": "b"}
    plan = schedule(s, [task("t", cpu=3000, preferred_nodes=("b", "gone"))], now_ms=0)
    assert where(plan) == {"t": "a"}


def test_unknown_policy_scoring_is_rejected():
    with pytest.raises(InvalidArgument):
        Policy(scoring="random")  # type: ignore[arg-type]


# -- GPUs -----------------------------------------------------------------------------


def test_lowest_free_gpu_indices_are_chosen():
    n = node("g", cpu=64000, mem=256 * GiB, gpus={i: 80 * GiB for i in range(8)},
             allocs=(Allocation("r", "g", 0, 1000, GiB, (0, 2)),))
    plan = schedule(snap(n), [task("a", gpus=2), task("b", gpus=3)], now_ms=0)
    assert plan.placements["a"] == Placement("a", "g", (1, 3))
    assert plan.placements["b"] == Placement("b", "g", (4, 5, 6))


def test_gpu_memory_floor_selects_devices_and_nodes():
    mixed = node("mixed", cpu=64000, mem=256 * GiB,
                 gpus={0: 24 * GiB, 1: 80 * GiB, 2: 24 * GiB, 3: 80 * GiB})
    plan = schedule(snap(mixed), [task("t", gpus=2, gpu_memory_bytes=40 * GiB)], now_ms=0)
    assert plan.placements["t"].gpu_indices == (1, 3)
    plan = schedule(snap(mixed), [task("t", gpus=3, gpu_memory_bytes=40 * GiB)], now_ms=0)
    assert plan.unschedulable["t"] == (
        f"{UNSCHEDULABLE} needs 3 gpus with 40 GiB each, largest node has 2")


def test_device_indices_need_not_be_contiguous():
    n = node("g", cpu=64000, mem=256 * GiB, gpus={7: 80 * GiB, 3: 80 * GiB, 5: 80 * GiB})
    plan = schedule(snap(n), [task("a", gpus=1), task("b", gpus=2)], now_ms=0)
    assert plan.placements["a"].gpu_indices == (3,)
    assert plan.placements["b"].gpu_indices == (5, 7)


def test_gpu_tasks_never_share_a_device_within_a_plan():
    n = node("g", cpu=64000, mem=256 * GiB, gpus={0: GiB, 1: GiB})
    plan = schedule(snap(n), [task(f"t{i}", gpus=1) for i in range(3)], now_ms=0)
    got = sorted(p.gpu_indices for p in plan.placements.values())
    assert got == [(0,), (1,)]
    assert len(plan.unschedulable) == 1


def test_gpu_tasks_spread_by_gpu_load():
    a = node("a", cpu=64000, mem=256 * GiB, gpus={i: GiB for i in range(4)},
             allocs=(Allocation("r", "a", 0, 0, 0, (0, 1)),))
    b = node("b", cpu=64000, mem=256 * GiB, gpus={i: GiB for i in range(4)})
    plan = schedule(snap(a, b), [task("t", gpus=1)], now_ms=0)
    assert where(plan) == {"t": "b"}


def test_gpu_reasons():
    plan = schedule(snap(node("cpu-only")), [task("t", gpus=4)], now_ms=0)
    assert plan.unschedulable["t"] == f"{UNSCHEDULABLE} needs 4 gpus, largest node has 0"


# -- reasons --------------------------------------------------------------------------


def test_reasons_distinguish_never_fits_from_no_room_now():
    s = snap(node("a", cpu=2000, allocs=(Allocation("r", "a", 9, 2000, GiB),)), node("b"))
    plan = schedule(s, [task("huge", cpu=64000), task("bigmem", mem=1024 * GiB),
                        task("x", cpu=4000, prio=1), task("y", cpu=4000, prio=0)], now_ms=0)
    assert plan.unschedulable["huge"] == (
        f"{UNSCHEDULABLE} needs 64000m cpu, largest node has 4000m")
    assert plan.unschedulable["bigmem"] == (
        f"{UNSCHEDULABLE} needs 1 TiB memory, largest node has 16 GiB")
    assert where(plan) == {"x": "b"}
    assert plan.unschedulable["y"] == (
        f"{WAITING} the 1 node that could fit it is busy; "
        "preempting lower-priority tasks would not free enough")


def test_reason_when_no_single_node_has_everything():
    s = snap(node("cpu", cpu=64000, mem=4 * GiB), node("mem", cpu=1000, mem=512 * GiB))
    plan = schedule(s, [task("t", cpu=32000, mem=256 * GiB)], now_ms=0)
    assert plan.unschedulable["t"] == (
        f"{UNSCHEDULABLE} no single node has 32000m cpu, 256 GiB memory and 0 gpus together")


def test_reason_counts_nodes_and_mentions_labels():
    s = snap(*(node(f"n{i}", labels={"zone": "a"}, allocs=(Allocation(f"r{i}", f"n{i}", 0, 4000, 0),))
               for i in range(3)))
    plan = schedule(s, [task("t", constraints={"zone": "a"})], now_ms=0,
                    policy=Policy(preemption=False))
    assert plan.unschedulable["t"] == f"{WAITING} all 3 nodes that could fit it are busy"
    plan = schedule(s, [task("t", cpu=8000, constraints={"zone": "a"})], now_ms=0)
    assert plan.unschedulable["t"] == (
        f'{UNSCHEDULABLE} needs 8000m cpu, largest node matching {{"zone": "a"}} has 4000m')


def test_a_running_task_id_is_not_placed_again():
    s = snap(node("n", allocs=(Allocation("t", "n", 0, 100, 0),)))
    plan = schedule(s, [task("t")], now_ms=0)
    assert plan.unschedulable == {"t": f"{UNSCHEDULABLE} task is already running"}


def test_summary_sentence():
    s = snap(node("n", cpu=2000, allocs=(Allocation("v", "n", 0, 1000, 0),)))
    plan = schedule(s, [task("a", prio=5), task("b", prio=5), task("c", cpu=9000)], now_ms=0)
    assert plan.summary() == (
        "placed 2 of 3 tasks, preempted 1, 1 unschedulable")
    plan = schedule(s, [task("a", cpu=1500)], now_ms=0)
    assert plan.summary() == "placed 0 of 1 tasks, preempted 0, 1 unschedulable (1 waiting for room)"
    assert plan.waiting() == plan.unschedulable


# -- validation, purity, determinism --------------------------------------------------


def test_duplicate_pending_ids_are_rejected():
    with pytest.raises(InvalidArgument):
        schedule(snap(node("n")), [task("t"), task("t")], now_ms=0)


def test_duplicate_node_ids_are_rejected():
    with pytest.raises(InvalidArgument):
        schedule(snap(node("n"), node("n")), [task("t")], now_ms=0)


@pytest.mark.parametrize("kw", [{"cpu_millis": -1}, {"gpus": -1}, {"gang_size": 0},
                                {"gang_size": 2}, {"task_id": ""}])
def test_malformed_requests_are_rejected(kw):
    args = {"task_id": "t"} | kw
    with pytest.raises(InvalidArgument):
        TaskRequest(**args)


def test_allocation_must_be_listed_on_its_own_node():
    with pytest.raises(InvalidArgument):
        node("a", allocs=(Allocation("r", "b"),))


def test_from_tables_distributes_allocations_and_drops_unknown_nodes():
    s = ClusterSnapshot.from_tables(
        [node("a"), node("b")],
        [Allocation("r1", "a", 0, 1000), Allocation("r2", "gone", 0, 1000)])
    assert [a.task_id for a in s.allocations] == ["r1"]
    assert s.nodes[0].allocations[0].task_id == "r1"


def _mixed_inputs():
    nodes = [node(f"n{i}", cpu=8000, mem=32 * GiB,
                  gpus={0: 80 * GiB, 1: 40 * GiB} if i % 3 == 0 else None,
                  labels={"zone": "ab"[i % 2]},
                  allocs=(Allocation(f"r{i}", f"n{i}", i % 3, 2000, 4 * GiB,
                                     (0,) if i % 3 == 0 else ()),))
             for i in range(9)]
    tasks = [task(f"t{i:02d}", cpu=500 * (i % 7 + 1), mem=GiB * (i % 5 + 1), prio=i % 4,
                  at=i * 1000, gpus=i % 3 == 0 and 1 or 0,
                  constraints={"zone": "a"} if i % 5 == 0 else {})
             for i in range(40)]
    tasks += [task(f"g-{m}", cpu=3000, prio=2, gang_id="g", gang_size=3) for m in range(3)]
    return nodes, tasks


def test_same_inputs_give_identical_plans_regardless_of_input_order():
    nodes, tasks = _mixed_inputs()
    first = schedule(snap(*nodes), tasks, now_ms=99_000)
    again = schedule(snap(*nodes), tasks, now_ms=99_000)
    shuffled = schedule(snap(*reversed(nodes)), list(reversed(tasks)), now_ms=99_000)
    for other in (again, shuffled):
        assert other == first
        assert list(other.placements.items()) == list(first.placements.items())
    assert first.placements and first.preemptions and first.unschedulable


def test_inputs_are_not_mutated():
    nodes, tasks = _mixed_inputs()
    s = snap(*nodes)
    before = (repr(s), repr(tasks))
    schedule(s, tasks, now_ms=99_000)
    assert (repr(s), repr(tasks)) == before


# -- harness --------------------------------------------------------------------------


def test_harness_records_and_applies_plans():
    h = Harness([node("n", cpu=2000)])
    h.submit(task("low", cpu=2000, prio=0))
    p1 = h.step(now_ms=0)
    assert where(p1) == {"low": "n"} and "low" in h.running
    h.submit(task("high", cpu=2000, prio=5))
    p2 = h.step(now_ms=1)
    assert where(p2) == {"high": "n"}
    assert [(v.task_id, v.for_task_id) for v in p2.preemptions] == [("low", "high")]
    assert set(h.pending) == {"low"}  # requeued
    assert h.plans == [p1, p2] and h.evicted == ["low"]
    assert h.violations() == []
    h.finish("high")
    assert where(h.step(now_ms=2)) == {"low": "n"}


def test_harness_drain_moves_new_work_elsewhere():
    h = Harness([node("a"), node("b")])
    h.set_schedulable("a", False)
    h.submit(task("t1"), task("t2"))
    assert set(where(h.step()).values()) == {"b"}
