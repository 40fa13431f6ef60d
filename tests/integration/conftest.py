from __future__ import annotations

import pytest

from tests.integration.cluster import AgentProcess


@pytest.fixture
def agents(tmp_path):
    """Factory for real agent processes; every one is killed at teardown."""
    started: list[AgentProcess] = []

    def start(name: str, *args: str, port: int | None = None) -> AgentProcess:
        agent = AgentProcess(tmp_path, name, list(args), port=port).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()
