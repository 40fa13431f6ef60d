"""The README's "A short tour" block, run as written: every line of it, in order, from a shell
that has not activated the venv (its PATH lacks it until the tour's own `. .venv/bin/activate`),
with a fresh HOME and no LEPTON_* settings, in a copy of examples/ (so the clone stays clean).

Only the ids the README names NODE, TASK and JOB are filled in, from what earlier commands
printed (or `nodes list -o json` for NODE); `top`, which runs until Ctrl-C, gets a SIGINT
once it has shown a frame. Every command must exit 0."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 600.0
JOB_ID = re.compile(r"\bj-[0-9A-Za-z][0-9A-Za-z._-]*")


def tour_lines(readme: str) -> list[str]:
    """The command lines of the first ```sh block after the "A short tour" heading."""
    section = readme[readme.index("## A short tour"):]
    block = section[section.index("```sh\n") + len("```sh\n"):]
    block = block[:block.index("```")]
    return [line for line in block.splitlines() if shlex.split(line, comments=True)]


def test_tour_parses_into_the_commands_the_readme_promises():
    lines = tour_lines((ROOT / "README.md").read_text())
    argvs = [shlex.split(line, comments=True) for line in lines]
    assert argvs[0] == [".", ".venv/bin/activate"]
    assert ["lepton-ctl", "local", "up", "--agents", "3"] in argvs
    assert argvs[-1] == ["lepton-ctl", "local", "down"]
    assert any("--working-dir" in a for a in argvs)
    assert ["lepton-ctl", "serve", "predict", "digits", "--input", "rows.npy", "-o", "json"] in argvs
    readme = (ROOT / "README.md").read_text()
    for needed in ("export PATH=$PWD/.venv/bin:$PATH", "local down", "--wipe", "leptonai", "`lep`"):
        assert needed in readme, needed


class Tour:
    def __init__(self, tmp_path: Path):
        self.cwd = ROOT
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.work = tmp_path
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("LEPTON_") and k not in ("VIRTUAL_ENV", "XDG_CONFIG_HOME")}
        self.env["HOME"] = str(self.home)
        self.env["PATH"] = os.pathsep.join(
            p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if Path(p) != VENV_BIN)
        self.ids: dict[str, str] = {}
        self.transcript: list[str] = []
        self.took: list[tuple[float, str]] = []  # seconds per command, for the slowest few

    def run_line(self, line: str) -> None:
        argv = shlex.split(line, comments=True)
        if argv[:1] == ["."]:  # `. .venv/bin/activate`: what sourcing it does to PATH
            assert (self.cwd / argv[1]).is_file(), f"{argv[1]} is missing"
            self.env["PATH"] = f"{self.cwd / Path(argv[1]).parent}{os.pathsep}{self.env['PATH']}"
            self.env["VIRTUAL_ENV"] = str((self.cwd / argv[1]).parent.parent)
            return
        if argv[0] == "cd":  # into a copy, so the tour leaves the clone as it was
            target = self.work / Path(argv[1]).name
            shutil.copytree(self.cwd / argv[1], target, ignore=shutil.ignore_patterns("__pycache__"))
            self.cwd = target
            return
        argv = [self.fill(a) for a in argv]
        if argv[:2] == ["lepton-ctl", "top"]:
            self.interrupt_after_output(argv)
            return
        began = time.monotonic()
        out = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT_S)
        self.took.append((time.monotonic() - began, shlex.join(argv)))
        self.transcript.append(f"$ {shlex.join(argv)}\n{out.stdout}{out.stderr}")
        assert out.returncode == 0, self.failure(line, out.returncode)
        self.learn_ids(argv, out.stdout, out.stderr)

    def fill(self, word: str) -> str:
        if word == "NODE" and "NODE" not in self.ids:
            out = subprocess.run(["lepton-ctl", "-o", "json", "nodes", "list"], cwd=self.cwd, env=self.env,
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            self.ids["NODE"] = json.loads(out.stdout)[0]["id"]
        if word in ("NODE", "TASK", "JOB"):
            assert word in self.ids, f"no command before printed a {word} id"
            return self.ids[word]
        return word

    def learn_ids(self, argv: list[str], stdout: str, stderr: str) -> None:
        if argv[1:2] == ["submit"]:
            last = stdout.split()[-1] if stdout.split() else ""
            if last.startswith("t-"):
                self.ids["TASK"] = last
        if found := JOB_ID.search(stdout + stderr):
            self.ids["JOB"] = found.group(0)

    def interrupt_after_output(self, argv: list[str]) -> None:
        proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # a live view: a first frame, then Ctrl-C
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
        self.transcript.append(f"$ {shlex.join(argv)}\n{first}{rest}{err}")
        assert first.strip(), self.failure(shlex.join(argv), proc.returncode)
        assert proc.returncode == 0, self.failure(shlex.join(argv), proc.returncode)

    def failure(self, line: str, code: int) -> str:
        logs = ""
        for log in sorted(self.cwd.glob(".lepton-local/agent-*/agent.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            logs += f"\n--- {log.parent.name}:\n" + "\n".join(tail)
        return f"{line!r} exited {code}\n" + "\n".join(self.transcript[-3:]) + logs

    def stop_cluster(self) -> None:
        if (self.cwd / ".lepton-local").exists():
            subprocess.run([str(VENV_BIN / "lepton-ctl"), "local", "down", "--wipe"], cwd=self.cwd,
                           env=self.env, capture_output=True, timeout=120)


@pytest.mark.timeout(1800)
def test_readme_tour_runs_as_written(tmp_path):
    tour = Tour(tmp_path)
    started = time.monotonic()
    try:
        for line in tour_lines((ROOT / "README.md").read_text()):
            tour.run_line(line)
    finally:
        tour.stop_cluster()
    slowest = ", ".join(f"{cmd[:60]} {s:.0f}s" for s, cmd in sorted(tour.took, reverse=True)[:4])
    print(f"the tour took {time.monotonic() - started:.0f}s; slowest: {slowest}")
