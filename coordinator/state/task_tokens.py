"""Task credentials: how a task attempt calls the cluster as its submitter, never above.

A task token is `lept_<payload>.<mac>`: `payload` the base64url of `{"t": task id, "a":
attempt, "e": expiry ms}`, `mac` the base64url HMAC-SHA256 of the payload under the
cluster's task token key (`SetTaskTokenKeyCmd`, made at first leadership; only voters hold
it). Nothing is stored per token: the leader derives it whenever it sends the assignment
(the same token on every resend, so a reconnecting agent changes nothing), and any voter
checks it against the replicated state. It is valid while

- the MAC matches (compared in constant time),
- the task's current attempt is this one and holds its node (ASSIGNED or RUNNING): it dies
  when the attempt's exit is reported, or the attempt is cancelled or requeued,
- it has not expired: the attempt's assignment time plus its timeout and grace plus
  `EXPIRY_SLACK_S`, or `DEFAULT_TTL_S` for a task without a timeout,
- the token its submitter used (`spec.owner_token_id`), if any, is not revoked.

It stands for the submitter: `spec.owner` with `spec.owner_role` (both stamped by the
coordinator at submission), `via="task"`. Read-only here: minting uses no clock and no
randomness beyond the key, so `lookup` is safe on any voter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping

from lepton.common.auth import Principal, Role
from lepton.v1 import security_pb2, tasks_pb2

TASK_TOKEN_PREFIX = "lept_"
KEY_BYTES = 32
DEFAULT_TTL_S = 7 * 24 * 3600  # a task without a timeout: training runs for days
EXPIRY_SLACK_S = 600  # past timeout + grace: the agent's stop takes a moment to report
_MAX_CHARS = 512  # task ids are at most 128 characters; anything longer is not ours
_PEOPLE = (Role.ADMIN.value, Role.USER.value, Role.VIEWER.value)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def expiry_ms(task: tasks_pb2.Task) -> int:
    """When the current attempt's credential expires on its own (wall clock, ms)."""
    spec = task.spec
    ttl_s = spec.timeout_s + (spec.grace_s or 10.0) + EXPIRY_SLACK_S if spec.timeout_s > 0 else DEFAULT_TTL_S
    return task.assigned_at_ms + int(ttl_s * 1000)


def mint(key: bytes, task: tasks_pb2.Task) -> str:
    """The credential of `task`'s current attempt; "" without a key or an owner to act as."""
    if not key or not task.spec.owner or task.spec.owner_role not in _PEOPLE:
        return ""
    payload = _b64(json.dumps({"t": task.id, "a": task.attempt, "e": expiry_ms(task)},
                              separators=(",", ":"), sort_keys=True).encode())
    return f"{TASK_TOKEN_PREFIX}{payload}.{_b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())}"


def is_task_token(token: str) -> bool:
    return token.startswith(TASK_TOKEN_PREFIX)


def lookup(
    key: bytes,
    token: str,
    find_task: Callable[[str], tasks_pb2.Task | None],
    tokens: Mapping[str, security_pb2.ApiToken],
    holding: Callable[[tasks_pb2.Task], bool],
    now_ms: int,
) -> Principal | None:
    """The submitter a task token stands for, or None (malformed, forged, the attempt is
    over or superseded, expired, or the submitter's token was revoked)."""
    if not key or len(token) > _MAX_CHARS or not is_task_token(token):
        return None
    payload, _, mac = token[len(TASK_TOKEN_PREFIX):].partition(".")
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(mac.encode(), expected.encode()):
        return None
    try:
        claims = json.loads(_unb64(payload))
        task_id, attempt, expires = str(claims["t"]), int(claims["a"]), int(claims["e"])
    except (ValueError, KeyError, TypeError):
        return None  # signed by us, so never in practice; still no traceback for it
    task = find_task(task_id)
    if task is None or task.attempt != attempt or not holding(task) or now_ms >= expires:
        return None
    spec = task.spec
    if not spec.owner or spec.owner_role not in _PEOPLE:
        return None
    if spec.owner_token_id:
        parent = tokens.get(spec.owner_token_id)
        if parent is None or parent.revoked:
            return None
    return Principal(spec.owner, Role(spec.owner_role), via="task", token_id=f"task:{task_id}/{attempt}")


def task_of(principal_token_id: str) -> str:
    """The task id in a task principal's `token_id` ("task:<id>/<attempt>"); "" otherwise."""
    if not principal_token_id.startswith("task:"):
        return ""
    return principal_token_id[len("task:"):].rpartition("/")[0]
