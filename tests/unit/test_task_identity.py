"""What a task gets instead of its node's identity (agent/task_identity.py) and the task
certificate it connects with (common/tls.py: OU=task, no identity)."""

from __future__ import annotations

import json
import os
import pwd
import shutil

import pytest

from lepton.agent.assignments import run_spec
from lepton.agent.task_identity import TASK_TLS_DIR, prepare_task_tls, task_env
from lepton.agent.tasks.attempt_env import make_job_dir
from lepton.agent.tasks.task_user import TaskUser
from lepton.common import tls
from lepton.common.channels import TlsConfig
from lepton.v1 import tasks_pb2


def ca_dir(tmp_path):
    d = tmp_path / "tls"
    tls.init_ca(d)
    tls.issue(d, "node1", kind="node")
    return d


def test_the_task_certificate_names_nobody_and_is_reissued_when_unusable(tmp_path):
    d = ca_dir(tmp_path)
    paths = tls.ensure_task_cert(d)
    assert paths is not None and tls.task_cert_usable(d)
    assert tls.identity_from_pem(paths.cert.read_bytes()) is None  # no name, no role
    first = paths.cert.read_bytes()
    assert tls.ensure_task_cert(d).cert.read_bytes() == first  # usable: kept
    tls.issue(d, "other", kind="user")
    shutil.copy(d / "other.key", d / "task.key")  # a key that does not match
    assert not tls.task_cert_usable(d)
    assert tls.ensure_task_cert(d).cert.read_bytes() != first and tls.task_cert_usable(d)
    (d / "ca.key").unlink()
    (d / "task.crt").unlink()
    assert tls.ensure_task_cert(d) is None  # cannot be issued here: the caller warns


def test_tasks_get_the_ca_and_the_task_certificate_never_the_nodes(tmp_path):
    d = ca_dir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / TASK_TLS_DIR).mkdir()
    (data / TASK_TLS_DIR / "node1.key").write_text("stale")  # from some older layout
    out = prepare_task_tls(TlsConfig(str(d), "node1"), data)
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "task.crt", "task.key"]
    assert tls.task_cert_usable(out)
    assert all(p.stat().st_mode & 0o077 == 0 for p in out.iterdir())
    env = task_env(str(data), tls_on=True, token="lept_x.y")
    assert env == {"LEPTON_TOKEN": "lept_x.y", "LEPTON_TLS_CA": str(out / "ca.crt"),
                   "LEPTON_TLS_DIR": str(out), "LEPTON_CERT_NAME": "task"}
    assert task_env(str(data), tls_on=False, token="") == {}


def _torch_assignment(job_id: str):
    spec = tasks_pb2.TaskSpec(argv=["python", "train.py"], job_id=job_id, gang_size=2,
                              torch=tasks_pb2.TorchSpec(nproc_per_node=1, dataset="d"))
    return tasks_pb2.Assignment(task_id=f"t-{job_id}-0", attempt=1, term=1, spec=spec)


def test_a_torch_member_reads_the_node_store_only_when_tasks_run_as_the_agent(tmp_path):
    a = _torch_assignment("j-abc")
    shared = run_spec(a, data_dir=str(tmp_path), shard_key_file="/keys/shard.key")
    assert shared.job_dir == str(tmp_path / "jobs" / "j-abc")
    launch = json.loads(shared.argv[-1])
    assert (launch["job_dir"], launch["node_store"], launch["shard_key_file"]) == (shared.job_dir, True, "/keys/shard.key")
    own = json.loads(run_spec(a, data_dir=str(tmp_path), shard_key_file="/keys/shard.key", node_store=False).argv[-1])
    assert (own["node_store"], own["shard_key_file"]) == (False, "")  # not even the key's path
    assert run_spec(_torch_assignment("../x"), data_dir=str(tmp_path)).job_dir == ""  # never outside jobs/


def test_the_job_folder_is_made_for_the_task_user(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    nobody = pwd.getpwnam("nobody")
    user = TaskUser("nobody", nobody.pw_uid, nobody.pw_gid, nobody.pw_dir, "/usr/bin/setpriv")
    job = tmp_path / "jobs" / "j-1"
    make_job_dir(job, None)  # an earlier attempt, as the agent's user, left a rank log
    (job / "restart-0").mkdir()
    (job / "restart-0" / "rank_0.log").write_text("x")
    make_job_dir(job, user)
    assert (job.parent.stat().st_mode & 0o777, job.stat().st_mode & 0o777) == (0o711, 0o700)
    owners = {p.stat().st_uid for p in (job, job / "restart-0", job / "restart-0" / "rank_0.log")}
    assert owners == {nobody.pw_uid}


def test_a_torch_members_workers_start_in_its_resolved_workdir(tmp_path):
    # The runner resolves a relative workdir once and starts the member there; the launch
    # carries no cwd of its own, which the workers would apply again (work/sub/sub).
    a = _torch_assignment("j-abc")
    a.spec.workdir = "sub"
    spec = run_spec(a, data_dir=str(tmp_path))
    assert spec.workdir == "sub"
    assert "cwd" not in json.loads(spec.argv[-1])
