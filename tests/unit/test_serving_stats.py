"""A removed deployment's figures on the leader (coordinator/api/serving_stats.py): forgotten
with it, never kept for a name the state lacks, and not inherited by a namesake made again,
even from a router that kept counting under the old name's counters."""

from __future__ import annotations

from lepton.agent.predict_router import DeploymentCounters
from lepton.coordinator.api import serving_stats
from lepton.coordinator.api.serving_stats import ServingStats
from tests.unit.test_predict_router_stats import Clock, report


def counted(n: int, counters: DeploymentCounters | None = None) -> DeploymentCounters:
    counters = counters or DeploymentCounters()
    for _ in range(n):
        counters.answered(400.0, 4)
    return counters


def test_reports_of_a_deployment_the_state_lacks_are_not_kept():
    table = ServingStats(clock=Clock())
    table.report(report("A", counted(3), name="gone"), exists=lambda name: name != "gone")
    table.report(report("A", counted(3), name="web"), exists=lambda name: name != "gone")
    assert table.deployments() == {"web"}


def test_a_namesake_made_again_starts_from_zero_even_where_the_router_kept_counting():
    clock = Clock()
    table = ServingStats(clock=clock)
    kept = counted(50)  # agent A never heard of the removal: its counters run on
    table.report(report("A", kept))
    table.report(report("B", counted(7)))
    table.forget("digits")
    assert table.stats("digits").requests == 0 and table.deployments() == set()
    clock.now += 5
    counted(2, kept)
    table.report(report("A", kept))  # 52: 2 of them the new deployment's
    fresh = DeploymentCounters()
    fresh.answered(1.0, 1)  # agent B started over (it saw the removal)
    table.report(report("B", fresh))
    s = table.stats("digits")
    assert (s.requests, s.errors) == (3, 0)
    assert s.mean_batch_rows == (2 * 4 + 1) / 3


def test_a_router_that_started_over_after_the_removal_is_counted_whole():
    clock = Clock()
    table = ServingStats(clock=clock)
    table.report(report("A", counted(50)))
    table.forget("digits")
    clock.now += 1
    table.report(report("A", counted(60)))  # started over, and already past the old count
    # By the numbers alone this reads as running on: 10, not 60 (a doubt TOMBSTONE_S bounds).
    assert table.stats("digits").requests == 10
    table.forget("digits")
    clock.now += 1
    table.report(report("A", counted(5)))  # fewer than before: surely started over
    assert table.stats("digits").requests == 5


def test_tombstones_expire_so_removed_deployments_hold_nothing():
    clock = Clock()
    table = ServingStats(clock=clock)
    for i in range(100):
        table.report(report("A", counted(1), name=f"d{i}"))
        table.forget(f"d{i}")
    clock.now += serving_stats.TOMBSTONE_S + 1
    table.forget("other")
    assert table._series == {} and table._tombstones == {}
