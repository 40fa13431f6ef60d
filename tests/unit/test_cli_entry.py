"""The start of `lepton-ctl`: `import lepton.client` is light (its names load on first use),
and a Ctrl-C while the program is still loading grpc, protobuf and rich exits 130 with
nothing on stderr, never Python's traceback."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import lepton.client
from lepton.client import cli

HEAVY = ("grpc", "google", "rich", "numpy")


def test_importing_the_package_and_the_program_loads_nothing_heavy():
    code = (
        "import sys, lepton.client, lepton.client.cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]


def test_every_exported_name_resolves():
    for name in lepton.client.__all__:
        assert getattr(lepton.client, name) is not None, name
    assert set(lepton.client.__all__) <= set(dir(lepton.client))
    from lepton.client import Client, NotFound  # noqa: F401 - the documented spelling

    with pytest.raises(AttributeError):
        _ = lepton.client.NoSuchName
    with pytest.raises(AttributeError):
        _ = cli.no_such_name
    # The program module still offers what tools import from it.
    assert callable(cli.main) and callable(cli.build_parser) and cli.PROG == "lepton-ctl"


def test_version_is_answered(tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "lepton.client.cli", "--version"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, f"lepton-ctl {lepton.client.__version__}\n", "")


# Imported by Python before any of the program's code runs: the child tells us (through a
# pipe) the moment it starts importing grpc, the first of the slow imports; the SIGINTs are
# sent at several moments from there.
_HOOK = """import os, sys
def _hook(event, args):
    if event == "import" and args[0] == "grpc":
        fd = int(os.environ.pop("H4_LOADING_FD", "-1"))
        if fd >= 0:
            os.write(fd, b"x")
            os.close(fd)
sys.addaudithook(_hook)
"""
MOMENTS_S = (0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4)


def _interrupt_while_loading(hook_dir: Path, delay_s: float) -> subprocess.CompletedProcess:
    r, w = os.pipe()
    path = os.pathsep.join(filter(None, [str(hook_dir), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "H4_LOADING_FD": str(w)}
    argv = [sys.executable, "-m", "lepton.client.cli", "nodes", "list", "--server", "127.0.0.1:1"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, pass_fds=(w,), cwd=hook_dir)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 120)
        assert ready and os.read(r, 1) == b"x", "the program never started loading grpc"
    finally:
        os.close(r)
    if delay_s:
        select.select([], [], [], delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_ctrl_c_while_loading_exits_130_quietly(tmp_path: Path):
    (tmp_path / "sitecustomize.py").write_text(_HOOK)
    bad = {}
    for delay in MOMENTS_S:
        out = _interrupt_while_loading(tmp_path, delay)
        # 130, quietly; or, if the command got that far first, its own one-line result
        # (nothing listens on port 1).
        quiet = out.returncode == 130 and out.stderr == ""
        finished = out.returncode == 1 and out.stderr.startswith("lepton-ctl: cannot reach") \
            and out.stderr.count("\n") == 1
        if not (quiet or finished):
            bad[delay] = (out.returncode, out.stderr[-400:])
    assert not bad, bad
