"""Paginated lists (lepton.common.paging): tokens, the page walk and its bounds."""

from __future__ import annotations

import bisect

import pytest

from lepton.common import paging
from lepton.common.errors import InvalidArgument


def walk(keys, size, *, reverse=False, select=None):
    """Every page's keys, by tokens."""
    pages, token = [], ""
    while True:
        after = paging.decode_token(token, (int, str))
        items, token = paging.take_page(keys, after, size=size, select=select or (lambda k: k),
                                        size_of=lambda k: 1, reverse=reverse)
        pages.append(items)
        if not token:
            return pages


KEYS = [(t, f"id{t}") for t in range(10)]


def test_pages_cover_every_key_once_in_both_directions():
    pages = walk(KEYS, 3)
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [k for p in pages for k in p] == KEYS
    assert [k for p in walk(KEYS, 4, reverse=True) for k in p] == KEYS[::-1]
    assert walk([], 5) == [[]]


def test_a_token_is_stable_when_keys_come_and_go_before_it():
    keys = list(KEYS)
    first, token = paging.take_page(keys, None, size=4, select=lambda k: k, size_of=lambda k: 1)
    bisect.insort(keys, (1, "new-old"))  # inserted behind the cursor: not seen, nothing repeated
    bisect.insort(keys, (8, "new-late"))
    keys.remove((5, "id5"))
    rest, _ = paging.take_page(keys, paging.decode_token(token, (int, str)), size=100,
                               select=lambda k: k, size_of=lambda k: 1)
    assert first == KEYS[:4]
    assert rest == [(4, "id4"), (6, "id6"), (7, "id7"), (8, "id8"), (8, "new-late"), (9, "id9")]


def test_filtered_walks_stop_at_the_scan_budget_with_a_token(monkeypatch):
    monkeypatch.setattr(paging, "SCAN_BUDGET", 4)
    pages = walk(KEYS, 100, select=lambda k: k if k[0] == 9 else None)
    assert pages[0] == [] and pages[-1] == [(9, "id9")]  # short pages, never a lost match
    assert len(pages) == 3


def test_a_page_stops_at_the_byte_budget_but_always_holds_one_item(monkeypatch):
    monkeypatch.setattr(paging, "MAX_PAGE_BYTES", 10)
    items, token = paging.take_page(KEYS, None, size=100, select=lambda k: k, size_of=lambda k: 4)
    assert items == KEYS[:2] and token
    huge, token = paging.take_page(KEYS, None, size=100, select=lambda k: k, size_of=lambda k: 50)
    assert huge == KEYS[:1] and token


def test_page_sizes_and_bad_tokens():
    assert paging.page_size(0) == paging.DEFAULT_PAGE
    assert paging.page_size(10**9) == paging.MAX_PAGE
    with pytest.raises(InvalidArgument):
        paging.page_size(-1)
    good = paging.encode_token((5, "x"))
    assert paging.decode_token(good, (int, str)) == (5, "x")
    for bad in ("%%%", "bm90IGpzb24=", paging.encode_token(("x", 5)), paging.encode_token((True, "x")),
                paging.encode_token((5,)), "A" * 5000):
        with pytest.raises(InvalidArgument, match="page_token"):
            paging.decode_token(bad, (int, str))


def test_walk_pages_follows_tokens_and_refuses_a_stuck_server():
    pages = {"": ([1, 2], "a"), "a": ([3], "b"), "b": ([], "c"), "c": ([4], "")}
    assert list(paging.walk_pages(lambda token: pages[token])) == [1, 2, 3, 4]
    with pytest.raises(InvalidArgument, match="repeated"):
        list(paging.walk_pages(lambda token: ([1], "same")))
