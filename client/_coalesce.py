"""Group commit in the client: concurrent `submit()` calls on one Client share calls.

While one call is on the wire, submissions from other threads queue; when it returns, the
next waiting thread sends everything queued as one `SubmitTasks` (one log entry). A lone
caller sends a plain `SubmitTask`, so nothing changes for it. Per-call cost, not the log,
bounds how fast Python gRPC can take submissions (see benchmarks/submit.py), so threads
that submit at once get most of the batched rate without batching themselves.

A batch is stored whole or not at all. If it is refused for one spec (InvalidArgument,
FailedPrecondition, ...), each is sent again alone, so every caller gets its own answer;
their request ids make the retries safe. A transient failure (no leader, a deadline) is
every caller's answer, as it would have been for calls of their own, and so is a shed call
(Overloaded) that its retries within the budget did not get through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from lepton.common.errors import DeadlineExceeded, LeptonError, Overloaded, Unavailable
from lepton.common.validation import MAX_BATCH_SPEC_BYTES

S = TypeVar("S")
R = TypeVar("R")

MAX_BATCH = 1000  # the server's limit for one SubmitTasks


class _Item(Generic[S, R]):
    __slots__ = ("spec", "done", "result", "error")

    def __init__(self, spec: S):
        self.spec = spec
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[S, R]):
    """`submit(spec)` from any number of threads; one call on the wire at a time.

    `send_one(spec) -> result` and `send_many(specs) -> results` (same order) raise
    LeptonError. `submit` returns the spec's result or raises its error. With `size_of`, a
    call also carries at most `max_bytes` of specs (the server's cap on one SubmitTasks).
    """

    def __init__(self, send_one: Callable[[S], R], send_many: Callable[[Sequence[S]], Sequence[R]],
                 *, max_batch: int = MAX_BATCH, size_of: Callable[[S], int] | None = None,
                 max_bytes: int = MAX_BATCH_SPEC_BYTES):
        self._send_one = send_one
        self._send_many = send_many
        self._max_batch = max_batch
        self._size_of = size_of
        self._max_bytes = max_bytes
        self._cond = threading.Condition()
        self._queue: list[_Item[S, R]] = []
        self._busy = False  # a thread is sending; the others wait their turn

    def submit(self, spec: S) -> R:
        item: _Item[S, R] = _Item(spec)
        with self._cond:
            self._queue.append(item)
        while True:
            with self._cond:
                while self._busy and not item.done:
                    self._cond.wait()
                if item.done:
                    break
                # Our turn to send: the oldest queued first (perhaps not ours, past max_batch).
                self._busy = True
                batch = self._take()
            try:
                self._send(batch)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _take(self) -> list[_Item[S, R]]:
        """The oldest queued items that fit one call (at least one). Under the lock."""
        n = total = 0
        for it in self._queue[:self._max_batch]:
            size = self._size_of(it.spec) if self._size_of is not None else 0
            if n and total + size > self._max_bytes:
                break
            n, total = n + 1, total + size
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch

    def _send(self, batch: list[_Item[S, R]]) -> None:
        try:
            if len(batch) == 1:
                results: Sequence[R] = [self._send_one(batch[0].spec)]
            else:
                try:
                    results = self._send_many([i.spec for i in batch])
                except (Unavailable, DeadlineExceeded, Overloaded):
                    raise  # every caller's answer: sending each alone would only add load
                except LeptonError:  # refused for one of them: let each hear its own answer
                    for it in batch:
                        _settle(it, lambda it=it: self._send_one(it.spec))
                    return
            for it, result in zip(batch, results, strict=True):
                it.result, it.done = result, True
        except BaseException as err:  # noqa: BLE001 - handed to every caller of the batch
            for it in batch:
                if not it.done:
                    it.error, it.done = err, True


def _settle(item: _Item, call: Callable[[], object]) -> None:
    try:
        item.result = call()
    except LeptonError as err:
        item.error = err
    item.done = True
