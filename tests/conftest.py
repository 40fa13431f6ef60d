"""Every test runs with a client config file of its own (`$LEPTON_CLIENT_CONFIG` in its
temp folder): a developer's contexts never steer a test, and `local up` in a test never
switches the developer's current context."""

from __future__ import annotations

import os

import pytest

# One OpenMP thread per torch process, in pytest's workers and (agents pass it on) in every
# task: the tests' agents, ranks and replicas share this host's few cores, where torch's
# default (a spinning thread per core) made 2-rank gloo training 15x slower under load.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _own_client_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path_factory.mktemp("client-config") / "config.toml"
    monkeypatch.setenv("LEPTON_CLIENT_CONFIG", str(path))


# The longest modules (make test's --durations, slowest first) start first: with pytest-xdist
# the suite lasts at least as long as the last test to start, and `--dist loadgroup` starts
# the xdist groups (most tests first), then every other test in collection order (else
# integration before unit, alphabetical). Whole modules move, so a module's shared cluster
# (module_agents) still starts once; a name that no longer exists matches nothing.
START_FIRST = (
    "tests/integration/test_readme_tour.py",
    "tests/integration/test_torch_jobs.py",
    "tests/integration/test_serving.py",
    "tests/integration/test_serving_control.py",
    "tests/integration/test_etcd_cluster.py",
    "tests/integration/test_ml_cli.py",
    "tests/integration/test_raft_cluster.py",
    "tests/integration/test_torch_recipes.py",
    "tests/integration/test_data_formats_large.py",
    "tests/integration/test_gc.py",
    "tests/integration/test_trust_raft.py",
    "tests/integration/test_serving_replica.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(START_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
