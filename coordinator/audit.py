"""The audit log: who did what, when, with what outcome.

`build_record` is a pure function of (principal, method, request, result code, time), so the
leader can turn an `AuthEvent` into a record and replicate it as a log command; every
replica then holds the same records. `AuditLog` keeps the last `keep` of them (bounded
retention) and round-trips through `snapshot()`/`restore()` for state snapshots.

What a record never holds: bearer tokens (the `authorization` metadata is never read here;
token-shaped strings in request fields are masked), fields named like secrets, environment
variable values, payload bytes, or command lines beyond the program name. A summary is at
most `MAX_SUMMARY` characters.
"""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from lepton.common.errors import InvalidArgument

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 10_000
MAX_SUMMARY = 1024
MAX_STRING = 128
MAX_ITEMS = 8
MAX_DEPTH = 4
_SECRET_FIELD = re.compile(r"(?i)(token|secret|password|passwd|credential|authorization|private|api_?key|cookie)")
_TOKEN_TEXT = re.compile(r"lep_[0-9a-f]{12}_[A-Za-z0-9_-]{20,}|(?i:bearer\s+\S+)")
# Command lines carry secrets too often (`--password x`): keep the program, count the rest.
_COMMAND_FIELDS = {"argv", "shell"}
# Maps whose values may be secrets; only their keys are kept.
_KEYS_ONLY_FIELDS = {"env", "environment"}


@dataclass(frozen=True, slots=True)
class AuditRecord:
    at_ms: int
    principal: str  # "-" for a caller that presented no valid credentials
    role: str
    via: str  # token | certificate | "" (none)
    method: str  # full gRPC method name, /lepton.v1.Coordinator/SubmitTask
    code: str  # the gRPC status code's name: OK, PERMISSION_DENIED, ...
    request: str  # a bounded JSON summary of the request, secrets removed
    token_id: str = ""  # the public id of the token used, never the token

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> AuditRecord:
        """Raises InvalidArgument on a malformed document."""
        try:
            return cls(**doc)
        except TypeError as err:
            raise InvalidArgument(f"malformed audit record: {err}") from None


def build_record(principal: Any, method: str, request: Any, code: grpc.StatusCode | str | int,
                 at_ms: int) -> AuditRecord:
    """A record for one call. Pure: the same inputs give the same record.

    `principal`: a `lepton.common.auth.Principal` or None. `request`: the request message,
    its raw bytes (decoded with the method's input type), a dict, or None (client stream).
    `code`: a grpc.StatusCode, its name, or its integer value.
    """
    name = getattr(principal, "name", "") or "-"
    role = getattr(getattr(principal, "role", None), "value", getattr(principal, "role", "")) or ""
    return AuditRecord(
        at_ms=int(at_ms),
        principal=_clip(_mask(str(name))),
        role=str(role),
        via=str(getattr(principal, "via", "") or ""),
        method=_clip(str(method), 256),
        code=_code_name(code),
        request=summarize_request(method, request),
        token_id=str(getattr(principal, "token_id", "") or ""),
    )


def record_from_event(event: Any) -> AuditRecord:
    """From a `lepton.common.auth.AuthEvent` (the interceptor's `on_event`)."""
    return build_record(event.principal, event.method, event.request, event.code, event.at_ms)


def _code_name(code: grpc.StatusCode | str | int) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for c in grpc.StatusCode:
            if c.value[0] == code:
                return c.name
        return "UNKNOWN"
    return str(code).upper()[:32]


# -- request summaries ----------------------------------------------------------------------
def summarize_request(method: str, request: Any) -> str:
    """A JSON summary of at most MAX_SUMMARY characters with secrets removed."""
    if request is None:
        return "{}"
    if isinstance(request, (bytes, bytearray, memoryview)):
        raw = bytes(request)
        cls = _input_class(method)
        if cls is None:
            return _dumps({"_bytes": len(raw)})
        msg = cls()
        try:
            msg.ParseFromString(raw)
        except (DecodeError, RuntimeWarning, ValueError):
            return _dumps({"_malformed_bytes": len(raw)})
        request = msg
    if isinstance(request, Message):
        doc: Any = _message(request, 0)
    elif isinstance(request, dict):
        doc = {str(k): _value(str(k), v, 0) for k, v in list(request.items())[:MAX_ITEMS * 4]}
    else:
        doc = {"_type": type(request).__name__}
    text = _dumps(doc)
    if len(text) <= MAX_SUMMARY:
        return text
    # Too long: keep whole top-level fields while they fit, elide the others.
    kept: dict[str, Any] = {"_truncated": True}
    for key in sorted(doc) if isinstance(doc, dict) else []:
        for candidate in (doc[key], "..."):
            trial = {**kept, key: candidate}
            if len(_dumps(trial)) <= MAX_SUMMARY:
                kept = trial
                break
    return _dumps(kept)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def _input_class(method: str) -> Any:
    service, _, name = method.strip("/").partition("/")
    try:
        desc = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None
    return message_factory.GetMessageClass(desc.input_type)


def _message(msg: Message, depth: int) -> dict[str, Any]:
    if depth >= MAX_DEPTH:
        return {"_depth": "..."}
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        out[fd.name] = _field(fd, value, depth)
    return out


def _field(fd: FieldDescriptor, value: Any, depth: int) -> Any:
    name = fd.name
    if _SECRET_FIELD.search(name):
        return "<redacted>"
    if name in _COMMAND_FIELDS:
        if _repeated(fd):
            items = list(value)
            return {"program": _clip(_mask(items[0]), 64) if items else "", "args": max(len(items) - 1, 0)}
        words = str(value).split()
        return {"program": _clip(_mask(words[0]), 64) if words else "", "chars": len(str(value))}
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        keys = sorted(value, key=str)
        shown = [_clip(_mask(str(k)), 64) for k in keys[:MAX_ITEMS]]
        if name in _KEYS_ONLY_FIELDS:
            return {"keys": shown, "count": len(keys)}
        val_fd = fd.message_type.fields_by_name["value"]
        return {
            k2: "<redacted>" if _SECRET_FIELD.search(k2) else _field(val_fd, value[k], depth + 1)
            for k, k2 in zip(keys[:MAX_ITEMS], shown, strict=True)
        }
    if _repeated(fd):
        items = list(value)
        shown = [_scalar_or_message(fd, v, depth) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            shown.append(f"...(+{len(items) - MAX_ITEMS})")
        return shown
    return _scalar_or_message(fd, value, depth)


def _repeated(fd: FieldDescriptor) -> bool:
    # protobuf >= 6 drops `label`; older ones lack `is_repeated`.
    if hasattr(fd, "is_repeated"):
        return bool(fd.is_repeated)
    return fd.label == FieldDescriptor.LABEL_REPEATED


def _scalar_or_message(fd: FieldDescriptor, value: Any, depth: int) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return _message(value, depth + 1)
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return f"<{len(value)} bytes>"
    if fd.type == FieldDescriptor.TYPE_ENUM:
        ev = fd.enum_type.values_by_number.get(value)
        return ev.name if ev is not None else int(value)
    if isinstance(value, str):
        return _clip(_mask(value))
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    return value


def _value(key: str, value: Any, depth: int) -> Any:
    """For dict requests (tests, tools): the same rules, by key name."""
    if _SECRET_FIELD.search(key):
        return "<redacted>"
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return _clip(_mask(value))
    if isinstance(value, dict):
        if key in _KEYS_ONLY_FIELDS or depth >= MAX_DEPTH:
            return {"keys": sorted(str(k) for k in value)[:MAX_ITEMS], "count": len(value)}
        return {str(k): _value(str(k), v, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
    if isinstance(value, (list, tuple)):
        return [_value(key, v, depth + 1) for v in value[:MAX_ITEMS]]
    if isinstance(value, (int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    return type(value).__name__


def _mask(text: str) -> str:
    return _TOKEN_TEXT.sub("<token>", text)


def _clip(text: str, limit: int = MAX_STRING) -> str:
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit})"


# -- retention --------------------------------------------------------------------------------
def retain(records: Iterable[AuditRecord], keep: int) -> list[AuditRecord]:
    """The last `keep` records (by order of arrival). Raises InvalidArgument if keep < 1."""
    if keep < 1:
        raise InvalidArgument("audit retention must keep at least 1 record")
    return list(deque(records, maxlen=keep))


class AuditLog:
    """The last `keep` records, oldest first. Deterministic: applying the same records in
    the same order gives the same log on every replica.

    Each record has a sequence number, its place among every record ever appended: the
    oldest kept is `first_seq`, the newest `first_seq + len - 1`. Numbers never move as
    retention drops records, so ListAudit's page tokens name records by them."""

    def __init__(self, keep: int = DEFAULT_KEEP, first_seq: int = 0):
        if keep < 1:
            raise InvalidArgument("audit retention must keep at least 1 record")
        self.keep = keep
        self._records: deque[AuditRecord] = deque(maxlen=keep)
        self.dropped = 0  # records pushed out by retention since start/restore
        self.first_seq = first_seq

    def append(self, record: AuditRecord) -> None:
        if len(self._records) == self.keep:
            self.dropped += 1
            self.first_seq += 1
        self._records.append(record)

    def record_at(self, seq: int) -> AuditRecord | None:
        """The record with sequence number `seq`, None when not (or no longer) kept."""
        pos = seq - self.first_seq
        return self._records[pos] if 0 <= pos < len(self._records) else None

    def seqs(self) -> range:
        """The sequence numbers of the kept records, oldest first."""
        return range(self.first_seq, self.first_seq + len(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[AuditRecord]:
        return iter(self._records)

    def query(self, *, since_ms: int = 0, principal: str = "", method: str = "",
              denied_only: bool = False, limit: int = 100) -> list[AuditRecord]:
        """The newest `limit` records matching every given filter, oldest first."""
        out = [
            r for r in self._records
            if r.at_ms >= since_ms
            and (not principal or r.principal == principal)
            and (not method or method in r.method)
            and (not denied_only or r.code in ("UNAUTHENTICATED", "PERMISSION_DENIED"))
        ]
        return out[-limit:] if limit > 0 else out

    def snapshot(self) -> bytes:
        return json.dumps({"keep": self.keep, "first_seq": self.first_seq,
                           "records": [r.to_dict() for r in self._records]},
                          sort_keys=True, separators=(",", ":")).encode()

    def restore(self, data: bytes) -> None:
        """Replace the contents. Raises InvalidArgument on malformed data."""
        try:
            doc = json.loads(data)
            records = [AuditRecord.from_dict(r) for r in doc["records"]]
            first_seq = doc.get("first_seq", 0)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise InvalidArgument(f"malformed audit snapshot: {err}") from None
        if type(first_seq) is not int or first_seq < 0:
            raise InvalidArgument(f"malformed audit snapshot: first_seq {first_seq!r}")
        kept = retain(records, self.keep) if records else []
        self._records = deque(kept, maxlen=self.keep)
        self.first_seq = first_seq + len(records) - len(kept)  # retention here drops the oldest
        self.dropped = 0
