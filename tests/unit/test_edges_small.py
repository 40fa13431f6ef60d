"""Small edges a careless user or a crash finds (H6): each refusal names what the user gave."""

from __future__ import annotations

import pytest

from lepton.client import cli

NOWHERE = "127.0.0.1:1"  # nothing listens: a command that got this far would say "cannot reach"


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["--server", NOWHERE, *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "says"), [
    (("serve", "update", "web", ""), "model name is required"),
    (("serve", "up", "", "--name", "web"), "model name is required"),
    (("models", "show", ""), "model name is required"),
    (("models", "rm", ""), "model name is required"),
    (("models", "show", "a/b"), "model name 'a/b' may hold only"),
    (("data", "show", ""), "dataset name is required"),
    # Refused before connecting (was: sent, or `train --out ''` trained under a made-up name).
    (("train", "--algorithm", "mlp", "--dataset", "x", "--out", ""), "model name is required"),
    (("predict", "m", "--dataset", "x", "--out", ""), "output dataset name is required"),
    (("data", "process", "x", "--steps", "normalize", "--out", ""), "output name (--out) is required"),
    (("data", "split", "x", "--fractions", "0.5,0.5", "--out", "a,"), "output name (--out) is required"),
    (("data", "split", "x", "--fractions", "0.5,0.5", "--out", "a,a"), "(--out) must differ from each other"),
])
def test_an_empty_or_bad_name_names_what_is_missing(capsys, argv, says):
    code, err = run(capsys, *argv)
    assert code != 0, err
    assert err.count("\n") == 1 and err.startswith("lepton-ctl: ") and says in err, err
    assert "cannot reach" not in err, err


def test_a_deployment_spec_without_a_model_names_the_model():
    from lepton.common.errors import InvalidArgument
    from lepton.common.validation import check_deployment_spec
    from lepton.v1 import serving_pb2

    with pytest.raises(InvalidArgument, match="^model name is required$"):
        check_deployment_spec(serving_pb2.DeploymentSpec(name="web", replicas=1))



class _OneEmptyDataset:
    """A client whose dataset has no shards: get_dataset goes straight to writing `out`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def dataset(self, name):
        from types import SimpleNamespace
        return SimpleNamespace(name=name, kind="data", shards=[], schema="", rows=0, version=1)

    def _pull_all(self, ds, store, progress, parallel):
        return []

    def get_dataset(self, *args, **kwargs):
        from lepton.client.data import DataMethods
        return DataMethods.get_dataset(self, *args, **kwargs)


def test_data_get_into_an_unwritable_folder_names_the_users_path(capsys, monkeypatch):
    client = _OneEmptyDataset()
    with pytest.raises(OSError) as caught:
        client.get_dataset("x", "/proc/x.npy")  # /proc takes no new folder, even as root
    assert caught.value.filename == "/proc/x.npy", caught.value
    assert ".lepton-get" not in str(caught.value) and "cannot write in /proc" in str(caught.value)

    # The CLI's one line: the path the user gave and why (was the work folder's name).
    monkeypatch.setattr("lepton.client.cli_data._client", lambda args: client)
    code, err = run(capsys, "data", "get", "x", "/proc/x.npy")
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("lepton-ctl: /proc/x.npy: cannot write in /proc") and ".lepton-get" not in err, err


@pytest.mark.parametrize("argv", [
    ("data", "process", "x", "--steps", "normalize", "--out", "x"),
    ("data", "split", "x", "--fractions", "0.5,0.5", "--out", "a,x"),
])
def test_process_and_split_both_refuse_an_output_named_like_the_input(capsys, monkeypatch, argv):
    """Was: process wrote a new version of its own input; split refused. Nothing is sent."""
    client = _OneEmptyDataset()
    monkeypatch.setattr("lepton.client.cli_data._client", lambda args: client)
    code, err = run(capsys, *argv)
    assert code == 1 and err.count("\n") == 1, err
    assert "(--out) must differ from" in err and "x" in err, err


def test_process_checks_the_output_name_before_any_work():
    from lepton.client.processor import DataProcessor
    from lepton.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"^output name \(--out\) 'a/b' may hold only"):
        DataProcessor(object()).run("x", [{"op": "normalize", "method": "zscore"}], out="a/b")


class _RaisesAtTwo:
    """A state machine with a bug: it raises on the second entry (as one meeting an entry
    a newer version wrote might)."""

    def __init__(self) -> None:
        from tests.unit.test_consensus_contract import CountingMachine
        self.inner = CountingMachine()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply(self, index, data, answered=True):
        if index == 2:
            raise KeyError("no such table")
        return self.inner.apply(index, data, answered)


async def test_an_etcd_candidate_whose_state_machine_raises_at_load_fails_start_in_one_line(tmp_path, caplog):
    """Was: the KeyError escaped start(), and the agent died with a traceback."""
    from lepton.common.errors import FailedPrecondition
    from lepton.coordinator.etcd.consensus import EtcdConsensus
    from tests.etcd_server import EtcdCluster
    from tests.unit.test_consensus_contract import CountingMachine
    from tests.unit.test_etcd_contract import wait_for_leader

    etcd = EtcdCluster(tmp_path / "etcd", n=1)
    try:
        def node(sm):
            return EtcdConsensus("c1", "c1.test:7000", etcd.endpoints, "/lepton/edges", sm,
                                 tls=None, lease_ttl=2.0)
        writer = node(CountingMachine())
        await writer.start()
        await wait_for_leader({"c1": writer})
        for cmd in (b"a", b"b", b"c"):
            await writer.propose(cmd, timeout=30.0)
        await writer.stop()

        broken = node(_RaisesAtTwo())
        with pytest.raises(FailedPrecondition) as caught:
            await broken.start()
        said = caught.value.message
        assert "\n" not in said and "after index 1" in said and "KeyError" in said, said
        assert not broken.is_leader()
        assert any("loading the stored state failed" in r.getMessage() for r in caplog.records)
    finally:
        etcd.stop()


async def test_the_serve_up_fit_check_rebuilds_no_scheduler_snapshot(monkeypatch):
    """serve up/scale's fit check (check_replicas_fit) reads node capacities only: the
    scheduling loop's kept snapshot stays, and no snapshot is built (was: build_snapshot
    over every task per call)."""
    from lepton.common.errors import FailedPrecondition
    from lepton.coordinator.api import serving_api
    from lepton.coordinator.loops import scheduling
    from lepton.v1 import serving_pb2, tasks_pb2
    from tests.unit.test_scheduling_loop import World

    world = World()
    world.node("n1", cpus=4)
    world.node("n2", cpus=4)
    world.submit("r", cpu=3)
    assert (await world.loop.run_cycle()).startswith("placed 1 of 1")
    kept = world.loop._snapshot()

    builds: list[int] = []
    real = scheduling.build_snapshot

    def counted(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduling, "build_snapshot", counted)
    monkeypatch.setattr(serving_api, "build_snapshot", counted, raising=False)  # the old import

    def spec(cpu: float) -> serving_pb2.DeploymentSpec:
        return serving_pb2.DeploymentSpec(name="web", model="m", resources=tasks_pb2.Resources(cpu=cpu))

    serving_api.check_replicas_fit(world.sm, spec(1), 8)  # two empty 4-cpu nodes hold 8
    with pytest.raises(FailedPrecondition, match="hold at most 8"):
        serving_api.check_replicas_fit(world.sm, spec(1), 9)
    with pytest.raises(FailedPrecondition, match="no node can ever run a replica of 'web'"):
        serving_api.check_replicas_fit(world.sm, spec(5), 1)
    assert builds == []
    assert world.loop._snapshot() is kept and builds == []
