"""Agents sharing a host coexist: defaults that clash with nothing, a taken metrics port
is a warning, a taken gRPC port one clear line naming the address and the flag."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from lepton.client import Client
from tests.integration.cluster import free_port, wait_until

pytestmark = pytest.mark.integration


def _ready(c: Client, name: str) -> bool:
    return any(n.name == name and n.state == "ready" for n in c.nodes())


def test_two_agents_on_one_host_with_default_metrics_both_register(agents):
    # No --metrics-listen on either: the defaults must not collide (they did on 9100).
    voter = agents("voter")
    agents("worker", "--join", voter.address)
    with Client(voter.address) as c:
        wait_until(lambda: _ready(c, "voter") and _ready(c, "worker"), timeout=60, what="both nodes ready")


def test_taken_metrics_port_is_a_warning_and_the_agent_runs(agents):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        agent = agents("solo", "--metrics-listen", address)
        with Client(agent.address) as c:
            wait_until(lambda: _ready(c, "solo"), timeout=60, what="the agent registered")
        log = agent.log()
        assert f"cannot serve on {address}" in log and "--metrics-listen" in log
        assert agent.proc.poll() is None


def test_taken_grpc_port_is_one_line_naming_address_and_flag(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        out = subprocess.run(
            [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(tmp_path / "a"),
             "--listen", address, "--metrics-listen", f"127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("lepton-agent:")]
    assert len(lines) == 1, out.stderr
    assert address in lines[0] and "--listen" in lines[0] and "in use" in lines[0]
    assert "Traceback" not in out.stderr
