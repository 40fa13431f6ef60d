"""One place where gRPC channels are made, plaintext or mutual TLS.

Every channel in the agent, the coordinator and the client comes from `make_channel`. With
`tls=None` it is exactly the plaintext channel of before; with a `TlsConfig` it trusts only
the cluster CA and presents the certificate `<dir>/<name>.crt` (see `lepton.common.tls`).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from lepton.common import tls as _tls
from lepton.common.errors import FailedPrecondition
from lepton.common.grpc_util import CHANNEL_OPTIONS

logger = logging.getLogger(__name__)

# What an agent puts in every task's environment, and what the client reads from it.
TLS_DIR_ENV = "LEPTON_TLS_DIR"
CERT_NAME_ENV = "LEPTON_CERT_NAME"
# The certificate lepton-ctl picks when none is named and this one exists.
DEFAULT_USER_CERT = "admin"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """A TLS folder (`ca.crt`, `<name>.crt`, `<name>.key`) and whose certificate to present."""

    dir: str
    name: str

    def __post_init__(self) -> None:
        _tls.check_name(self.name)
        # Absolute, so a task started in another working directory still finds it.
        object.__setattr__(self, "dir", os.path.abspath(self.dir))

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return _tls.channel_credentials(self.dir, self.name)

    def server_credentials(self) -> grpc.ServerCredentials:
        return _tls.server_credentials(self.dir, self.name, require_client_auth=True)

    def server_ssl_context(self) -> ssl.SSLContext:
        return _tls.server_ssl_context(self.dir, self.name)

    def client_ssl_context(self) -> ssl.SSLContext:
        return _tls.client_ssl_context(self.dir, self.name)

    def env(self) -> dict[str, str]:
        """The variables that let a child process (a task) connect as this identity."""
        return {TLS_DIR_ENV: self.dir, CERT_NAME_ENV: self.name}

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        """From LEPTON_TLS_DIR and LEPTON_CERT_NAME (default: picked as for lepton-ctl);
        None when LEPTON_TLS_DIR is unset."""
        env = os.environ if env is None else env
        directory = env.get(TLS_DIR_ENV, "")
        if not directory:
            return None
        return client_tls(directory, env.get(CERT_NAME_ENV) or None)


def make_channel(
    address: str,
    *,
    tls: TlsConfig | None = None,
    aio: bool = True,
    token: str | None = None,
) -> Any:
    """A `grpc.aio.Channel` (or a sync `grpc.Channel` with `aio=False`) to `address`, with
    grpc_util.CHANNEL_OPTIONS: every client of the cluster (agents, voters, lepton-ctl and
    the client library, tasks) dials with the same limits, reconnect backoff and keepalive.

    `token`: a bearer token sent on every call (`None`: the process default of
    `lepton.common.bearer`, set by an agent without TLS; "": none).
    Raises FailedPrecondition when a TLS file is missing.
    """
    from lepton.common import bearer

    options = list(CHANNEL_OPTIONS)
    if not aio:
        if tls is None:
            return bearer.wrap_sync(grpc.insecure_channel(address, options=options), token)
        return bearer.wrap_sync(grpc.secure_channel(address, tls.channel_credentials(), options=options), token)
    kw = {"interceptors": icpt} if (icpt := bearer.aio_interceptors(token)) else {}
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, **kw)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options, **kw)


def _user_certs(d: Path) -> list[str]:
    names = []
    for crt in sorted(d.glob("*.crt")):
        if crt.stem == "ca" or not (d / f"{crt.stem}.key").exists():
            continue
        try:
            identity = _tls.identity_from_pem(crt.read_bytes())
        except OSError:
            continue
        if identity is not None and identity.kind == "user":
            names.append(crt.stem)
    return names


def client_tls(directory: str | os.PathLike[str], name: str | None = None) -> TlsConfig:
    """The client identity to use from `directory`: `name`, else `admin` when there is an
    admin certificate, else the only user certificate there.

    Raises FailedPrecondition (no such folder, certificate or CA; several to choose from)
    and InvalidArgument (a bad name), each in one line.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FailedPrecondition(f"TLS folder {d} does not exist")
    if not (d / _tls.CA_CERT).exists():
        raise FailedPrecondition(f"no {_tls.CA_CERT} in {d}: copy the cluster CA certificate there")
    if name:
        _tls.check_name(name)
        if not (d / f"{name}.crt").exists() or not (d / f"{name}.key").exists():
            raise FailedPrecondition(f"no certificate {name} in {d} ({name}.crt and {name}.key)")
        return TlsConfig(str(d), name)
    if (d / f"{DEFAULT_USER_CERT}.crt").exists() and (d / f"{DEFAULT_USER_CERT}.key").exists():
        return TlsConfig(str(d), DEFAULT_USER_CERT)
    users = _user_certs(d)
    if len(users) == 1:
        return TlsConfig(str(d), users[0])
    if not users:
        raise FailedPrecondition(
            f"no user certificate in {d}; issue one (lepton-ctl certs issue NAME --kind user --dir D)"
        )
    raise FailedPrecondition(f"several user certificates in {d} ({', '.join(users)}); pick one with --cert-name")


def node_tls(tls_dir: str, node_id: str, hosts: Sequence[str]) -> TlsConfig:
    """An agent's identity: its node certificate in `tls_dir`, issued from the CA there
    when missing or unusable (logged). Raises FailedPrecondition saying what to copy in."""
    paths = _tls.ensure_node_cert(tls_dir, node_id, [h for h in hosts if h])
    logger.info("TLS on: node certificate %s, CA %s", paths.cert, paths.ca)
    return TlsConfig(tls_dir, node_id)


def is_loopback(host: str) -> bool:
    """Whether `host` (bare, as validation.split_host_port gives it) only accepts
    connections from this machine."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard may resolve to anything: assume exposed


__all__ = [
    "CERT_NAME_ENV",
    "TLS_DIR_ENV",
    "TlsConfig",
    "client_tls",
    "is_loopback",
    "make_channel",
    "node_tls",
]
