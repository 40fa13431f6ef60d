"""Byte sizes as people write them ("512MiB", "2G"), for the client and the agent's settings."""

from __future__ import annotations

import math
import re

from lepton.common.errors import InvalidArgument

__all__ = ["parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgtpe", start=1):
    _SIZE_UNITS[_letter] = _SIZE_UNITS[_letter + "i"] = _SIZE_UNITS[_letter + "ib"] = 1024**_i
    _SIZE_UNITS[_letter + "b"] = 1000**_i


# The largest size: what every size field holds (int64; the proto's uint64 too).
MAX_SIZE = (1 << 63) - 1


def parse_size(value: int | float | str, what: str = "size") -> int:
    """See `_parse_size`; a size past MAX_SIZE (8 EiB) is InvalidArgument too, not a
    ValueError when it is put in a message."""
    size = _parse_size(value, what)
    if size > MAX_SIZE:
        raise InvalidArgument(f"{what} {value!r} is too large (under 8 EiB)")
    return size


def _parse_size(value: int | float | str, what: str) -> int:
    """Bytes from an int or a string such as `512MiB`, `2G`, `1.5GiB`, `100MB`, `4096`.

    `K`/`Ki`/`KiB`, `M`/`Mi`/`MiB`, `G`, `T`, `P`, `E` (any case) are powers of 1024; `KB`,
    `MB`, `GB`, ... are powers of 1000. Fractions round to the nearest byte. Raises
    InvalidArgument for anything else, negative sizes included.
    """
    if isinstance(value, bool):
        raise InvalidArgument(f"{what} must be a size, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"{what} must not be negative, got {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{what} must be a size >= 0, got {value}")
        return round(value)
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be an int or a string, not {type(value).__name__}")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        hint = "must not be negative" if value.strip().startswith("-") else "is not a size"
        raise InvalidArgument(
            f"{what} {value!r} {hint} (expected bytes, or a number and a unit: 512MiB, 2G, 1.5GiB)"
        )
    return round(float(m.group(1)) * _SIZE_UNITS[unit])
