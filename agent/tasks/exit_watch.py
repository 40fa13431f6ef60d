"""Wake the task runner the moment a task's wrapper ends, instead of polling every attempt.

Each watched process gets a pidfd (Linux 5.3+, `os.pidfd_open`), read by the event loop:
it becomes readable when the process ends, whoever its parent is, so the runner learns
of each exit on its own (O(1) per exit, however many attempts run) and reaps or reads it
at once. Where there is no pidfd (another OS, an old kernel, out of file descriptors, or
past half the open-file limit: the agent's sockets need the rest) `watch` says so and the
runner polls that attempt as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections.abc import Callable, Hashable

from lepton.agent.tasks import task_proc as tp

logger = logging.getLogger(__name__)

FDS_KEPT = 256  # below half the open-file limit, left for everything else the agent opens


class ExitWatch:
    """pidfds on the running event loop; `on_exit(key)` is called on it once per ended process."""

    def __init__(self, on_exit: Callable[[Hashable], None]):
        self._on_exit = on_exit
        self._fds: dict[Hashable, int] = {}
        self.polled: set[Hashable] = set()  # what `watch` could not watch: the caller polls these
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned = False
        self._max_fds = max(0, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2 - FDS_KEPT)

    def watch(self, key: Hashable, pid: int, start: float | None) -> bool:
        """Call `on_exit(key)` once process `pid` (started at `start`, against pid reuse;
        None: our unreaped child, whose pid cannot be reused) ends; at once (soon, on the
        loop) when it has already ended or the pid is someone else's now. False when it
        cannot be watched: it is in `polled`, for the caller."""
        if not hasattr(os, "pidfd_open") or pid <= 0 or len(self._fds) >= self._max_fds:
            self.polled.add(key)  # past the cap, the agent keeps its descriptors for its sockets
            return False
        self.unwatch(key)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = -1  # gone already
        except OSError as err:
            if not self._warned:  # e.g. EMFILE: this attempt, and others like it, are polled
                logger.warning("cannot watch task processes by pidfd (%s); polling them", err)
                self._warned = True
            self.polled.add(key)
            return False
        loop = self._loop = self._loop or asyncio.get_running_loop()
        info = tp.proc_info(pid) if start is not None and fd >= 0 else None
        if fd < 0 or start is not None and (info is None or not tp.same_start(info.start, start)):
            if fd >= 0:
                os.close(fd)  # the pid was reused: what we watch has ended
            loop.call_soon(self._on_exit, key)
            return True
        self._fds[key] = fd
        loop.add_reader(fd, self._fire, key)
        return True

    def unwatch(self, key: Hashable) -> None:
        self.polled.discard(key)
        fd = self._fds.pop(key, None)
        if fd is not None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._loop.remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for key in list(self._fds):
            self.unwatch(key)
        self.polled.clear()

    def _fire(self, key: Hashable) -> None:
        self.unwatch(key)
        self._on_exit(key)

    def poll_from_now(self, key: Hashable) -> None:
        """Its pidfd fired but the caller could not reap it yet: poll it."""
        self.unwatch(key)
        self.polled.add(key)
