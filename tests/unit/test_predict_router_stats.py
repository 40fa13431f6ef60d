"""The leader's merge of router counters (coordinator/api/serving_stats.py), fed with what
PredictRouter.stats() reports."""

from __future__ import annotations

import pytest

from lepton.agent.predict_router import LATENCY_BUCKETS_MS, DeploymentCounters
from lepton.coordinator.api.serving_stats import ServingStats, quantile
from lepton.v1 import serving_pb2


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(node: str, counters: DeploymentCounters, started_at_ms: int = 1, name: str = "digits"):
    stats = serving_pb2.RouterStats(deployment=name, requests=counters.requests, errors=counters.errors,
                                    bucket_le_ms=list(LATENCY_BUCKETS_MS),
                                    bucket_counts=counters.cumulative_buckets(),
                                    batch_rows=counters.batch_rows, batches=counters.batches)
    return serving_pb2.ReportReplicasRequest(node_id=node, stats=[stats], started_at_ms=started_at_ms)


def test_rate_and_percentiles_merge_every_router_over_the_window():
    clock = Clock()
    table = ServingStats(clock=clock)
    a, b = DeploymentCounters(), DeploymentCounters()
    table.report(report("A", a))
    table.report(report("B", b))
    clock.now += 2
    for _ in range(90):
        a.answered(4.0, 8)  # the (3, 5] ms bucket
    for _ in range(10):
        b.answered(400.0, 1)  # the (300, 500] ms bucket
    b.failed(pr_code("UNAVAILABLE"))
    table.report(report("A", a))
    table.report(report("B", b))
    s = table.stats("digits")
    assert (s.requests, s.errors) == (101, 1)
    assert s.requests_per_s == pytest.approx(101 / 2)
    assert 3 < s.p50_ms <= 5 and 300 < s.p99_ms <= 500
    assert s.mean_batch_rows == pytest.approx((90 * 8 + 10) / 100)
    assert table.stats("other") == serving_pb2.DeploymentStats()


def test_an_idle_window_keeps_totals_and_lifetime_percentiles_but_no_rate():
    clock = Clock()
    table = ServingStats(clock=clock)
    a = DeploymentCounters()
    table.report(report("A", a))
    for _ in range(10):
        a.answered(4.0, 1)
    clock.now += 1
    table.report(report("A", a))
    clock.now += 30  # long after: the agent still reports, nothing new
    table.report(report("A", a))
    clock.now += 2
    table.report(report("A", a))
    s = table.stats("digits")
    assert s.requests == 10 and s.requests_per_s == 0
    assert 3 < s.p50_ms <= 5  # from everything so far, as the window saw none


def test_an_agent_restart_keeps_what_it_had_counted():
    clock = Clock()
    table = ServingStats(clock=clock)
    before = DeploymentCounters()
    for _ in range(5):
        before.answered(1.0, 1)
    table.report(report("A", before, started_at_ms=1))
    after = DeploymentCounters()
    after.answered(1.0, 1)
    clock.now += 1
    table.report(report("A", after, started_at_ms=2))
    assert table.stats("digits").requests == 6


def test_counters_started_over_by_the_router_are_kept_too():
    clock = Clock()
    table = ServingStats(clock=clock)
    before = DeploymentCounters()
    for _ in range(4):
        before.answered(1.0, 1)
    table.report(report("A", before))
    again = DeploymentCounters()  # same agent (started_at), counters from zero
    again.answered(1.0, 1)
    clock.now += 1
    table.report(report("A", again))
    assert table.stats("digits").requests == 5


def test_forget_and_malformed_reports():
    table = ServingStats(clock=Clock())
    a = DeploymentCounters()
    a.answered(1.0, 1)
    bad = report("A", a)
    del bad.stats[0].bucket_counts[-1]  # counts that do not pair with the bounds: ignored
    table.report(bad)
    assert table.deployments() == set()
    table.report(report("A", a))
    table.forget("digits")
    assert table.stats("digits").requests == 0


def test_quantile_interpolates_inside_a_bucket():
    assert quantile(0.5, [10.0, 20.0, float("inf")], [0, 10, 10]) == pytest.approx(15.0)
    assert quantile(0.99, [10.0, float("inf")], [0, 5]) == 10.0  # past the last finite bound
    assert quantile(0.5, [10.0], [0]) == 0.0


def pr_code(name: str):
    import grpc

    return grpc.StatusCode[name]
