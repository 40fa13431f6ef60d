"""The first job, as a new user runs it: `local up --agents 2` from a shell whose PATH does not
hold the venv, a fresh HOME and no LEPTON_SERVER, then `run --working-dir . -- python train.py`
from a folder with a script that imports numpy and a helper module beside it. The script's
output comes back and the exit code is 0; a second run does not upload the folder again.
And from Python: `submit(..., working_dir=)`, and an archive gone before a node fetched it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lepton.client import Client
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration

CTL = str(Path(sys.executable).with_name("lepton-ctl"))
# What the agents-fixture tests' tasks run: an interpreter any user may exec (a root agent's
# tasks may run as nobody, who cannot reach a pyenv under /root); they import only the
# shipped folder.
ANY_USER_PYTHON = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                        if os.access(p, os.X_OK)), sys.executable)
TRAIN = """\
import numpy as np
import helper
from pkg import mod
print("sum", int(np.arange(5).sum()), helper.NAME, mod.VALUE)
"""


def user_shell_env(home: Path) -> dict[str, str]:
    """A shell that never activated the venv: system PATH, its own HOME, no cluster set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in ("/usr/local/bin", "/usr/bin", "/bin") if p != venv_bin)
    env["HOME"] = str(home)
    env.pop("XDG_CONFIG_HOME", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def ctl(*args: str, cwd: Path, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CTL, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_run_working_dir_ships_the_folder_once_and_runs_the_venv_python(tmp_path):
    project = tmp_path / "project"
    (project / "pkg").mkdir(parents=True)
    (project / "train.py").write_text(TRAIN)
    (project / "helper.py").write_text('NAME = "helper-ok"\n')
    (project / "pkg" / "__init__.py").write_text("")
    (project / "pkg" / "mod.py").write_text("VALUE = 7\n")
    (project / ".gitignore").write_text("data/\n")
    (project / "data").mkdir()
    (project / "data" / "huge.bin").write_bytes(b"\0" * (1 << 20))
    home = tmp_path / "home"
    home.mkdir()
    env = user_shell_env(home)
    cluster_dir = str(tmp_path / "cluster")
    up = ctl("local", "up", "--agents", "2", "--data-dir", cluster_dir, cwd=project, env=env)
    try:
        assert up.returncode == 0, up.stderr
        assert f"tasks run python: {Path(sys.executable).parent / 'python'}" in up.stdout
        first = ctl("run", "--working-dir", ".", "--", "python", "train.py", cwd=project, env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout == "sum 10 helper-ok 7\n"
        assert "(uploaded)" in first.stderr, first.stderr
        assert "KiB" in first.stderr  # data/ (1 MiB) stayed home: .gitignore
        second = ctl("run", "--working-dir", ".", "--", "python", "train.py", cwd=project, env=env)
        assert second.returncode == 0, second.stderr
        assert second.stdout == "sum 10 helper-ok 7\n"
        assert "already stored, not uploaded again" in second.stderr, second.stderr
        # A changed file is a new archive: uploaded, and what runs is the new code.
        (project / "helper.py").write_text('NAME = "changed"\n')
        third = ctl("run", "--working-dir", ".", "--", "python", "train.py", cwd=project, env=env)
        assert third.returncode == 0, third.stderr
        assert third.stdout == "sum 10 changed 7\n" and "(uploaded)" in third.stderr
    finally:
        down = ctl("local", "down", "--data-dir", cluster_dir, "--wipe", cwd=project, env=env)
        assert down.returncode == 0, down.stderr


def test_python_client_ships_code_and_a_lost_archive_fails_the_start_with_why(agents, tmp_path):
    node = agents("solo")
    project = tmp_path / "py-project"
    project.mkdir()
    (project / "main.py").write_text("import helper\nprint(helper.GREETING)\n")
    (project / "helper.py").write_text('GREETING = "shipped from python"\n')
    with Client(node.address) as c:
        wait_until(lambda: any(n.state == "ready" for n in c.nodes()), what="node ready")
        # One ready node: the archive is stored with one copy (two cannot be placed).
        task = c.submit([ANY_USER_PYTHON, "main.py"], working_dir=project)
        assert c.wait(task.id, timeout=120).state == "succeeded"
        assert b"".join(c.logs(task.id)) == b"shipped from python\n"
        assert c.get(task.id).code_digest == c.push_code(project).digest
        assert not c.push_code(project).uploaded
        # Another folder, stored then removed before any node fetched it: the attempt
        # fails to start and says why, with the shell's 127.
        (project / "helper.py").write_text('GREETING = "never fetched"\n')
        upload = c.push_code(project)
        c.delete_dataset(upload.dataset)
        lost = c.submit([ANY_USER_PYTHON, "main.py"], code_digest=upload.digest)
        done = c.wait(lost.id, timeout=120)
        assert (done.state, done.exit_code) == ("failed", 127)
        assert f"cannot fetch code {upload.digest[:12]}" in done.reason
        assert "does not store it" in done.reason


def test_with_auth_a_worker_fetches_a_users_code_as_itself(agents, tmp_path):
    """--auth: the worker asks the leader for the archive's holders (GetDataset, open to
    nodes) and pulls it with its node token; the user's token is never on the node."""
    voter = agents("voter", "--auth")
    token_path = voter.data_dir / "admin.token"
    wait_until(token_path.exists, what="the bootstrap admin token")
    admin = token_path.read_text().strip()
    (tmp_path / "worker").mkdir()  # the worker's data dir (the agents fixture's root is tmp_path)
    shutil.copy(voter.data_dir / "node.token", tmp_path / "worker" / "node.token")
    agents("worker", "--auth", "--join", voter.address, "--labels", "role=worker")
    project = tmp_path / "authed"
    project.mkdir()
    (project / "main.py").write_text("import helper\nprint(helper.WHO)\n")
    (project / "helper.py").write_text('WHO = "alice via the worker"\n')
    with Client(voter.address, token=admin) as ad:
        wait_until(lambda: sum(n.state == "ready" for n in ad.nodes()) == 2, what="both nodes ready")
    alice = run_ctl("--token", admin, "tokens", "create", "--role", "user", "--name", "alice",
                    server=voter.address, check=True).stdout.strip()
    with Client(voter.address, token=alice) as c:
        task = c.submit([ANY_USER_PYTHON, "main.py"], working_dir=project, constraints={"role": "worker"})
        done = c.wait(task.id, timeout=120)
        assert done.state == "succeeded", done.reason
        assert b"".join(c.logs(task.id)) == b"alice via the worker\n"
