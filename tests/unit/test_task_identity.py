"""What a task gets instead of its node's identity (agent/task_identity.py) and the task
certificate it connects with (common/tls.py: OU=task, no identity)."""

from __future__ import annotations

import shutil

from lepton.agent.task_identity import TASK_TLS_DIR, prepare_task_tls, task_env
from lepton.common import tls
from lepton.common.channels import TlsConfig


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
