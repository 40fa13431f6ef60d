"""A careless user at the real `lepton-ctl` and `lepton-agent`: wrong names, missing files,
huge inputs and numbers, Ctrl-C and kill -TERM mid-command, a relative --data-dir. Each
mistake ends in one line on stderr and a non-zero exit, never a traceback or an
"unexpected error", and changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.integration.cluster import FAST, passable_folder, run_ctl, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("edges_cli")]

BIG = "x" * 100_000  # under one argument's limit (128 KiB), far over every name's


@pytest.fixture(scope="module")
def node(module_agents):
    start, _root = module_agents
    return start("edges")


def one_line_refusal(out: subprocess.CompletedProcess) -> None:
    assert out.returncode not in (0, None), out
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("lepton-ctl: "), out.stderr
    assert "Traceback" not in out.stderr and "unexpected error" not in out.stderr, out.stderr


WRONG_NAMES = [
    ("nodes", "show", "nosuch"), ("nodes", "drain", "nosuch"), ("tasks", "show", "t-nosuch"),
    ("tasks", "cancel", "t-nosuch"), ("logs", "t-nosuch"), ("logs", "bad name!"), ("jobs", "show", "j-nosuch"),
    ("jobs", "logs", "j-nosuch"), ("jobs", "cancel", "j-nosuch"), ("data", "get", "nosuch", "out.npy"),
    ("data", "process", "nosuch", "--steps", "normalize", "--out", "y"),
    ("data", "process", "nosuch", "--steps", "bogus", "--out", "y"),
    ("data", "split", "nosuch", "--fractions", "0.8,0.2", "--out", "a,b"), ("models", "show", "nosuch"),
    ("evaluate", "nosuch", "--dataset", "nosuch"), ("predict", "nosuch", "--dataset", "nosuch", "--out", "p"),
    ("serve", "up", "nosuch", "--name", "web"), ("serve", "show", "nosuch"), ("serve", "rm", "nosuch"),
    ("serve", "scale", "nosuch", "3"), ("serve", "update", "nosuch", "nosuch"),
    ("tasks", "list", "--state", "bogus"), ("train", "--algorithm", "nosuch", "--dataset", "d", "--out", "m"),
    # Missing files.
    ("data", "put", "/no/such/file.npz", "--name", "x"), ("apply", "-f", "/no/such.toml"),
    ("run", "--working-dir", "/no/such/dir", "--", "python", "x.py"),
    ("serve", "predict", "nosuch", "--input", "/no/such.npy"),
    # Huge inputs.
    ("submit", "--name", BIG, "--", "true"), ("data", "put", "/etc/hostname", "--name", BIG),
    ("serve", "up", BIG, "--name", "web"), ("logs", BIG), ("serve", "show", BIG),
    # Numbers past what the cluster (and the messages' fields) hold: these raised ValueError
    # inside the client ("unexpected error") before.
    ("submit", "--mem", "99999999PiB", "--", "true"), ("submit", "--gpus", "99999999999", "--", "true"),
    ("submit", "--priority", "99999999999999999999", "--", "true"),
    ("submit", "--gpus", "1", "--gpu-mem", "99999999PiB", "--", "true"),
    ("run", "--nodes", "99999999999", "--nproc-per-node", "1", "--", "true"),
    ("run", "--nodes", "2", "--nproc-per-node", "99999999999", "--", "true"),
    ("run", "--nproc-per-node", "1", "--max-restarts", "99999999999", "--", "true"),
    ("serve", "up", "nosuch", "--name", "web", "--mem", "99999999PiB"),
    ("serve", "up", "nosuch", "--name", "web", "--replicas", "1000000"),
    ("submit", "--cpu", "1e308", "--", "true"), ("submit", "--timeout", "nan", "--", "true"),
    # Files that are not what the command needs ("unexpected error: FileNotFoundError" before),
    # and a local cluster of 1000 agents (was started, one process each, until the host gave out).
    ("snapshot", "save", "/nonexistent-h7/dir/snap"), ("certs", "init", "--dir", "/dev/null"),
    ("local", "up", "--agents", "1000"),
]


def state(node) -> tuple:
    """What a refused command must not change: tasks, datasets, deployments, drains."""
    def listed(*args: str) -> list:
        return json.loads(run_ctl("-o", "json", *args, server=node.address, check=True).stdout)

    tasks = sorted(t["id"] for t in listed("tasks", "list"))
    datasets = sorted(d["name"] for d in listed("data", "ls", "--all"))
    deployments = sorted(d["name"] for d in listed("serve", "ls"))
    drains = [n.get("draining") for n in listed("nodes", "list")]
    return tasks, datasets, deployments, drains


def test_mistakes_get_one_line_and_change_nothing(node, tmp_path):
    before = state(node)
    refusals = {}
    (tmp_path / "job.toml").write_bytes(b"\xd5\xff binary, not TOML")
    # A job file that never ends (was read whole: the memory ran out) or is binary (was
    # "unexpected error: UnicodeDecodeError").
    probes = [*WRONG_NAMES, ("apply", "-f", "/dev/zero"), ("apply", "-f", str(tmp_path / "job.toml"))]
    # A few at a time: each is a process that mostly waits on its imports (the suite's time).
    with ThreadPoolExecutor(4) as pool:
        outs = pool.map(lambda args: run_ctl(*args, server=node.address, timeout=120), probes)
        for args, out in zip(probes, outs, strict=True):
            try:
                one_line_refusal(out)
            except AssertionError as err:
                refusals[" ".join(a[:20] for a in args)] = str(err)[:300]
    assert not refusals, refusals
    assert state(node) == before


def talking(pid: int) -> bool:
    """The process holds a socket: it has connected to the cluster."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd).startswith("socket:") for fd in fds.iterdir())
    except OSError:
        return False


def test_ctrl_c_and_kill_term_mid_command(node, tmp_path):
    """Interrupted, a command exits non-zero without a traceback; an interrupted upload
    leaves no dataset behind, unless its commit was already sent: then it says the dataset
    is recorded and exits 0."""
    task = run_ctl("submit", "--cpu", "0.1", "--", "sleep", "600", server=node.address, check=True).stdout.strip()
    np.save(tmp_path / "big.npy", np.random.default_rng(0).normal(size=(4_000_000, 4)).astype(np.float32))
    ctl = [sys.executable, "-m", "lepton.client.cli", "--server", node.address]
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            put = ["data", "put", str(tmp_path / "big.npy"), "--name", "cut", "--replicas", "1"]
            for args, after_s in ((["logs", "-f", task], 1.0), (put, 0.02), (put, 0.2)):
                p = subprocess.Popen(ctl + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                # Mid-command: once it talks to the cluster (a Ctrl-C while Python still imports
                # the client prints Python's own traceback: a finding this test leaves out).
                wait_until(lambda p=p: talking(p.pid) or p.poll() is not None, timeout=60, what="the command to connect")
                time.sleep(after_s)  # a finished command is caught below
                p.send_signal(sig)
                out, err = p.communicate(timeout=60)
                assert "Traceback" not in err and err.count("\n") <= 1, (sig, args, err)
                datasets = json.loads(run_ctl("-o", "json", "data", "ls", server=node.address, check=True).stdout)
                if p.returncode == 0:  # done before the signal, or too late to stop: recorded, whole
                    assert args[0] == "data", (sig, args, err)
                    assert "too late: dataset cut v" in err or not err and "dataset cut v" in out, (sig, out, err)
                    got = run_ctl("data", "get", "cut", str(tmp_path / "back.npy"), server=node.address, check=True)
                    assert got.returncode == 0 and np.load(tmp_path / "back.npy").shape == (4_000_000, 4)
                    (tmp_path / "back.npy").unlink()
                    run_ctl("data", "rm", "cut", server=node.address, check=True)
                else:
                    assert "cut" not in {d["name"] for d in datasets}, (sig, err)
    finally:
        run_ctl("tasks", "cancel", task, server=node.address)


def test_a_relative_data_dir_runs_tasks():
    """`lepton-agent --data-dir data` (relative): its attempt fence and tasks, which do not
    share its working folder, found no `data/tasks/...` (every task failed to start)."""
    from tests.integration.cluster import free_port

    root = passable_folder("edges-relative")
    root.chmod(0o711)  # a root agent's task user (nobody) passes through to its own folder
    address = f"127.0.0.1:{free_port()}"
    log = open(root / "agent.log", "ab")  # noqa: SIM115 - owned by the child
    agent = subprocess.Popen([sys.executable, "-m", "lepton.agent.main", "--data-dir", "rel", "--listen", address,
                              *FAST], cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        wait_until(lambda: (root / "rel" / "agent.json").exists() or agent.poll() is not None,
                   timeout=60, what="the agent to start")
        assert agent.poll() is None, (root / "agent.log").read_text()[-2000:]
        out = run_ctl("run", "--", "echo", "hello", server=address, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "hello", out.stderr
    finally:
        agent.kill()
        agent.wait(10)


BAD_AGENT_FLAGS = [
    ["--state", "etcd://"], ["--state", "etcd://host"], ["--state", "etcd://h:99999"], ["--state", "ftp://h:1"],
    ["--state", "etcd://h:1,h:1"], ["--state", "etcd://h:1", "--peers", "127.0.0.1:5"],
    ["--state", "etcd://h:1", "--etcd-lease-ttl", "nan"], ["--state", "etcd://h:1", "--etcd-ca", "/no/such"],
    # A file that is not a certificate: gRPC's C core printed 4 lines every 200 ms before.
    ["--state", "etcd://h:1", "--etcd-ca", "{junk}"],
    ["--state", "etcd://h:1", "--etcd-prefix", "noslash"], ["--etcd-prefix", "/x"],
    ["--state", "etcd://h:1", "--cluster-name", "a/b"],
]


@pytest.mark.parametrize("flags", BAD_AGENT_FLAGS, ids=[" ".join(f) for f in BAD_AGENT_FLAGS])
def test_bad_state_flags_stop_the_agent_with_one_line(flags, tmp_path):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    flags = [f.format(junk=tmp_path / "junk.pem") for f in flags]
    cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(tmp_path / "data"),
           "--listen", "127.0.0.1:0", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and out.stderr.startswith("lepton-agent: "), out
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was made
