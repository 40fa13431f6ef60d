"""The leader's view of how deployments answer: every agent's router counters, merged.

Each agent reports its RouterStats (cumulative since it started) with its ReplicaReports
(`Deployments.ReportReplicas`, every ~2 s). Here they become one DeploymentStats per
deployment for `serve show` / `serve ls`:

- requests, errors: totals over every router, including what agents counted before they
  restarted (a report with a new `started_at_ms` starts that node's counters over);
- requests_per_s: over the last WINDOW_S, from each router's first and last report in it;
- p50/p99: from the merged latency buckets of the window (linear inside a bucket, as
  Prometheus' histogram_quantile); with no request in the window, over everything so far;
- mean_batch_rows: rows of the batch each answered request ran in, on average.

Soft state like the endpoint table: a new leader starts empty and fills from the next
reports (totals then count from its first report of each agent).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lepton.v1 import serving_pb2

WINDOW_S = 10.0
# Reports kept per router and deployment: a window's worth at one every ~2 s, with room.
_MAX_SAMPLES = 64


@dataclass
class _Sample:
    at: float
    requests: int
    errors: int
    buckets: tuple[int, ...]  # cumulative per bound
    batch_rows: int
    batches: int


@dataclass
class _RouterSeries:
    """One agent's counters for one deployment: its reports in the window, and what earlier
    incarnations of the agent had counted (`retired`)."""

    started_at_ms: int
    bounds: tuple[float, ...]
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))
    retired_requests: int = 0
    retired_errors: int = 0


class ServingStats:
    """Router reports in, DeploymentStats out. Used on the leader's event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S):
        self._clock = clock
        self._window_s = window_s
        self._series: dict[tuple[str, str], _RouterSeries] = {}  # (deployment, node id)

    def report(self, request: serving_pb2.ReportReplicasRequest) -> None:
        """Take one agent's router counters (the caller has checked it is that node)."""
        now = self._clock()
        for s in request.stats:
            key = (s.deployment, request.node_id)
            bounds = tuple(s.bucket_le_ms)
            if len(s.bucket_counts) != len(bounds):
                continue  # malformed: bounds and counts must pair up
            series = self._series.get(key)
            if series is None or series.bounds != bounds:
                series = self._series[key] = _RouterSeries(request.started_at_ms, bounds)
            elif series.started_at_ms != request.started_at_ms or (
                    series.samples and s.requests < series.samples[-1].requests):
                # The agent restarted, or its router started this deployment's counters over
                # (the deployment left its endpoint set for a while): keep what they had.
                last = series.samples[-1] if series.samples else None
                if last is not None:
                    series.retired_requests += last.requests
                    series.retired_errors += last.errors
                series.samples.clear()
                series.started_at_ms = request.started_at_ms
            series.samples.append(_Sample(now, s.requests, s.errors, tuple(s.bucket_counts),
                                          s.batch_rows, s.batches))
            while len(series.samples) > 2 and series.samples[1].at < now - self._window_s:
                series.samples.popleft()  # keep one sample at or before the window's start

    def forget(self, deployment: str) -> None:
        """A deleted deployment's numbers go with it."""
        for key in [k for k in self._series if k[0] == deployment]:
            del self._series[key]

    def deployments(self) -> set[str]:
        return {k[0] for k in self._series}

    def stats(self, deployment: str) -> serving_pb2.DeploymentStats:
        """What `serve show` prints for `deployment`; zeros when no router reported it."""
        now = self._clock()
        series = [s for (name, _), s in self._series.items() if name == deployment and s.samples]
        out = serving_pb2.DeploymentStats()
        window_requests, window_span = 0, 0.0
        window_buckets: dict[tuple[float, ...], list[int]] = {}
        total_buckets: dict[tuple[float, ...], list[int]] = {}
        rows = batches = 0
        for s in series:
            last = s.samples[-1]
            out.requests += s.retired_requests + last.requests
            out.errors += s.retired_errors + last.errors
            rows += last.batch_rows
            batches += last.batches
            _add(total_buckets.setdefault(s.bounds, [0] * len(s.bounds)), last.buckets)
            if last.at < now - self._window_s:
                continue  # this router has not reported lately: nothing from it in the window
            first = s.samples[0]
            window_requests += last.requests - first.requests
            window_span = max(window_span, last.at - first.at)
            _add(window_buckets.setdefault(s.bounds, [0] * len(s.bounds)),
                 (b - a for a, b in zip(first.buckets, last.buckets, strict=True)))
        if window_span > 0:
            out.requests_per_s = window_requests / window_span
        buckets = window_buckets if any(any(b) for b in window_buckets.values()) else total_buckets
        if buckets:
            bounds, counts = _merge(buckets)
            out.p50_ms = quantile(0.50, bounds, counts)
            out.p99_ms = quantile(0.99, bounds, counts)
        out.mean_batch_rows = rows / batches if batches else 0.0
        return out


def _add(into: list[int], counts: Iterable[int]) -> None:
    for i, n in enumerate(counts):
        into[i] += n


def _merge(by_bounds: dict[tuple[float, ...], list[int]]) -> tuple[list[float], list[int]]:
    """One cumulative histogram from several (agents of one version share their bounds; a
    mix is merged on the union of bounds, each count at its own bound)."""
    if len(by_bounds) == 1:
        [(bounds, counts)] = by_bounds.items()
        return list(bounds), counts
    all_bounds = sorted({b for bounds in by_bounds for b in bounds})
    merged = [0] * len(all_bounds)
    for bounds, counts in by_bounds.items():
        j = 0
        for i, bound in enumerate(all_bounds):
            while j + 1 < len(bounds) and bounds[j + 1] <= bound:
                j += 1
            merged[i] += counts[j] if bounds[j] <= bound else 0
    return all_bounds, merged


def quantile(q: float, bounds: list[float], cumulative: list[int]) -> float:
    """The q-quantile (ms) of a cumulative histogram, linear inside the bucket it falls in;
    0 with no observations. In the +Inf bucket: the last finite bound."""
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return 0.0
    rank = q * total
    lower_bound, lower_count = 0.0, 0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            inside = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / inside if inside else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound
