"""The runner's task events and their at-least-once bookkeeping (for `lepton.agent.tasks.runner`).

Events go to `on_event` synchronously; its exceptions are logged. An EXITED event is
marked reported (`reported.json` in the attempt's folder: "done, never again") once the
coordinator has taken it (`acknowledge`; or when `on_event` returns, without
`acknowledged_by_caller`), so an agent that dies in between reports it again after
restart (the coordinator takes repeats as idempotent). Acknowledged marks are written in a
thread, in batches: a file made per exit is slow on a busy disk, and a mark that a crash
loses only means one more (idempotent) report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lepton.agent.tasks.task_spec import RunSpec, TaskEvent, TaskEventKind

logger = logging.getLogger(__name__)

FAILED_TO_START_CODE = 127  # what a shell reports for a command it cannot run


def now_ms() -> int:
    return int(time.time() * 1000)


class Reports:
    def __init__(self, on_event: Callable[[TaskEvent], None], acknowledged_by_caller: bool):
        self._on_event = on_event
        # EXITED events handed out but not yet acknowledged: (task, attempt) -> (dir, record).
        self._acks_due: dict[tuple[str, int], tuple[Path, dict]] | None = {} if acknowledged_by_caller else None
        self._marks: list[tuple[Path, dict]] = []  # acknowledged, not yet marked
        self._marking: asyncio.Future[None] | None = None  # the thread that marks them
        self._lock = threading.Lock()

    def emit(self, event: TaskEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            logger.exception("on_event failed for %s", event)

    def exited(self, att_dir: Path, event: TaskEvent) -> None:
        """Emit EXITED, then mark it reported (at-least-once across crashes): at once, or,
        with `acknowledged_by_caller`, when `acknowledge` says the coordinator has it."""
        doc = {**vars(event), "kind": event.kind.value}  # scalars only: asdict's deep copy costs more
        if self._acks_due is not None:
            self._acks_due[(event.task_id, event.attempt)] = (att_dir, doc)
        self.emit(event)
        if self._acks_due is None:
            _mark_reported(att_dir, doc)

    def failed_to_start(self, spec: RunSpec, att_dir: Path, why: str) -> None:
        """EXITED with FAILED_TO_START_CODE and "failed to start: `why`", also in its output."""
        reason = f"failed to start: {why}"
        logger.warning("task %s attempt %d %s", spec.task_id, spec.attempt, reason)
        with contextlib.suppress(OSError), open(att_dir / "output.log", "ab") as f:
            f.write(f"lepton: {reason}\n".encode())
        self.exited(att_dir, TaskEvent(spec.task_id, spec.attempt, spec.term, TaskEventKind.EXITED,
                                       exit_code=FAILED_TO_START_CODE, reason=reason, at_ms=now_ms()))

    def acknowledge(self, task_id: str, attempt: int) -> None:
        """The coordinator has taken this attempt's EXITED event: never report it again. A
        crash before this reports it again after restart (the coordinator takes repeats as
        idempotent), so an exit is never lost between the queue and the coordinator."""
        if self._acks_due is None or (due := self._acks_due.pop((task_id, attempt), None)) is None:
            return
        with self._lock:
            self._marks.append(due)
            if self._marking is not None:
                return  # the thread at work takes it too
            try:
                self._marking = asyncio.get_running_loop().run_in_executor(None, self._write_marks)
                return
            except RuntimeError:  # no loop (or it is closing): mark it here
                pass
        self._write_marks()

    def _write_marks(self) -> None:
        while True:
            with self._lock:
                marks, self._marks = self._marks, []
                if not marks:
                    self._marking = None
                    return
            for att_dir, doc in marks:
                _mark_reported(att_dir, doc)

    async def close(self) -> None:
        """Every acknowledged mark written."""
        with self._lock:
            marking = self._marking
        if marking is not None:
            await asyncio.gather(marking, return_exceptions=True)
        with self._lock:
            self._marking = None
        self._write_marks()


def _mark_reported(att_dir: Path, doc: dict) -> None:
    try:
        # Only its presence counts, so it is written in place (3 syscalls, not 6) and not
        # fsync'd: lost in a power loss, it only means one more (idempotent) report.
        fd = os.open(att_dir / "reported.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write((json.dumps(doc, sort_keys=True) + "\n").encode())
    except OSError as err:
        logger.warning("cannot mark task %s attempt %d reported: %s", doc["task_id"], doc["attempt"], err)
