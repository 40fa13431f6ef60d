"""lepton-ctl serve (client/cli_serve.py) against a fake client: waiting, Ctrl-C, output."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lepton.client import cli, cli_serve
from lepton.client.deployments import DeploymentInfo, DeploymentMethods
from lepton.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from lepton.v1 import serving_pb2


def info(ready: int, wanted: int = 2, state: str = "starting") -> DeploymentInfo:
    d = serving_pb2.Deployment(spec=serving_pb2.DeploymentSpec(name="web", model="m", replicas=wanted),
                               generation=1, state=state, message=f"{ready}/{wanted} replicas ready")
    for i in range(ready):
        d.replicas.add(task_id=f"t-{i}", node_id=f"n{i}", generation=1, model="m", state=serving_pb2.REPLICA_READY)
    return DeploymentInfo.from_proto(d)


class FakeClient:
    def __init__(self, wait):
        self.wait = wait
        self.created = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def create_deployment(self, name, model, **kw):
        self.created = (name, model, kw)
        return info(0)

    def get_deployment(self, name):
        return info(2, state="ready")

    def nodes(self):
        return [SimpleNamespace(id="n0", name="gpu-box-0"), SimpleNamespace(id="n1", name="gpu-box-1")]

    def wait_deployment(self, name, *, timeout, gone=False, on_change=None):
        return self.wait(name, timeout, on_change)


@pytest.fixture
def fake(monkeypatch):
    def install(wait):
        client = FakeClient(wait)
        monkeypatch.setattr(cli_serve, "_client", lambda args: client)
        return client

    return install


def test_up_waits_saying_each_state_then_prints_json(fake, capsys):
    def wait(name, timeout, on_change):
        on_change(info(1, state="degraded"))
        on_change(info(2, state="ready"))
        return info(2, state="ready")

    client = fake(wait)
    rc = cli.main(["-o", "json", "serve", "up", "m", "--name", "web", "--replicas", "2", "--cpu", "0.5",
                   "--max-batch", "8", "--max-wait-ms", "3", "--pack"])
    out = capsys.readouterr()
    assert rc == 0
    assert json.loads(out.out)["ready"] == 2
    assert out.err.splitlines() == ["lepton-ctl: web: degraded: 1/2 replicas ready",
                                    "lepton-ctl: web: ready: 2/2 replicas ready"]
    assert client.created == ("web", "m", {"replicas": 2, "cpu": 0.5, "memory_bytes": 0, "gpus": 0, "max_batch": 8,
                                           "max_wait_ms": 3, "priority": 0, "pack": True})


def test_ctrl_c_stops_only_the_waiting(fake, capsys):
    def wait(name, timeout, on_change):
        raise KeyboardInterrupt

    fake(wait)
    assert cli.main(["serve", "up", "m", "--name", "web"]) == 130
    err = capsys.readouterr().err
    assert "stopped waiting; deployment web carries on ('lepton-ctl serve show web')" in err


def test_a_wait_that_times_out_is_one_line(fake, capsys):
    def wait(name, timeout, on_change):
        assert timeout == 5
        raise DeadlineExceeded('deployment "web" not 2 replica(s) of generation 1 ready after 5s: 0/2 replicas ready')

    fake(wait)
    assert cli.main(["serve", "up", "m", "--name", "web", "--wait-timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "not 2 replica(s) of generation 1 ready after 5s" in err


def test_no_wait_returns_at_once(fake, capsys):
    def wait(name, timeout, on_change):
        raise AssertionError("must not wait")

    fake(wait)
    assert cli.main(["serve", "up", "m", "--name", "web", "--no-wait"]) == 0
    assert "0/2 replica(s) ready" in capsys.readouterr().out


def test_rolled_means_exactly_the_wanted_replicas_of_the_generation_ready():
    assert info(2, state="ready").rolled and not info(1, state="ready").rolled
    assert not info(3, state="ready").rolled  # a scale down still draining
    # The counts are live, the loop's state a cycle behind: not rolled until it agrees.
    assert not info(2, state="degraded").rolled
    d = serving_pb2.Deployment(spec=serving_pb2.DeploymentSpec(name="web", model="m", replicas=1), generation=2,
                               state="ready")
    d.replicas.add(task_id="t-new", generation=2, state=serving_pb2.REPLICA_READY)
    d.replicas.add(task_id="t-old", generation=1, state=serving_pb2.REPLICA_DRAINING)
    assert not DeploymentInfo.from_proto(d).rolled  # an old one still stopping
    del d.replicas[1]
    assert DeploymentInfo.from_proto(d).rolled


def test_usage_errors_are_one_line_before_any_call(capsys):
    for argv in (["serve", "scale", "web", "0"], ["serve", "up", "m"], ["serve", "up", "m", "--name", "w",
                                                                        "--max-batch", "0"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("lepton-ctl: "), err


def test_show_names_the_nodes_for_people_and_keeps_ids_in_json(fake, capsys):
    fake(None)
    assert cli.main(["serve", "show", "web"]) == 0
    out = capsys.readouterr().out
    assert "state:       ready (2/2 replicas ready)" in out
    assert "gpu-box-0" in out and "gpu-box-1" in out
    assert cli.main(["-o", "json", "serve", "show", "web"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["node_id"] for r in doc["replica_list"]] == ["n0", "n1"]


class NeverSent(DeploymentMethods):
    def _unary(self, *args, **kwargs):
        raise AssertionError(f"sent: {args[1]}")


@pytest.mark.parametrize("kwargs, says", [
    ({"max_wait_ms": 99_999_999_999}, "max_wait_ms: Value out of range"),
    ({"priority": 99_999_999_999_999}, "priority: Value out of range"),
    ({"memory_bytes": 10**24}, "memory_bytes: Value out of range"),
    ({"gpus": -1}, "gpus: Value out of range"),
    ({"max_batch": 100_000}, "max_batch is 100000; at most 4096"),
    ({"replicas": 100_000}, "replicas must be 1-64"),
    ({"replicas": 0}, "replicas must be 1-64"),
])
def test_numbers_out_of_range_are_invalid_argument_before_anything_is_sent(kwargs, says):
    with pytest.raises(InvalidArgument, match=says):
        NeverSent().create_deployment("web", "m", **kwargs)


def test_scaling_out_of_range_is_invalid_argument_before_anything_is_sent():
    for count in (0, 100_000, 10**23):
        with pytest.raises(InvalidArgument, match="replicas must be 1-64"):
            NeverSent().scale_deployment("web", count)


def test_the_wait_ends_once_the_deployment_is_failing():
    class Failing(NeverSent):
        def get_deployment(self, name, **kw):
            return info(0, 1, state="failing")

    with pytest.raises(FailedPrecondition, match='deployment "web" is failing: 0/1 replicas ready; it keeps trying'):
        Failing().wait_deployment("web", timeout=600, poll_s=0.01)
