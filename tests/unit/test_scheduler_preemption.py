"""Scheduler: preemption and gangs."""

from __future__ import annotations

from lepton.coordinator.scheduler import (
    UNSCHEDULABLE,
    WAITING,
    Allocation,
    ClusterSnapshot,
    NodeView,
    Plan,
    Policy,
    TaskRequest,
    schedule,
)

GiB = 1 << 30


def node(nid: str, cpu: int = 4000, mem: int = 16 * GiB, gpus: dict[int, int] | None = None,
         allocs: tuple[Allocation, ...] = (), schedulable: bool = True) -> NodeView:
    return NodeView(nid, cpu, mem, gpus or {}, {}, schedulable, allocs)


def run(nid: str, tid: str, cpu: int, prio: int, gang: str | None = None,
        gpus: tuple[int, ...] = ()) -> Allocation:
    return Allocation(tid, nid, prio, cpu, 0, gpus, gang)


def task(tid: str, cpu: int = 1000, prio: int = 0, at: int = 0, **kw) -> TaskRequest:
    return TaskRequest(tid, prio, at, cpu, 0, **kw)


def snap(*nodes: NodeView) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(nodes))


def where(plan: Plan) -> dict[str, str]:
    return {t: p.node_id for t, p in plan.placements.items()}


def victims(plan: Plan) -> set[str]:
    return {v.task_id for v in plan.preemptions}


# -- preemption -----------------------------------------------------------------------


def test_preempts_the_smallest_sufficient_set_of_lower_priority():
    n = node("n", allocs=(run("n", "small1", 500, 1), run("n", "small2", 500, 1),
                          run("n", "big", 2000, 1), run("n", "other", 1000, 3)))
    plan = schedule(snap(n), [task("t", cpu=2000, prio=5)], now_ms=0)
    assert where(plan) == {"t": "n"}
    # greedy takes small1, small2, big; pruning drops the smalls since big alone suffices
    assert victims(plan) == {"big"}
    assert [(v.task_id, v.node_id, v.for_task_id) for v in plan.preemptions] == [
        ("big", "n", "t")]


def test_lowest_priority_victims_go_first():
    n = node("n", allocs=(run("n", "p1", 1000, 1), run("n", "p0", 1000, 0),
                          run("n", "p2", 1000, 2), run("n", "p3", 1000, 3)))
    plan = schedule(snap(n), [task("t", cpu=2000, prio=9)], now_ms=0)
    assert victims(plan) == {"p0", "p1"}


def test_never_preempts_equal_or_higher_priority():
    n = node("n", allocs=(run("n", "eq", 2000, 5), run("n", "hi", 2000, 7)))
    plan = schedule(snap(n), [task("t", cpu=1000, prio=5)], now_ms=0)
    assert plan.preemptions == ()
    assert plan.unschedulable["t"].startswith(WAITING)


def test_aging_does_not_grant_preemption():
    n = node("n", allocs=(run("n", "r", 4000, 3),))
    plan = schedule(snap(n), [task("t", prio=1, at=0)], now_ms=10**9,
                    policy=Policy(aging_per_minute=10, max_aging=100))
    assert plan.preemptions == ()


def test_no_preemption_for_a_task_that_could_never_fit():
    n = node("n", allocs=(run("n", "r", 4000, 0),))
    plan = schedule(snap(n), [task("t", cpu=8000, prio=9)], now_ms=0)
    assert plan.preemptions == ()
    assert plan.unschedulable["t"].startswith(UNSCHEDULABLE)


def test_no_preemption_when_something_fits_without_it():
    busy = node("a", allocs=(run("a", "r", 4000, 0),))
    plan = schedule(snap(busy, node("b")), [task("t", prio=9)], now_ms=0)
    assert where(plan) == {"t": "b"} and plan.preemptions == ()


def test_preemption_can_be_disabled():
    n = node("n", allocs=(run("n", "r", 4000, 0),))
    plan = schedule(snap(n), [task("t", prio=9)], now_ms=0, policy=Policy(preemption=False))
    assert plan.preemptions == ()
    assert plan.unschedulable["t"] == f"{WAITING} the 1 node that could fit it is busy"


def test_prefers_the_node_with_the_least_valuable_victims():
    a = node("a", allocs=(run("a", "a2", 4000, 2),))
    b = node("b", allocs=(run("b", "b1", 4000, 1),))
    c = node("c", allocs=(run("c", "c0x", 2000, 0), run("c", "c0y", 2000, 0)))
    plan = schedule(snap(a, b, c), [task("t", cpu=4000, prio=5)], now_ms=0)
    assert where(plan) == {"t": "c"} and victims(plan) == {"c0x", "c0y"}
    # same top priority: fewer victims wins
    d = node("d", allocs=(run("d", "d0", 4000, 0),))
    plan = schedule(snap(c, d), [task("t", cpu=4000, prio=5)], now_ms=0)
    assert where(plan) == {"t": "d"} and victims(plan) == {"d0"}


def test_gpu_preemption_frees_the_right_devices():
    gpus = {i: 80 * GiB for i in range(4)}
    n = node("g", cpu=64000, gpus=gpus, allocs=(
        run("g", "hi", 1000, 9, gpus=(0, 1)), run("g", "lo", 1000, 0, gpus=(2, 3))))
    plan = schedule(snap(n), [task("t", gpus=2, prio=5)], now_ms=0)
    assert victims(plan) == {"lo"}
    assert plan.placements["t"].gpu_indices == (2, 3)


def test_preemption_respects_gpu_memory_floor():
    n = node("g", cpu=64000, gpus={0: 24 * GiB, 1: 80 * GiB}, allocs=(
        run("g", "on-small", 1000, 0, gpus=(0,)), run("g", "on-big", 1000, 1, gpus=(1,))))
    plan = schedule(snap(n), [task("t", gpus=1, gpu_memory_bytes=40 * GiB, prio=5)], now_ms=0)
    assert victims(plan) == {"on-big"}
    assert plan.placements["t"].gpu_indices == (1,)


def test_victims_gang_mates_are_preempted_everywhere():
    a = node("a", allocs=(run("a", "g-0", 4000, 0, gang="g"),))
    b = node("b", allocs=(run("b", "g-1", 4000, 0, gang="g"),))
    plan = schedule(snap(a, b), [task("t", cpu=4000, prio=5)], now_ms=0)
    assert victims(plan) == {"g-0", "g-1"}
    assert {(v.task_id, v.node_id) for v in plan.preemptions} == {("g-0", "a"), ("g-1", "b")}
    assert all(v.for_task_id == "t" for v in plan.preemptions)
    assert len(plan.placements) == 1


def test_freed_gang_mate_capacity_is_usable_in_the_same_plan():
    a = node("a", allocs=(run("a", "g-0", 4000, 0, gang="g"),))
    b = node("b", allocs=(run("b", "g-1", 4000, 0, gang="g"),))
    plan = schedule(snap(a, b), [task("t", cpu=4000, prio=5), task("u", cpu=4000, prio=1)],
                    now_ms=0)
    assert set(where(plan).values()) == {"a", "b"} and len(plan.preemptions) == 2


def test_a_gang_with_a_protected_mate_is_not_a_victim():
    a = node("a", allocs=(run("a", "g-0", 4000, 0, gang="g"),))
    b = node("b", allocs=(run("b", "g-1", 4000, 9, gang="g"),))
    plan = schedule(snap(a, b), [task("t", cpu=4000, prio=5)], now_ms=0)
    assert plan.preemptions == ()


def test_a_single_victim_beats_a_gang_victim():
    a = node("a", allocs=(run("a", "g-0", 4000, 0, gang="g"),))
    b = node("b", allocs=(run("b", "g-1", 4000, 0, gang="g"),))
    c = node("c", allocs=(run("c", "solo", 4000, 0),))
    plan = schedule(snap(a, b, c), [task("t", cpu=4000, prio=5)], now_ms=0)
    assert victims(plan) == {"solo"}


def test_a_victim_is_preempted_at_most_once_per_plan():
    n = node("n", cpu=4000, allocs=(run("n", "v", 2000, 0),))
    other = node("m", cpu=2000, allocs=(run("m", "w", 2000, 0),))
    plan = schedule(snap(n, other), [task(f"t{i}", cpu=2000, prio=5) for i in range(4)],
                    now_ms=0)
    ids = [v.task_id for v in plan.preemptions]
    assert sorted(ids) == ["v", "w"] and len(ids) == len(set(ids))
    assert len(plan.placements) == 3  # n's free half, v's half, w's node
    assert len(plan.unschedulable) == 1


def test_tasks_placed_in_this_plan_are_not_preempted():
    n = node("n", cpu=1000)
    plan = schedule(snap(n), [task("low", prio=0, at=0), task("high", prio=5, at=10**9)],
                    now_ms=10**9, policy=Policy(aging_per_minute=1, max_aging=100))
    assert where(plan) == {"low": "n"} and plan.preemptions == ()


def test_preemption_never_targets_unschedulable_nodes():
    drain = node("d", schedulable=False, allocs=(run("d", "r", 4000, 0),))
    plan = schedule(snap(drain), [task("t", prio=5)], now_ms=0)
    assert plan.preemptions == ()


# -- gangs ----------------------------------------------------------------------------


def gang(gid: str, size: int, cpu: int = 4000, prio: int = 0, at: int = 0, **kw):
    return [task(f"{gid}-{m}", cpu=cpu, prio=prio, at=at, gang_id=gid, gang_size=size, **kw)
            for m in range(size)]


def test_gang_is_placed_on_distinct_nodes():
    plan = schedule(snap(*(node(f"n{i}", cpu=8000) for i in range(3))), gang("g", 3, cpu=1000),
                    now_ms=0)
    assert len(set(where(plan).values())) == 3


def test_gang_may_share_nodes_when_asked():
    plan = schedule(snap(node("n", cpu=8000)), gang("g", 3, cpu=1000, gang_distinct_nodes=False),
                    now_ms=0)
    assert set(where(plan).values()) == {"n"}


def test_gang_is_all_or_nothing_and_reserves_nothing_when_it_fails():
    nodes = [node("a"), node("b"), node("c", allocs=(run("c", "keep", 4000, 9),))]
    plan = schedule(snap(*nodes), gang("g", 3, prio=5) + [task("small", cpu=3000)], now_ms=0)
    assert not any(t.startswith("g-") for t in plan.placements)
    assert all(plan.unschedulable[f"g-{m}"] == (
        f"{WAITING} gang g: only 2 of 3 members fit at once; all-or-nothing, so none is placed")
        for m in range(3))
    assert "small" in plan.placements  # the failed gang held no capacity


def test_two_competing_gangs_do_not_both_half_place():
    nodes = [node(f"n{i}") for i in range(3)]
    plan = schedule(snap(*nodes), gang("g1", 2, at=0) + gang("g2", 2, at=1), now_ms=10)
    placed = set(plan.placements)
    assert placed == {"g1-0", "g1-1"}
    assert all(plan.unschedulable[f"g2-{m}"].startswith(WAITING) for m in range(2))


def test_gang_ordering_uses_its_best_member():
    nodes = [node("a"), node("b")]
    members = gang("g", 2, at=100)
    members[1] = TaskRequest("g-1", 5, 100, 4000, gang_id="g", gang_size=2)
    plan = schedule(snap(*nodes), [task("solo", cpu=4000, prio=3)] + members, now_ms=100)
    assert set(plan.placements) == {"g-0", "g-1"}


def test_gang_waits_for_all_members():
    plan = schedule(snap(node("a"), node("b")), gang("g", 3)[:2], now_ms=0)
    assert plan.placements == {}
    assert plan.unschedulable["g-0"] == f"{WAITING} gang g has 2 of 3 members pending"


def test_gang_that_needs_more_nodes_than_exist_is_unschedulable():
    plan = schedule(snap(node("a"), node("b")), gang("g", 3, cpu=100), now_ms=0)
    assert plan.unschedulable["g-0"] == (
        f"{UNSCHEDULABLE} gang g needs 3 distinct nodes, only 2 could ever hold its members")


def test_gang_with_an_impossible_member_is_unschedulable():
    members = gang("g", 2, cpu=100)
    members[1] = task("g-1", cpu=99000, gang_id="g", gang_size=2)
    plan = schedule(snap(node("a"), node("b")), members, now_ms=0)
    assert plan.unschedulable["g-0"] == plan.unschedulable["g-1"] == (
        f"{UNSCHEDULABLE} gang g: member g-1 needs 99000m cpu, largest node has 4000m")


def test_gang_members_must_agree_on_size():
    members = [task("g-0", gang_id="g", gang_size=2), task("g-1", gang_id="g", gang_size=3)]
    plan = schedule(snap(node("a"), node("b")), members, now_ms=0)
    assert plan.unschedulable["g-0"].startswith(f"{UNSCHEDULABLE} gang g members disagree")


def test_gang_preemption_is_rolled_back_when_the_gang_still_does_not_fit():
    a = node("a", allocs=(run("a", "va", 4000, 0),))
    b = node("b", allocs=(run("b", "vb", 4000, 9),))
    plan = schedule(snap(a, b), gang("g", 2, prio=5), now_ms=0)
    assert plan.preemptions == () and plan.placements == {}


def test_gang_can_preempt_for_every_member():
    a = node("a", allocs=(run("a", "va", 4000, 0),))
    b = node("b", allocs=(run("b", "vb", 4000, 1),))
    plan = schedule(snap(a, b), gang("g", 2, prio=5), now_ms=0)
    assert victims(plan) == {"va", "vb"}
    assert set(where(plan).values()) == {"a", "b"}
