"""Issue 12, tasks: a task never holds its node's identity. With TLS and --auth, a user's
task on a worker started with --task-user nobody cannot read the node's key, data dir or
token, gets no TLS folder with a node identity, acts as its submitter (a user: no admin
tokens, no DeleteShards, no DropReplica), and its credential dies with the attempt. Also
the data dir's modes under umask 000, and an agent refusing a data dir others can write."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from lepton.client import Client
from lepton.common.errors import Unauthenticated
from tests.integration.cluster import AgentProcess, free_port, others_can_exec, run_ctl, wait_until

pytestmark = pytest.mark.integration

# Runs inside the task (as nobody, on the worker) and prints one JSON line of findings.
PROBE = r"""
import contextlib, io, json, os
import grpc
from lepton.client import Client, cli
from lepton.common.channels import TlsConfig
from lepton.v1 import datasets_pb2 as dpb, datasets_pb2_grpc as dgrpc

def readable(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return True
    except OSError:
        return False

def listable(path):
    try:
        os.listdir(path)
        return True
    except OSError:
        return False

out = {"uid": os.getuid(), "env": sorted(os.environ),
       "tls_dir": os.environ.get("LEPTON_TLS_DIR", ""), "cert_name": os.environ.get("LEPTON_CERT_NAME", ""),
       "tls_files": sorted(os.listdir(os.environ["LEPTON_TLS_DIR"])),
       "token_kind": os.environ.get("LEPTON_TOKEN", "")[:5],
       "node_key": readable(os.environ["NODE_KEY"]), "data_dir": listable(os.environ["NODE_DATA"]),
       "node_id_file": readable(os.path.join(os.environ["NODE_DATA"], "node_id"))}
with Client(os.environ["LEPTON_SERVER"]) as c:  # LEPTON_TOKEN and the task TLS folder, from the env
    out["nodes"] = len(c.nodes())
# lepton-ctl, in this process: the venv's interpreter may sit where nobody cannot exec it.
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = cli.main(["--server", os.environ["LEPTON_SERVER"], "tokens", "create", "--role", "admin", "--name", "evil"])
out["mint_admin"] = [code, err.getvalue().strip()]
tls = TlsConfig.from_env()
md = [("authorization", "Bearer " + os.environ["LEPTON_TOKEN"])]
for name, addr, method, req in [
        ("delete_shards_voter", os.environ["LEPTON_SERVER"], "DeleteShards", dpb.DeleteShardsRequest(shard_ids=["a" * 64])),
        ("delete_shards_worker", os.environ["WORKER"], "DeleteShards", dpb.DeleteShardsRequest(shard_ids=["a" * 64])),
        ("drop_replica", os.environ["LEPTON_SERVER"], "DropReplica",
         dpb.DropReplicaRequest(shard_id="a" * 64, node_id=os.environ["NODE_ID"], reason="x"))]:
    with grpc.secure_channel(addr, tls.channel_credentials()) as ch:
        stub = dgrpc.ShardsStub(ch) if method == "DeleteShards" else dgrpc.DatasetsStub(ch)
        try:
            getattr(stub, method)(req, metadata=md, timeout=10)
            out[name] = "ALLOWED"
        except grpc.RpcError as err:
            out[name] = err.code().name
out["token"] = os.environ["LEPTON_TOKEN"]
print(json.dumps(out), flush=True)
"""


def nobody_python_argv(module: str) -> list[str]:
    """argv running `python -m module` that a task's own processes can start as nobody.
    Torch workers are started by the task (not by setpriv, which runs as root until its
    exec): an interpreter under a 0700 /root (pyenv) is not theirs to exec. Then the
    system's python of the same version, with this venv's site-packages."""
    if others_can_exec(sys.executable):
        return [sys.executable, "-m", module]
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(system) or not others_can_exec(system):
        pytest.skip(f"no interpreter nobody may exec ({sys.executable} is under a folder closed to others)")
    site_dirs = [p for p in sys.path if p.endswith("site-packages")]
    boot = (f"import runpy, site, sys; [site.addsitedir(d) for d in {site_dirs!r}]; "
            f"sys.argv[0] = {module!r}; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [system, "-c", boot]


@pytest.fixture
def secure_cluster():
    """A voter and a worker with TLS and --auth; the worker runs tasks as nobody. Their root
    is 0711 under /tmp, like /var/lib (pytest's own base folder is 0700 and shared by other
    sessions). Returns (voter, worker, tls dir)."""
    root = Path(tempfile.mkdtemp(prefix="lepton-task-identity-"))
    os.chmod(root, 0o711)
    started: list[AgentProcess] = []
    try:
        d = str(root / "tls")  # 0700: the node keys in it are the agents' alone
        run_ctl("certs", "init", "--dir", d, server="-", check=True)
        run_ctl("certs", "issue", "admin", "--kind", "user", "--role", "admin", "--dir", d, server="-", check=True)
        voter = AgentProcess(root, "voter", ["--tls-dir", d, "--auth"]).start()
        started.append(voter)
        worker = AgentProcess(root, "worker", ["--join", voter.address, "--tls-dir", d, "--auth",
                                               "--labels", "role=worker", "--task-user", "nobody"]).start()
        started.append(worker)
        with Client(voter.address, tls_dir=d) as admin:
            wait_until(lambda: sum(n.state == "ready" for n in admin.nodes()) == 2, timeout=60, what="both nodes ready")
        yield voter, worker, d
    finally:
        for agent in started:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)


def _output(admin: Client, task_id: str) -> str:
    return b"".join(admin.logs(task_id)).decode()


def test_a_task_acts_as_its_submitter_and_never_as_its_node(secure_cluster):
    voter, worker, d = secure_cluster
    alice = run_ctl("--tls-dir", d, "tokens", "create", "--role", "user", "--name", "alice",
                    server=voter.address, check=True).stdout.strip()
    env = {"NODE_KEY": os.path.join(d, f"{worker.node_id}.key"), "NODE_DATA": str(worker.data_dir),
           "NODE_ID": worker.node_id, "WORKER": worker.address}
    with Client(voter.address, tls_dir=d, token=alice) as c:  # the token wins over the cert
        task = c.submit([sys.executable, "-c", PROBE], cpu=0.1, env=env, constraints={"role": "worker"})
        assert task.owner == "alice"
        done = c.wait(task.id, timeout=120)
    with Client(voter.address, tls_dir=d) as admin:  # workers take certificates, not user tokens
        text = _output(admin, task.id)
    assert done.state == "succeeded", text
    found = json.loads(text.strip().splitlines()[-1])

    assert found["uid"] == 65534  # nobody
    assert not found["node_key"] and not found["data_dir"] and not found["node_id_file"]
    assert "LEPTON_NODE_TOKEN" not in found["env"]
    assert found["tls_dir"] == str(worker.data_dir / "task-tls") and found["cert_name"] == "task"
    assert found["tls_files"] == ["ca.crt", "task.crt", "task.key"]  # no node certificate or key
    assert found["token_kind"] == "lept_"
    assert found["nodes"] == 2  # the credential works while the attempt runs...
    code, err = found["mint_admin"]
    assert code == 1 and "needs role admin; alice has role user" in err
    assert found["delete_shards_voter"] == "PERMISSION_DENIED"
    assert found["delete_shards_worker"] in ("PERMISSION_DENIED", "UNAUTHENTICATED")
    assert found["drop_replica"] == "PERMISSION_DENIED"

    # ...and stops with it.
    with Client(voter.address, tls_dir=d, token=found["token"]) as c, pytest.raises(Unauthenticated):
        c.nodes()

    # Workers hold no tokens: they ask a voter. With the certificate tasks get (it names
    # nobody), alice's token reads her task's output there and puts a copy of a dataset there.
    task_tls = str(worker.data_dir / "task-tls")
    with Client(voter.address, tls_dir=task_tls, cert_name="task", token=alice) as c:
        assert '"uid": 65534' in b"".join(c.logs(task.id)).decode()
    data = Path(d).parent / "a.npy"
    np.save(data, np.arange(400, dtype=np.float32).reshape(100, 4))
    as_alice = ("--tls-dir", task_tls, "--cert-name", "task", "--token", alice)
    put = run_ctl(*as_alice, "-o", "json", "data", "put", str(data), "--name", "a", "--replicas", "2",
                  server=voter.address)
    assert put.returncode == 0, put.stderr
    assert [len(s["replicas"]) for s in json.loads(put.stdout)["shards"]] == [2]
    # Revoked, the worker stops taking it once its answer about it is a few seconds old.
    run_ctl("--tls-dir", d, "tokens", "revoke", alice.split("_")[1], server=voter.address, check=True)

    def worker_refuses() -> bool:
        with Client(voter.address, tls_dir=task_tls, cert_name="task", token=alice) as c:
            try:
                b"".join(c.logs(task.id))
            except Unauthenticated:
                return True
        return False

    wait_until(worker_refuses, timeout=60, what="the worker refusing the revoked token")


# Without TLS: exits 0 only when the task sees no node token (environment or file) and its
# own credential works as its submitter; what it found goes to stdout either way.
PLAIN_PROBE = r"""
import contextlib, io, json, os, sys
from lepton.client import Client, cli

def readable(path):
    try:
        with open(path, "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False

found = {"env_token": "LEPTON_NODE_TOKEN" in os.environ, "uid": os.getuid(),
         "token_file": readable(os.path.join(os.environ["NODE_DATA"], "node.token"))}
with Client(os.environ["LEPTON_SERVER"]) as c:
    found["nodes"] = len(c.nodes())
err = io.StringIO()
with contextlib.redirect_stderr(err):
    found["mint_admin"] = cli.main(["--server", os.environ["LEPTON_SERVER"], "tokens", "create",
                                    "--role", "admin", "--name", "evil"])
print(json.dumps(found), err.getvalue().strip(), flush=True)
ok = (not found["env_token"] and not found["token_file"] and found["uid"] == 65534
      and found["nodes"] == 2 and found["mint_admin"] == 1 and "needs role admin" in err.getvalue())
sys.exit(0 if ok else 3)
"""


def test_without_tls_a_task_never_sees_the_node_token(monkeypatch):
    root = Path(tempfile.mkdtemp(prefix="lepton-task-identity-"))
    os.chmod(root, 0o711)
    started: list[AgentProcess] = []
    try:
        voter = AgentProcess(root, "voter", ["--auth"]).start()
        started.append(voter)
        token_file = voter.data_dir / "node.token"
        wait_until(lambda: (voter.data_dir / "admin.token").exists(), timeout=60, what="the bootstrap admin token")
        admin = (voter.data_dir / "admin.token").read_text().strip()
        worker_dir = root / "worker"
        worker_dir.mkdir(mode=0o700)
        shutil.copy(token_file, worker_dir / "node.token")
        # The agent's own environment holds the node token too: tasks must not inherit it.
        monkeypatch.setenv("LEPTON_NODE_TOKEN", token_file.read_text().strip())
        worker = AgentProcess(root, "worker", ["--auth", "--join", voter.address, "--labels", "role=worker",
                                               "--task-user", "nobody"]).start()
        started.append(worker)
        monkeypatch.delenv("LEPTON_NODE_TOKEN")
        with Client(voter.address, token=admin) as c:
            wait_until(lambda: sum(n.state == "ready" for n in c.nodes()) == 2, timeout=60, what="both nodes ready")
        alice = run_ctl("--token", admin, "tokens", "create", "--role", "user", "--name", "alice",
                        server=voter.address, check=True).stdout.strip()
        with Client(voter.address, token=alice) as c:
            task = c.submit([sys.executable, "-c", PLAIN_PROBE], cpu=0.1, env={"NODE_DATA": str(worker.data_dir)},
                            constraints={"role": "worker"})
            done = c.wait(task.id, timeout=120)
        # Workers take no user tokens without TLS, so the output stays there: the exit code says.
        assert (done.state, done.exit_code) == ("succeeded", 0), done
    finally:
        for agent in started:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_token_alone_moves_data_through_a_worker(agents, tmp_path):
    """No certificates at all: alice's token puts a dataset with a copy on the worker and
    gets it back, the worker asking the voter who she is (what tasks do with their own)."""
    voter = agents("voter", "--auth")
    wait_until(lambda: (voter.data_dir / "admin.token").exists(), timeout=60, what="the bootstrap admin token")
    admin = (voter.data_dir / "admin.token").read_text().strip()
    (tmp_path / "worker").mkdir(mode=0o700)
    shutil.copy(voter.data_dir / "node.token", tmp_path / "worker" / "node.token")
    agents("worker", "--auth", "--join", voter.address)
    with Client(voter.address, token=admin) as c:
        wait_until(lambda: sum(n.state == "ready" for n in c.nodes()) == 2, timeout=60, what="both nodes ready")
    alice = run_ctl("--token", admin, "tokens", "create", "--role", "user", "--name", "alice",
                    server=voter.address, check=True).stdout.strip()
    x = np.arange(4000, dtype=np.float32).reshape(1000, 4)
    np.save(tmp_path / "x.npy", x)
    put = run_ctl("--token", alice, "-o", "json", "data", "put", str(tmp_path / "x.npy"), "--name", "x",
                  "--replicas", "2", server=voter.address)
    assert put.returncode == 0, put.stderr
    assert [len(s["replicas"]) for s in json.loads(put.stdout)["shards"]] == [2]
    got = run_ctl("--token", alice, "data", "get", "x", str(tmp_path / "y.npy"), server=voter.address)
    assert got.returncode == 0, got.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), x)


def test_a_torch_job_over_tls_works_with_its_credential_alone(secure_cluster, tmp_path):
    """Over TLS and --auth, a user's two-node torch job runs as nobody on two workers: it
    fetches its shards (into a store of its own: the node's is not nobody's to read), writes
    its rank logs and checkpoints in the job folder the agent gave it, stores its model, and
    the user reads it back: every call with the task's (or the user's) token and the
    certificate that names nobody."""
    from lepton.workloads.recipes.cluster import get_file
    from tests.integration.test_torch_jobs import rows

    voter, worker, d = secure_cluster
    other = AgentProcess(voter.data_dir.parent, "other", ["--join", voter.address, "--tls-dir", d, "--auth",
                                                          "--labels", "role=worker", "--task-user", "nobody"])
    other.start()
    try:
        with Client(voter.address, tls_dir=d) as admin:
            wait_until(lambda: sum(n.state == "ready" for n in admin.nodes()) == 3, timeout=60, what="three nodes ready")
        alice = run_ctl("--tls-dir", d, "tokens", "create", "--role", "user", "--name", "alice",
                        server=voter.address, check=True).stdout.strip()
        x, y = rows(np.random.default_rng(3), 64)
        np.savez(tmp_path / "all.npz", x=x, y=y)
        task_tls = str(worker.data_dir / "task-tls")
        with Client(voter.address, tls_dir=task_tls, cert_name="task", token=alice, timeout=60) as c:
            c.put_dataset(tmp_path / "all.npz", "ddp-data", shards=2)
            job = c.submit_job([*nobody_python_argv("lepton.workloads.recipes.cluster"), "train",
                                "--model-name", "ddp-model", "--algorithm", "mlp", "--epochs", "1",
                                "--hidden", "8", "--batch-size", "8"],
                               nodes=2, nproc_per_node=1, cpu=0.5, dataset="ddp-data",
                               constraints={"role": "worker"})
            done = c.wait_job(job.id, timeout=240)
            assert done.state == "succeeded", (done.reason, b"".join(c.job_logs(job.id)).decode()[-3000:])
            assert c.dataset("ddp-model").owner == "alice"  # stored by the job, as its submitter
            model = get_file(c, "ddp-model", tmp_path / "model.pt")
        assert model.stat().st_size > 0
        for node in (worker, other):  # the job's folder is nobody's; the node's store stays the agent's
            job_dir = node.data_dir / "jobs" / job.id
            assert job_dir.stat().st_uid == 65534 and any(job_dir.glob("restart-0/node-*/rank_*.log"))
            assert (node.data_dir / "shards").stat().st_uid == 0
    finally:
        other.stop()


def test_data_dir_is_private_whatever_the_umask(tmp_path):
    # Without a task user: with one (the default as root) the folders on the way to a
    # task's own are 0711 by design (test_a_task_acts_as_its_submitter_... covers those).
    voter = AgentProcess(tmp_path, "voter", ["--task-user", "none"])  # its folder 0755, from the usual umask
    old = os.umask(0)  # everything the agent makes, under umask 000
    try:
        voter.start()
    finally:
        os.umask(old)
    try:
        _run_one_task_and_check_modes(voter)
    finally:
        voter.stop()


def _run_one_task_and_check_modes(voter: AgentProcess) -> None:
    with Client(voter.address) as c:
        task = c.submit(["/bin/sh", "-c", "echo hi > out.txt; echo done"], cpu=0.1)
        assert c.wait(task.id, timeout=60).state == "succeeded"
    assert stat.S_IMODE(voter.data_dir.stat().st_mode) == 0o700
    loose = []
    for folder, dirs, files in os.walk(voter.data_dir):
        for name in (*dirs, *files):
            mode = os.lstat(os.path.join(folder, name)).st_mode
            if mode & 0o077 and not stat.S_ISLNK(mode):
                loose.append(f"{os.path.join(folder, name)} {stat.S_IMODE(mode):o}")
    assert not loose
    assert any(f.endswith("out.txt") for _, _, fs in os.walk(voter.data_dir) for f in fs)


def test_agent_refuses_a_data_dir_others_can_write(tmp_path):
    data = tmp_path / "open"
    data.mkdir()
    os.chmod(data, 0o777)
    cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(data),
           "--listen", f"127.0.0.1:{free_port()}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"lepton-agent: data dir {data} can be written by others (mode 0777): "
        "chmod 700 it or choose another --data-dir"]
    assert not (data / "node_id").exists()  # refused before anything was written


@pytest.mark.parametrize("flags", [["--task-user", "nobody"], []], ids=["explicit", "default-as-root"])
def test_task_user_that_cannot_reach_the_data_dir_is_refused(tmp_path, flags):
    if not flags and os.geteuid() != 0:
        pytest.skip("the default task user is nobody only for a root agent")
    parent = tmp_path / "closed"
    parent.mkdir(mode=0o700)
    cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(parent / "d"),
           "--listen", f"127.0.0.1:{free_port()}", *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"lepton-agent: --task-user nobody: nobody cannot pass through {parent} (mode 0700) "
        "to the data dir: chmod o+x it, move the data dir, or run tasks as the agent's user with --task-user none"]


@pytest.mark.skipif(os.geteuid() != 0, reason="the default task user is nobody only for a root agent")
def test_a_root_agent_runs_tasks_as_nobody_by_default(agents, tmp_path):
    voter = agents("voter")
    log = voter.log_path.read_text()
    assert '"task_user": "nobody"' in log  # the effective config, resolved at start
    assert "tasks run as root" not in log
    with Client(voter.address) as c:
        task = c.submit(["/bin/sh", "-c", f"id -u > {tmp_path}/uid; cat {voter.data_dir}/node_id"], cpu=0.1)
        done = c.wait(task.id, timeout=60)
    assert (tmp_path / "uid").read_text().strip() == "65534"
    assert (done.state, done.exit_code) == ("failed", 1)  # the node's files are not nobody's to read


@pytest.mark.skipif(os.geteuid() != 0, reason="the opt-out matters for a root agent")
def test_opting_out_as_root_is_warned_and_tasks_run_as_root(agents):
    voter = agents("voter", "--task-user", "none")
    assert "tasks run as root (--task-user none): they can read this node's keys" in voter.log_path.read_text()
    with Client(voter.address) as c:
        task = c.submit(["/bin/sh", "-c", "id -u"], cpu=0.1)
        assert c.wait(task.id, timeout=60).state == "succeeded"
        assert b"".join(c.logs(task.id)).decode().strip() == "0"


def test_unknown_task_user_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(tmp_path / "d"),
           "--listen", f"127.0.0.1:{free_port()}", "--task-user", "no-such-user-here"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["lepton-agent: --task-user no-such-user-here: no such user on this machine"]

