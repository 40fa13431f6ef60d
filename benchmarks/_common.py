"""Shared by the benchmark scripts: start a real agent process and find its address."""

from __future__ import annotations

import atexit
import json
import os  # noqa: F401
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """One real `lepton-agent` in its own temp data dir."""

    def __init__(self, *args: str, name: str = "bench", port: int | None = None, root: str | None = None,
                 python_args: tuple[str, ...] = ()):
        """`python_args` go to the interpreter before `-m lepton.agent.main` (e.g. cProfile)."""
        if root is None:
            root = tempfile.mkdtemp(prefix="lepton-bench-")
            os.chmod(root, 0o711)  # a root agent's tasks run as nobody, who must pass to their folders
            # Gone when the benchmark exits (agents sharing it by root= stop before then).
            atexit.register(shutil.rmtree, root, True)
        self.root = root
        self.data_dir = Path(self.root) / name
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Metrics off (several agents per host; 9100 may be taken); `args` may turn them on.
        cmd = [sys.executable, *python_args, "-m", "lepton.agent.main", "--data-dir", str(self.data_dir),
               "--listen", self.address, "--name", name, "--log-level", "WARNING",
               "--metrics-listen", "127.0.0.1:0", *args]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data_dir / "agent.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        runtime = self.data_dir / "agent.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                # The log goes with the temp dir at exit: say why here.
                tail = (self.data_dir / "agent.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{tail}")
            if runtime.exists() and json.loads(runtime.read_text())["pid"] == self.proc.pid:
                return
            time.sleep(0.05)
        raise RuntimeError("agent did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def emit(doc: dict) -> None:
    print(json.dumps(doc, sort_keys=True))
    sys.stdout.flush()
