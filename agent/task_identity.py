"""What a task gets to reach the cluster, instead of its node's identity.

- `LEPTON_TOKEN`: the attempt's own credential (minted by the leader, sent with the
  assignment; `lepton.coordinator.state.task_tokens`). It acts as the task's submitter with
  the submitter's role, and stops working when the attempt ends. `lepton-ctl` and
  `lepton.client.Client()` send it on every call.
- With TLS: `LEPTON_TLS_DIR` names `<data-dir>/task-tls`, a folder holding only the CA
  certificate and the cluster's task certificate (OU=task: no identity at all, see
  `lepton.common.tls.ensure_task_cert`), with `LEPTON_CERT_NAME=task`; `LEPTON_TLS_CA` is
  the CA certificate alone, for tools that only verify the server. Never the node's folder,
  certificate or key.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from lepton.common import tls as _tls
from lepton.common.channels import CERT_NAME_ENV, TLS_DIR_ENV, TlsConfig

logger = logging.getLogger(__name__)

TASK_TLS_DIR = "task-tls"
TOKEN_ENV = "LEPTON_TOKEN"
TLS_CA_ENV = "LEPTON_TLS_CA"


def prepare_task_tls(tls: TlsConfig, data_dir: Path, *, owner: tuple[int, int] | None = None) -> Path:
    """Fill `<data_dir>/task-tls` with the CA certificate and the task certificate (issued
    when the CA key is here), 0600 in a 0700 folder owned by `owner` (the task user's
    uid/gid; None: the agent's user, whom tasks run as). Logs what tasks lose when there is
    no task certificate. Raises OSError."""
    out = Path(data_dir) / TASK_TLS_DIR
    out.mkdir(exist_ok=True)
    # Agents sharing a TLS folder with the CA key may issue at once: copy until a matching pair.
    for _ in range(5):
        paths = _task_cert(tls)
        names = [_tls.CA_CERT] + ([paths.cert.name, paths.key.name] if paths is not None else [])
        for name in os.listdir(out):
            if name not in names:
                (out / name).unlink()
        for name in names:
            tmp = out / f".{name}.tmp"
            shutil.copyfile(Path(tls.dir) / name, tmp)
            if owner is not None:
                os.chown(tmp, *owner)
            os.chmod(tmp, 0o600)
            os.replace(tmp, out / name)
        if paths is None or _tls.task_cert_usable(out):
            break
        time.sleep(0.1)
    if owner is not None:
        os.chown(out, *owner)
    os.chmod(out, 0o700)
    return out


def _task_cert(tls: TlsConfig) -> _tls.CertPaths | None:
    try:
        paths = _tls.ensure_task_cert(tls.dir)
    except OSError as err:  # a read-only TLS folder: tasks lose the cluster, not the agent
        logger.warning("cannot issue the task certificate in %s: %s", tls.dir, err)
        return None
    if paths is None:
        logger.warning("no task certificate in %s and no CA key to issue one: tasks cannot reach the "
                       "cluster over TLS. Issue one (lepton-ctl certs issue task --kind task --dir D) "
                       "and copy task.crt and task.key there", tls.dir)
    return paths


def task_env(data_dir: str, *, tls_on: bool, token: str) -> dict[str, str]:
    """The variables that let a task reach the cluster as its submitter (see the module doc)."""
    env: dict[str, str] = {}
    if token:
        env[TOKEN_ENV] = token
    if tls_on:
        folder = Path(os.path.abspath(data_dir)) / TASK_TLS_DIR
        env[TLS_CA_ENV] = str(folder / _tls.CA_CERT)
        env[TLS_DIR_ENV] = str(folder)
        if (folder / f"{_tls.TASK_CERT}.crt").exists():
            env[CERT_NAME_ENV] = _tls.TASK_CERT
    return env
