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

A removed deployment's figures go with it (`forget`, called by the endpoint table when the
deployment leaves the state), and reports naming a deployment the state lacks are not kept,
so what is held is bounded by the deployments there are. A deployment made again under the
same name starts from zero: an agent that did not hear of the removal (its endpoint stream
was down) still reports the old counters under that name, so each router's last counters
of the removed one are kept for TOMBSTONE_S and subtracted from its reports of the new one
while they run on from them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lepton.v1 import serving_pb2

WINDOW_S = 10.0
# How long a removed deployment's last counters per router are kept, to be subtracted from
# a same-named successor's reports: routers hear of the removal within seconds.
TOMBSTONE_S = 120.0
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

    def covers(self, base: _Sample) -> bool:
        """These counters could have run on from `base`'s (none of them is smaller)."""
        return (self.requests >= base.requests and self.errors >= base.errors and self.batches >= base.batches
                and self.batch_rows >= base.batch_rows and len(self.buckets) == len(base.buckets)
                and all(a >= b for a, b in zip(self.buckets, base.buckets, strict=True)))

    def minus(self, base: _Sample) -> _Sample:
        return _Sample(self.at, self.requests - base.requests, self.errors - base.errors,
                       tuple(a - b for a, b in zip(self.buckets, base.buckets, strict=True)),
                       self.batch_rows - base.batch_rows, self.batches - base.batches)


@dataclass
class _RouterSeries:
    """One agent's counters for one deployment: its reports in the window, and what earlier
    incarnations of the agent had counted (`retired`)."""

    started_at_ms: int
    bounds: tuple[float, ...]
    samples: deque[_Sample] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))
    retired_requests: int = 0
    retired_errors: int = 0
    base: _Sample | None = None  # a removed namesake's last counters on this router, subtracted


@dataclass
class _Tombstone:
    removed_at: float
    started_at_ms: int
    bounds: tuple[float, ...]
    last: _Sample


class ServingStats:
    """Router reports in, DeploymentStats out. Used on the leader's event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, window_s: float = WINDOW_S):
        self._clock = clock
        self._window_s = window_s
        self._series: dict[tuple[str, str], _RouterSeries] = {}  # (deployment, node id)
        self._tombstones: dict[tuple[str, str], _Tombstone] = {}

    def report(self, request: serving_pb2.ReportReplicasRequest,
               exists: Callable[[str], bool] = lambda _name: True) -> None:
        """Take one agent's router counters (the caller has checked it is that node); those
        of deployments `exists` denies are dropped."""
        now = self._clock()
        for s in request.stats:
            key = (s.deployment, request.node_id)
            bounds = tuple(s.bucket_le_ms)
            if len(s.bucket_counts) != len(bounds) or not exists(s.deployment):
                continue  # malformed (bounds and counts must pair up), or removed
            sample = _Sample(now, s.requests, s.errors, tuple(s.bucket_counts), s.batch_rows, s.batches)
            series = self._series.get(key)
            if series is None or series.bounds != bounds:
                series = self._series[key] = _RouterSeries(request.started_at_ms, bounds)
                series.base = self._base(key, request.started_at_ms, bounds, now)
            if series.base is not None and (series.started_at_ms != request.started_at_ms
                                            or not sample.covers(series.base)):
                series.base = None  # the router started this name's counters over
            if series.base is not None:
                sample = sample.minus(series.base)
            if series.started_at_ms != request.started_at_ms or (
                    series.samples and sample.requests < series.samples[-1].requests):
                # The agent restarted, or its router started this deployment's counters over
                # (the deployment left its endpoint set for a while): keep what they had.
                last = series.samples[-1] if series.samples else None
                if last is not None:
                    series.retired_requests += last.requests
                    series.retired_errors += last.errors
                series.samples.clear()
                series.started_at_ms = request.started_at_ms
            series.samples.append(sample)
            while len(series.samples) > 2 and series.samples[1].at < now - self._window_s:
                series.samples.popleft()  # keep one sample at or before the window's start

    def _base(self, key: tuple[str, str], started_at_ms: int, bounds: tuple[float, ...],
              now: float) -> _Sample | None:
        """The removed namesake's last counters on this router, if they may still run on."""
        stone = self._tombstones.pop(key, None)
        if stone is None or now - stone.removed_at > TOMBSTONE_S:
            return None
        return stone.last if (stone.started_at_ms, stone.bounds) == (started_at_ms, bounds) else None

    def forget(self, deployment: str) -> None:
        """A removed deployment's numbers go with it (module doc: a tombstone per router)."""
        now = self._clock()
        for key in [k for k, stone in self._tombstones.items() if now - stone.removed_at > TOMBSTONE_S]:
            del self._tombstones[key]
        for key in [k for k in self._series if k[0] == deployment]:
            series = self._series.pop(key)
            if series.samples:
                last = series.samples[-1]
                if series.base is not None:  # back to the router's own counters
                    last = _Sample(last.at, last.requests + series.base.requests, last.errors + series.base.errors,
                                   tuple(a + b for a, b in zip(last.buckets, series.base.buckets, strict=True)),
                                   last.batch_rows + series.base.batch_rows, last.batches + series.base.batches)
                self._tombstones[key] = _Tombstone(now, series.started_at_ms, series.bounds, last)

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
