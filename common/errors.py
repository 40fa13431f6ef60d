"""The one exception hierarchy of Lepton, and its mapping to and from gRPC status codes.

Domain code raises these; each carries its gRPC status `code`. Only the gRPC boundary
converts: servers in `lepton.common.grpc_util` (`rpc_boundary`, `register_service`) abort
with the error's code and message, clients turn a status back into one with `from_rpc_error`.
"""

from __future__ import annotations

import grpc


class LeptonError(Exception):
    """Base of every error Lepton raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = ""

    def __init__(self, message: str, *, reason: str = ""):
        super().__init__(message)
        self.message = message
        # A stable token for a refusal the caller acts on (REASON_*), carried across the
        # gRPC boundary in trailing metadata: callers never match the message's wording.
        self.reason = reason


class InvalidArgument(LeptonError):
    """The request is malformed or a value is out of range. Nothing was changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LeptonError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LeptonError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LeptonError):
    """The request is well formed but the object's state does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LeptonError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Overloaded(ResourceExhausted):
    """The leader shed this call before doing anything (admission): safe to send again
    after `retry_after_ms`. A quota refusal is a plain ResourceExhausted: retrying won't help."""

    def __init__(self, message: str, retry_after_ms: int):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(LeptonError):
    """The server cannot serve this now (starting, stopping, no quorum). Retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class NotLeader(Unavailable):
    """This server is not the leader. `leader` is the leader's address when known."""

    def __init__(self, message: str = "not the leader", leader: str = ""):
        if leader:
            message = f"{message}; leader is {leader}"
        super().__init__(message)
        self.leader = leader


class DeadlineExceeded(LeptonError):
    """The operation did not finish in time. Its outcome is unknown."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(LeptonError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LeptonError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(LeptonError):
    code = grpc.StatusCode.CANCELLED


class Internal(LeptonError):
    code = grpc.StatusCode.INTERNAL


# Trailing metadata key a follower sets so clients can go straight to the leader.
LEADER_METADATA_KEY = "lepton-leader"
# Trailing metadata key of a shed call (Overloaded): milliseconds to wait before retrying.
RETRY_AFTER_METADATA_KEY = "retry-after-ms"
# Trailing metadata key of LeptonError.reason.
REASON_METADATA_KEY = "lepton-reason"
# Reasons. A voter of the other state backend (Raft against etcd) was refused by the leader:
# no retry helps, the agent exits (FailedPrecondition).
REASON_WRONG_STATE_BACKEND = "WRONG_STATE_BACKEND"

_BY_CODE: dict[grpc.StatusCode, type[LeptonError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        Internal,
    )
}


def from_rpc_error(err: grpc.RpcError) -> LeptonError:
    """The client side of the boundary: one `grpc.RpcError` to one `LeptonError`."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(code)
    leader = ""
    retry_after = ""
    reason = ""
    try:
        for key, value in err.trailing_metadata() or ():
            if key == LEADER_METADATA_KEY:
                leader = value
            elif key == RETRY_AFTER_METADATA_KEY:
                retry_after = value
            elif key == REASON_METADATA_KEY:
                reason = value
    except Exception:  # noqa: BLE001 - some RpcErrors carry no metadata at all
        pass
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after.isdigit():
        exc: LeptonError = Overloaded(details, int(retry_after))
    elif code == grpc.StatusCode.UNAVAILABLE and leader:
        exc = NotLeader(details, leader="")
        exc.leader = leader
    else:
        exc = _BY_CODE.get(code, LeptonError)(details)
        exc.code = code
    exc.reason = reason
    return exc


def error_for_code(code_name: str, message: str) -> LeptonError:
    """The LeptonError for a status code's name ("NOT_FOUND"), as a process boundary reports it."""
    for code, cls in _BY_CODE.items():
        if code.name == code_name:
            return cls(message)
    return Internal(message)
