"""Small input checks shared by the client's modules."""

from __future__ import annotations

from lepton.common.errors import InvalidArgument

__all__ = ["require_id"]


def require_id(value: str, what: str = "node id") -> str:
    """`value` stripped; InvalidArgument when it is not a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument(f"{what} must not be empty")
    return value.strip()
