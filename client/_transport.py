"""Telling a failure to reach a server from a server's own answer, for the retry loop.

gRPC reports both as UNAVAILABLE and gives no structured signal, only its status details,
whose wording has been stable for years. Anything unrecognised counts as the server's answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from lepton.common.errors import Unavailable

__all__ = ["Transport", "retryable", "transport_failure", "unreachable_error"]


@dataclass(frozen=True)
class Transport:
    """A failure below the RPC: the server never answered. `maybe_sent`: the request may
    have reached it (connection lost mid-call), so only idempotent calls may retry."""

    reason: str
    maybe_sent: bool


_CONNECT_REASONS = (
    ("connection refused", "connection refused"),
    ("no route to host", "no route to host"),
    ("network is unreachable", "network is unreachable"),
    ("timed out", "connection timed out"),
    ("timeout", "connection timed out"),
    ("connection reset", "connection reset"),
)
_RESOLVE_MARKERS = (
    "errors resolving",
    "dns resolution failed",
    "name resolution",
    "domain name not found",
)
_LOST_MARKERS = (
    "socket closed",
    "connection reset",
    "broken pipe",
    "recvmsg",
    "sendmsg",
    "goaway",
    "stream removed",
    "connection closed",
)


def transport_failure(err: grpc.RpcError) -> Transport | None:
    """Tell gRPC-core's own UNAVAILABLE (no server reached) from a server's UNAVAILABLE.

    gRPC gives no structured signal for this, only its status details, whose wording has
    been stable for years; an unrecognised message is taken as the server's own answer.
    """
    try:
        if err.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        details = (err.details() or "").lower()
    except Exception:  # noqa: BLE001 - not a call error at all
        return None
    if "failed to connect" in details:
        for marker, reason in _CONNECT_REASONS:
            if marker in details:
                return Transport(reason, maybe_sent=False)
        return Transport("connection failed", maybe_sent=False)
    if any(m in details for m in _RESOLVE_MARKERS):
        return Transport("cannot resolve host", maybe_sent=False)
    if any(m in details for m in _LOST_MARKERS):
        return Transport("connection lost", maybe_sent=True)
    return None


def retryable(err: grpc.RpcError) -> bool:
    """Whether a call that failed this way may simply be tried again (elsewhere)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE if hasattr(err, "code") else False


def unreachable_error(failures: dict[str, str]) -> Unavailable:
    if len(failures) == 1:
        ((addr, reason),) = failures.items()
        return Unavailable(f"cannot reach {addr} ({reason})")
    listed = ", ".join(f"{a} ({r})" for a, r in failures.items())
    return Unavailable(f"cannot reach any server: {listed}")
