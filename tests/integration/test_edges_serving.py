"""A careless user and an attacker at `serve *` on real agents: a deployment no node can ever
hold is refused at once (not after --wait-timeout) and records nothing, and so is a scale
past what the whole cluster holds; Predict follows the rule for reading a model."""

from __future__ import annotations

import grpc
import numpy as np
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


def predict_code(server: str, token: str, deployment: str, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    from lepton.common.channels import make_channel
    from lepton.v1 import serving_pb2, serving_pb2_grpc

    request = serving_pb2.PredictRequest(deployment=deployment, inputs=serving_pb2.Tensor(
        dtype="<f4", shape=[1, 4], data=np.zeros((1, 4), np.float32).tobytes()))
    with make_channel(server, tls=None, aio=False, token=token) as channel:
        try:
            serving_pb2_grpc.InferenceStub(channel).Predict(request, timeout=timeout)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""


def test_predict_is_a_read_like_data_get_of_the_model(agents, tmp_path):
    """docs/serving.md "Trust": any user may call Predict on any deployment, as any viewer may
    download the model itself (ReadShard is a read); a viewer may not (a prediction spends the
    owner's replicas), and a name that is no deployment is NOT_FOUND, not a hint."""
    node = agents("serve-trust", "--auth", "--cpus", str(CPUS))
    srv = node.address
    wait_until(lambda: (node.data_dir / "admin.token").exists(), timeout=60, what="the admin token")
    admin = (node.data_dir / "admin.token").read_text().strip()

    def token_for(role: str, name: str) -> str:
        out = run_ctl("--token", admin, "tokens", "create", "--role", role, "--name", name, server=srv, check=True)
        return out.stdout.strip()

    alice, bob, vera = token_for("user", "alice"), token_for("user", "bob"), token_for("viewer", "vera")
    with Client(srv, token=alice) as a:
        wait_until(lambda: any(n.state == "ready" for n in a.nodes()), timeout=60, what="the node")
        store_model(a, tmp_path, "m")
        # Never placed (the node is full), so no replica answers: an admitted Predict waits
        # for one until its deadline, a refused one is PERMISSION_DENIED at once.
        busy = a.submit(["sleep", "600"], cpu=CPUS)
        wait_until(lambda: a.get(busy.id).state == "running", timeout=60, what="the node filled")
        a.create_deployment("web", "m", cpu=CPUS)
        try:
            for who, token in (("bob", bob), ("vera", vera)):  # the model's bytes: readable
                with Client(srv, token=token) as them:
                    them.get_dataset("m", tmp_path / f"{who}.npy")
                assert (tmp_path / f"{who}.npy").stat().st_size > 0
            admitted = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            assert predict_code(srv, alice, "web", timeout=3)[0] in admitted
            assert predict_code(srv, bob, "web", timeout=3)[0] in admitted
            assert predict_code(srv, bob, "nosuch", timeout=30) == (
                grpc.StatusCode.NOT_FOUND, "no deployment 'nosuch' (lepton-ctl serve ls)")
            code, message = predict_code(srv, vera, "web")
            assert code == grpc.StatusCode.PERMISSION_DENIED and message, message
        finally:
            a.delete_deployment("web")
            a.cancel(busy.id)
