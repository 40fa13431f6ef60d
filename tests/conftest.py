"""Every test runs with a client config file of its own (`$LEPTON_CLIENT_CONFIG` in its
temp folder): a developer's contexts never steer a test, and `local up` in a test never
switches the developer's current context."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_client_config(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path_factory.mktemp("client-config") / "config.toml"
    monkeypatch.setenv("LEPTON_CLIENT_CONFIG", str(path))
