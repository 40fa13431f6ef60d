"""The runner's side of the node's attempt fence (fence.py): finding it, or starting one when
none runs, spawning attempts through it, and hearing of their exits.

Two connections: `watch` (asyncio; the fence's list of held attempts, then one line per
exit; while it is open the fence knows an agent is there) and a blocking one for requests
(`spawn`, `adopt`), used from threads only (never the event loop: a hung fence must not
stall the agent), one request at a time. When the fence goes away (killed), `on_lost` is
called; the runner then opens a new link and hands the orphans over (`adopt`). A request
sent but not answered (`InDoubt`) may have been carried out: the runner looks for what it
started (run.json, the next fence's held list) before it declares anything not started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lepton.agent.tasks import fence

logger = logging.getLogger(__name__)

CONNECT_TRIES = 5
# A fence that answers nothing this long is taken for lost (hung, or SIGSTOPped): a request
# is one batch of at most spawn.SPAWN_CHUNK spawns, well under a second even on a busy node.
REQUEST_TIMEOUT_S = 10.0
LINE_LIMIT = 1 << 26  # the held list of a node running 100,000s of attempts fits
# What `spawn` raises (and a spawn's result then says) when no request was sent: the link is
# down, so nothing of the batch started (the runner reports those for requeue, not as failed).
NOT_LINKED = "no link to the node's attempt fence"

Key = tuple[str, int]


class InDoubt(OSError):
    """The request was sent but no answer came: the fence may have carried it out."""


class NoAnswer(OSError):
    """A fence listens but did not answer a new link in time: stopped, or hung."""


class FenceLink:
    """`on_exit(key, pid, rc, output_size)` and `on_lost()` are called on the event loop."""

    def __init__(self, data_dir: Path, on_exit: Callable[[Key, int, int, int], None], on_lost: Callable[[], None]):
        self._dir = Path(data_dir)
        self._on_exit = on_exit
        self._on_lost = on_lost
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._events: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        # Which fence the link reaches: its listener's creator (SO_PEERCRED), one per fence.
        self.fence_id = 0

    @property
    def up(self) -> bool:
        return self._control is not None

    async def open(self, *, start: bool = True) -> dict[Key, int] | None:
        """Connect (starting a fence when none runs, with `start`); the attempts it holds
        now, key -> pid. None when no fence runs and `start` is False.
        Raises OSError when no fence can be reached or started, or it does not answer."""
        await self.close()
        for _ in range(CONNECT_TRIES):
            sock = await asyncio.to_thread(self._connect, start)
            if sock is None:
                return None
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
            writer.write(b'{"op": "watch"}\n')
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_S)
            except ConnectionError:
                line = b""  # as below: it was ending
            except TimeoutError:  # stopped (SIGSTOP) or hung
                writer.close()
                raise NoAnswer(f"the node's attempt fence did not answer in {REQUEST_TIMEOUT_S:g}s") from None
            except (ValueError, OSError) as err:  # a held list past the limit
                writer.close()
                raise OSError(f"the node's attempt fence did not answer: {err!r}") from None
            if not line:  # a fence that was ending took the connection: start another
                writer.close()
                continue
            held = {(str(t), int(a)): int(pid) for t, a, pid in json.loads(line)["held"]}
            control = await asyncio.to_thread(self._connect, start)
            if control is None:  # it ended just now
                writer.close()
                continue
            with self._lock:
                self._control = control
            self.fence_id = struct.unpack("3i", control.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            self._writer = writer
            self._events = asyncio.create_task(self._read_events(reader), name="task-fence-events")
            return held
        raise OSError("the node's attempt fence kept closing new connections")

    async def close(self) -> None:
        events, self._events = self._events, None
        if events is not None:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with self._lock:
            control, self._control = self._control, None
        if control is not None:
            control.close()

    def spawn(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Spawn these attempts (fence.py's `spawn`); one result per item. Blocking.
        Raises OSError(NOT_LINKED) when there is no link (nothing was sent), InDoubt when
        the fence did not answer (then none, some or all of them may have started: their
        run.json and the next link's held list tell), OSError when it refused the request."""
        return self._request({"op": "spawn", "items": items})["results"]

    def adopt(self, items: list[dict[str, Any]]) -> None:
        """Have the fence fence these attempts, spawned by a fence that is gone. Raises OSError."""
        if items:
            self._request({"op": "adopt", "items": items})

    def _request(self, doc: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._control is None:
                raise OSError(NOT_LINKED)
            sock = self._control
            try:
                sock.sendall(json.dumps(doc).encode() + b"\n")
                reply = json.loads(_read_line(sock))
            except (OSError, ValueError) as err:
                # Closed, so a fence that comes back (SIGCONT) sees the hang-up and drops it.
                self._control = None
                sock.close()
                raise InDoubt(f"the node's attempt fence did not answer: {err}") from err
        if "error" in reply:
            raise OSError(f"the node's attempt fence refused the request: {reply['error']}")
        return reply

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                doc = json.loads(line)
                if "exit" in doc:
                    task_id, attempt = doc["exit"]
                    self._on_exit((str(task_id), int(attempt)), int(doc["pid"]), int(doc["rc"]),
                                  int(doc.get("size", -1)))
        except (OSError, ValueError, KeyError, TypeError, asyncio.LimitOverrunError) as err:
            logger.warning("the link to the node's attempt fence broke: %s", err)
        logger.warning("the node's attempt fence went away; starting another")
        with self._lock:
            if self._control is not None:
                self._control.close()
                self._control = None
        self._on_lost()

    def _connect(self, start: bool = True) -> socket.socket | None:
        """A connection to the fence of this data dir, one started when none listens (None
        then, without `start`). Blocking."""
        last: OSError | None = None
        for _ in range(CONNECT_TRIES):
            dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(fence.socket_address(self._dir, dir_fd))
                sock.settimeout(REQUEST_TIMEOUT_S)
                return sock
            except OSError as err:
                sock.close()
                last = err
            finally:
                os.close(dir_fd)
            if not start:
                return None
            self._launch()
        raise OSError(f"cannot reach the node's attempt fence: {last}")

    def _launch(self) -> None:
        log_path = self._dir / fence.LOG_NAME
        with open(log_path, "ab") as log:
            rc = subprocess.run([sys.executable, "-m", "lepton.agent.tasks.fence", str(self._dir)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True, timeout=REQUEST_TIMEOUT_S).returncode
        if rc == fence.ANOTHER_FENCE:
            time.sleep(0.05)  # one holds the lock: it listens, or is just ending
        elif rc != 0:
            raise OSError(f"the node's attempt fence did not start (exit status {rc}; see {log_path})")


def _read_line(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            raise OSError("connection closed")
        chunks.append(data)
        if data.endswith(b"\n"):
            return b"".join(chunks)
