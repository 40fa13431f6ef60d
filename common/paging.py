"""Paginated lists: one page walker for every List RPC, and its continuation tokens.

A page is a walk over keys kept in sorted order (a task's `(created_at_ms, id)`, a node's
`(name, id)`, ...). The continuation token is the last key the walk looked at, encoded:
opaque to callers, and stable under inserts and deletes, since the next page starts after
that key wherever it now sits (unlike an offset). A walk stops at `size` items, at
`MAX_PAGE_BYTES` of answer (so no page nears the gRPC message limit, whatever the items
hold), or after `SCAN_BUDGET` keys filtered out (so one call costs the server a bounded
time even when few items match; the page may then be short, even empty, with a token).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from lepton.common.errors import InvalidArgument

# Items per page: what 0 asks for, and the most any page holds (larger asks are cut).
DEFAULT_PAGE = 500
MAX_PAGE = 1000
# Serialized bytes per page: well below the 16 MiB message limit (grpc_util).
MAX_PAGE_BYTES = 4 << 20
# Keys examined per call, matching or not.
SCAN_BUDGET = 50_000
MAX_TOKEN_CHARS = 2048

Item = TypeVar("Item")
Key = tuple[Any, ...]


def page_size(requested: int) -> int:
    """The page size to use for a request's `page_size` (0: the default; cut at MAX_PAGE)."""
    if requested < 0:
        raise InvalidArgument(f"page_size is {requested}; it must be >= 0")
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def encode_token(key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode()


def decode_token(token: str, types: tuple[type, ...]) -> Key | None:
    """The key a token holds (None for ""); InvalidArgument for anything this module did not
    make for keys of these `types`."""
    if not token:
        return None
    bad = InvalidArgument("page_token is not a token from this list (pass next_page_token as given)")
    if len(token) > MAX_TOKEN_CHARS:
        raise bad
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None
    if not isinstance(key, list) or len(key) != len(types):
        raise bad
    if not all(type(part) is kind for part, kind in zip(key, types, strict=True)):  # a bool is no int
        raise bad
    return tuple(key)


def take_page(
    keys: Sequence[Key],
    after: Key | None,
    *,
    size: int,
    select: Callable[[Key], Item | None],
    size_of: Callable[[Item], int],
    reverse: bool = False,
) -> tuple[list[Item], str]:
    """One page from `keys` (sorted ascending), starting past `after` (None: from the
    start; with `reverse`, walking down from the end). `select(key)` gives the item to list
    or None to skip it. Returns the items and the next page's token ("" at the end)."""
    if reverse:
        pos = len(keys) - 1 if after is None else bisect.bisect_left(keys, after) - 1
        step, inside = -1, (lambda i: i >= 0)
    else:
        pos = 0 if after is None else bisect.bisect_right(keys, after)
        step, inside = 1, (lambda i: i < len(keys))
    items: list[Item] = []
    used = skipped = 0
    last: Key | None = None
    while inside(pos):
        if len(items) >= size or skipped >= SCAN_BUDGET:
            break
        key = keys[pos]
        item = select(key)
        if item is None:
            skipped += 1
        else:
            cost = size_of(item)
            if items and used + cost > MAX_PAGE_BYTES:
                break  # the next page starts with it
            items.append(item)
            used += cost
        last = key
        pos += step
    return items, (encode_token(last) if inside(pos) and last is not None else "")


def walk_pages(fetch: Callable[[str], tuple[Sequence[Item], str]]) -> Iterator[Item]:
    """A client's side: every item of every page. `fetch(token)` asks for one page and
    returns (items, next_page_token); the walk stops at an empty token."""
    token = ""
    while True:
        items, next_token = fetch(token)
        yield from items
        if not next_token:
            return
        if next_token == token:  # a server that does not move on would loop forever
            raise InvalidArgument("the server repeated its page token")
        token = next_token
