from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    from _pytest.nodeid import NodeId  # pytest 9
except ImportError:  # pytest 8: xdist's own renaming works
    NodeId = None

from tests.integration.cluster import AgentProcess, others_can_exec, passable_folder


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Makes `--dist loadgroup` keep an xdist_group's tests on one worker. pytest-xdist names
    such a test NODEID@GROUP on the workers by setting item._nodeid, which pytest 9 no longer
    reads (the id is item._id), so its controller saw no groups and spread them like `load`
    (checked with xdist 3.8, pytest 9.2). A no-op once xdist's own renaming takes."""
    if NodeId is None or not getattr(config.option, "loadgroup", False):  # set on loadgroup's workers
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if groups and "@" not in item.nodeid:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


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


def _agent_factory(root: Path):
    started: list[AgentProcess] = []

    def start(name: str, *args: str, port: int | None = None) -> AgentProcess:
        agent = AgentProcess(root, name, list(args), port=port).start()
        started.append(agent)
        return agent

    return start, started


@pytest.fixture
def agents(tmp_path):
    """Factory for real agent processes; every one is killed at teardown."""
    start, started = _agent_factory(tmp_path)
    yield start
    for agent in started:
        agent.stop()


@pytest.fixture(scope="module")
def module_agents(request):
    """(factory, folder) for one cluster that a module's tests share, so it starts once: only
    for tests that leave it as they found it. The agents are killed after the module's last
    test. Mark the module with an xdist_group, or its tests may run on different workers
    and each start the cluster."""
    root = passable_folder(request.module.__name__.rsplit(".", 1)[-1])
    start, started = _agent_factory(root)
    yield start, root
    for agent in started:
        agent.stop()
