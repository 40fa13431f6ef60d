"""Only the replica's own agent may call it (`--claim-key`, set by the serving loop).

A replica's socket is in its task's folder, which every task of the same task user can pass
through: without this, another task could call Predict there directly, past the agent's
token check and counters. So the agent presents a per-attempt key (random, kept in a file
only root reads) as call metadata on every call to its replica, starting with its first
health check; the first key presented claims the replica, and every call without that key
is PERMISSION_DENIED. The replica also makes itself non-dumpable at once, so a process of
the same uid cannot read the key out of its memory (/proc/PID/mem, ptrace).

Where it does not hold (docs/serving.md, "Replica sockets"): a task of the same user that
connects between the replica's bind and its agent's first check claims it first (the agent
is then refused, and stops that replica at once: it never enters rotation); and such a task
may replace the socket file with its own, to be called by the agent instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# The metadata key agent/serving.py presents (the same literal: agents never import workloads).
KEY_METADATA = "lepton-replica-key"
_PR_SET_DUMPABLE = 4


def no_dumping() -> bool:
    """prctl(PR_SET_DUMPABLE, 0): /proc/self/mem, environ and ptrace are root's only, even
    for processes of this uid. Returns whether it took (False off Linux)."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        return ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class KeyGate(grpc.aio.ServerInterceptor):
    """The first key presented claims the replica; every call must then present it."""

    def __init__(self) -> None:
        self.key: str | None = None

    def admits(self, presented: str) -> bool:
        """Whether `presented` is the key (claiming the replica with it if none came yet):
        for gRPC calls here, and the frames socket's connections (frame_server.py)."""
        if presented and self.key is None:
            self.key = presented
        return self.key is not None and hmac.compare_digest(presented.encode(), self.key.encode())

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        presented = next((v for k, v in details.invocation_metadata or () if k == KEY_METADATA), "")
        return await continuation(details) if self.admits(presented) else _DENIED


async def _deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                        "only this replica's agent may call it: call Predict on an agent (lepton-ctl serve predict)")


_DENIED = grpc.unary_unary_rpc_method_handler(_deny)
