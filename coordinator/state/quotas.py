"""Per-user quotas in the replicated state: limits on pending tasks, dataset bytes and API
tokens (like Kubernetes' ResourceQuota object counts), set by an admin.

The state machine checks them as it applies a submission, from the state alone, so every
replica refuses the same commands; a refusal is RESOURCE_EXHAUSTED naming the quota, its
value and the use. A user without a quota, or a limit left unset, is unlimited. With auth
off every object has the owner "" and nobody has a quota, so nothing is ever refused.
Usage is counted when checked, never cached: nothing can drift from the tables it counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lepton.common.errors import InvalidArgument, ResourceExhausted
from lepton.v1 import security_pb2, state_pb2, tasks_pb2

if TYPE_CHECKING:
    from lepton.coordinator.state.state_machine import ClusterStateMachine

LIMITS = ("pending_tasks", "dataset_bytes", "tokens")
MAX_LIMIT = 1 << 62
MAX_LISTED = 1000  # quotas in an older client's ListQuotas answer (no page_size; ~100 bytes each)


def _copy(q: security_pb2.Quota) -> security_pb2.Quota:
    out = security_pb2.Quota()
    out.CopyFrom(q)
    return out


def check_quota_request(quota: security_pb2.Quota, unlimited: Iterable[str]) -> None:
    """What both the API and the state machine refuse: no user, unknown or clashing limits."""
    if not quota.user or len(quota.user) > 128:
        raise InvalidArgument("a quota needs a user name of 1-128 characters")
    unknown = sorted(set(unlimited) - set(LIMITS))
    if unknown:
        raise InvalidArgument(f"unknown limit {unknown[0]!r}; limits are {', '.join(LIMITS)}")
    for name in LIMITS:
        if quota.HasField(name) and name in unlimited:
            raise InvalidArgument(f"{name} is both set and lifted")
        if quota.HasField(name) and getattr(quota, name) > MAX_LIMIT:
            raise InvalidArgument(f"{name} is at most {MAX_LIMIT}")


class QuotaTable:
    """Quotas by user, and the checks `ClusterStateMachine.apply` runs before a submission."""

    def __init__(self, sm: ClusterStateMachine):
        self._sm = sm
        self.quotas: dict[str, security_pb2.Quota] = {}

    # -- commands ----------------------------------------------------------------------
    def set(self, c: state_pb2.SetQuotaCmd, at_ms: int) -> security_pb2.QuotaView:
        check_quota_request(c.quota, c.unlimited)
        quota = self.quotas.get(c.quota.user) or security_pb2.Quota(user=c.quota.user)
        for name in LIMITS:
            if c.quota.HasField(name):
                setattr(quota, name, getattr(c.quota, name))
            elif name in c.unlimited:
                quota.ClearField(name)
        if any(quota.HasField(name) for name in LIMITS):
            self.quotas[quota.user] = quota
        else:
            self.quotas.pop(quota.user, None)  # no limit left: no quota
        return self.view(quota.user)

    # -- reads -------------------------------------------------------------------------
    def view(self, user: str) -> security_pb2.QuotaView:
        quota = self.quotas.get(user) or security_pb2.Quota(user=user)
        return security_pb2.QuotaView(
            quota=_copy(quota), pending_tasks=self._pending(user),
            dataset_bytes=self._dataset_bytes(user), tokens=self._tokens(user),
        )

    def _pending(self, user: str) -> int:
        return self._sm.tasks.pending_by_owner.get(user, 0)  # kept by the table: no scan per submit

    def _dataset_bytes(self, user: str, but: str = "") -> int:
        return sum(d.size for d in self._sm.datasets.datasets.values() if d.owner == user and d.name != but)

    def _tokens(self, user: str) -> int:
        return sum(1 for t in self._sm.security.tokens.values() if t.name == user and not t.revoked)

    # -- checks (from apply) -----------------------------------------------------------
    def _limit(self, user: str, name: str) -> int | None:
        quota = self.quotas.get(user)
        return getattr(quota, name) if quota is not None and quota.HasField(name) else None

    def check_tasks(self, specs: Iterable[tasks_pb2.TaskSpec], count: int = 1) -> None:
        """New submissions (`count` pending tasks per spec; a retried request id adds none)."""
        by_request = self._sm.tasks.by_request
        adding: Counter[str] = Counter()
        for spec in specs:
            if spec.owner in self.quotas and not (spec.request_id and spec.request_id in by_request):
                adding[spec.owner] += count
        for user, n in sorted(adding.items()):
            limit = self._limit(user, "pending_tasks")
            if limit is None:
                continue
            pending = self._pending(user)
            if pending + n > limit:
                raise ResourceExhausted(
                    f'quota pending_tasks of user "{user}" is {limit}: {pending} pending, '
                    f"this submission adds {n}"
                )

    def check_job(self, c: state_pb2.SubmitJobCmd) -> None:
        rid = c.spec.request_id
        if not (rid and rid in self._sm.tasks.job_requests):
            self.check_tasks([tasks_pb2.TaskSpec(owner=c.spec.owner)], count=c.nodes)

    def check_dataset(self, c: state_pb2.PutDatasetCmd) -> None:
        self.check_dataset_bytes(c.dataset.owner, c.dataset.name, sum(s.size for s in c.dataset.shards))

    def check_dataset_bytes(self, user: str, name: str, size: int) -> None:
        """A dataset `name` of `size` bytes; a new version replaces the old one's bytes."""
        limit = self._limit(user, "dataset_bytes")
        if limit is None:
            return
        used = self._dataset_bytes(user, but=name)
        if used + size > limit:
            raise ResourceExhausted(
                f'quota dataset_bytes of user "{user}" is {limit}: {used} used by other datasets, '
                f'"{name}" adds {size}'
            )

    def check_token(self, c: state_pb2.CreateTokenCmd) -> None:
        limit = self._limit(c.name, "tokens")
        if limit is not None and (used := self._tokens(c.name)) + 1 > limit:
            raise ResourceExhausted(
                f'quota tokens of user "{c.name}" is {limit}: {used} tokens not revoked'
            )

    # -- snapshots ---------------------------------------------------------------------
    def fill(self, snap: state_pb2.StateSnapshot) -> None:
        for user in sorted(self.quotas):
            snap.quotas.append(self.quotas[user])

    def rebuild(self, snap: state_pb2.StateSnapshot) -> None:
        self.quotas = {q.user: _copy(q) for q in snap.quotas}
