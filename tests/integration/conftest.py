from __future__ import annotations

import os
import sys

import pytest

from tests.integration.cluster import AgentProcess, others_can_exec, passable_folder


@pytest.fixture
def tmp_path(tmp_path):
    """A test's folder that its tasks may use: a root agent runs them as nobody (its default
    task user), who can neither reach pytest's 0700 base folder nor write a root-owned one.
    So the folder lives in this session's passable root, open to all (sticky, like /tmp);
    pytest's own folder links to it as `tasks`."""
    folder = passable_folder(tmp_path.name)
    os.chmod(folder, 0o1777)
    (tmp_path / "tasks").symlink_to(folder)
    return folder


@pytest.fixture
def tasks_exec_python(monkeypatch):
    """For tests whose tasks start this interpreter from inside the task (torch workers):
    as nobody, the task user a root agent defaults to, a task cannot exec an interpreter in
    a folder closed to others (pyenv's under a 0700 /root; setpriv, which starts the task's
    own command, still runs as root when it execs). Then the agents these tests start run
    tasks as their own user (LEPTON_TASK_USER=none, the documented opt-out); elsewhere
    they keep the default."""
    if not others_can_exec(sys.executable):
        monkeypatch.setenv("LEPTON_TASK_USER", "none")


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
