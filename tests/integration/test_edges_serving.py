"""A careless user and an attacker at `serve *` on real agents: a deployment no node can ever
hold is refused at once (not after --wait-timeout) and records nothing, and so is a scale
past what the whole cluster holds."""

from __future__ import annotations

import pytest

from lepton.client import Client
from tests.integration.cluster import run_ctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("edges_serving")]

CPUS = 2


def store_model(client: Client, tmp_path, name: str) -> None:
    """A dataset of kind model (no replica here ever loads it: none is ever placed)."""
    from lepton.workloads.recipes.cluster import put_file

    (tmp_path / "m.safetensors").write_bytes(b"\0not loaded\0" * 8)
    put_file(client, name, tmp_path / "m.safetensors", replicas=1, kind="model", labels={})


def one_line(out, says: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "unexpected error" not in out.stderr, out.stderr


def test_deployments_that_can_never_fit_are_refused_at_once(agents, tmp_path):
    node = agents("serve-fit", "--cpus", str(CPUS))
    with Client(node.address) as c:
        wait_until(lambda: [n.state for n in c.nodes()] == ["ready"], timeout=60, what="a ready node")
        store_model(c, tmp_path, "m")

        def ctl(*args: str):
            # A refusal comes back at once: were it to wait out --wait-timeout (600 s), the
            # run's own timeout would fail the test.
            return run_ctl(*args, server=node.address, timeout=180)

        one_line(ctl("serve", "up", "m", "--name", "web", "--cpu", "1000", "--wait-timeout", "600"),
                 "no node can ever run a replica of 'web': needs 1000000m cpu, largest node has 2000m")
        one_line(ctl("serve", "up", "m", "--name", "web", "--mem", "999TiB", "--wait-timeout", "600"),
                 "no node can ever run a replica of 'web': needs 999 TiB memory")
        one_line(ctl("serve", "up", "m", "--name", "web", "--replicas", "3", "--cpu", "1", "--wait-timeout", "600"),
                 "3 replicas of 'web' do not fit: all nodes together, empty, hold at most 2")
        assert c.list_deployments() == []  # nothing recorded

        # One that fits an empty node but waits (the node is busy) is made; scaling it past
        # what the node could ever hold is refused, and changes nothing.
        busy = c.submit(["sleep", "600"], cpu=CPUS)
        try:
            wait_until(lambda: c.get(busy.id).state == "running", timeout=60, what="the node busy")
            out = run_ctl("serve", "up", "m", "--name", "web", "--cpu", str(CPUS), "--no-wait",
                          server=node.address, check=True)
            assert "web" in out.stdout
            one_line(ctl("serve", "scale", "web", "2"),
                     "2 replicas of 'web' do not fit: all nodes together, empty, hold at most 1")
            assert c.get_deployment("web").replicas == 1
            c.delete_deployment("web")
            wait_until(lambda: c.list_deployments() == [], timeout=60, what="the deployment removed")
        finally:
            c.cancel(busy.id)
