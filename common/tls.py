"""The cluster's own certificate authority, and TLS credentials for gRPC and raw sockets.

Layout of a TLS directory (`--tls-dir`, e.g. `<data_dir>/tls`):

    ca.crt          the cluster CA certificate (public; every node and user holds it)
    ca.key          the CA private key, 0600 (only where certificates are issued)
    <name>.crt      a certificate issued by the CA
    <name>.key      its private key, 0600

Identity is carried in the certificate subject:

    CN = <name>                    the node name or the user name
    O  = lepton
    OU = node                      an agent (server and client: EKU serverAuth+clientAuth)
    OU = user:<role>               a person or tool, role admin|user|viewer (EKU clientAuth)
    OU = task                      what tasks connect with (`task.crt`, EKU clientAuth): it
                                   carries NO identity, so every call needs a token too (the
                                   task's own credential); see `ensure_task_cert`

gRPC's Python servers either require a client certificate or ask for none (there is no
"verify if presented"), so a task, which must not hold its node's key, needs a certificate
of its own to connect at all; the shared task certificate is that, and no more.

A user certificate cannot serve (no serverAuth), so it cannot impersonate a node to another
node. Keys are ECDSA P-256, signatures SHA-256. Only holders of `ca.key` can mint identities:
keep it on the machine(s) that issue certificates, not on every worker (see
docs/operations.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from lepton.common.durable import write_atomic
from lepton.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from lepton.common.lazy import deferred

# cryptography loads on first use (~9 MB of RSS): an agent without TLS never needs it.
x509 = deferred("cryptography.x509")
hashes = deferred("cryptography.hazmat.primitives.hashes")
serialization = deferred("cryptography.hazmat.primitives.serialization")
ec = deferred("cryptography.hazmat.primitives.asymmetric.ec")
ExtendedKeyUsageOID = deferred("cryptography.x509.oid", "ExtendedKeyUsageOID")
NameOID = deferred("cryptography.x509.oid", "NameOID")

logger = logging.getLogger(__name__)

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
ORGANIZATION = "lepton"
KINDS = ("node", "user", "task")
TASK_CERT = "task"  # the task certificate's file name and CN
USER_ROLES = ("admin", "user", "viewer")
CA_DAYS = 3650
CERT_DAYS = 365
# ensure_node_cert renews a certificate that expires sooner than this.
RENEW_BEFORE = dt.timedelta(days=30)
# Always in a node certificate, so local tools and health probes on the host can dial it.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

# File-name safe (no "/", no leading "."), and fits a CN (64 characters).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end of a mutually authenticated connection.

    `kind` is "node" or "user"; `role` is "node" for nodes, else the user's role.
    """

    name: str
    kind: str
    role: str


@dataclass(frozen=True, slots=True)
class CertPaths:
    cert: Path
    key: Path
    ca: Path


# -- issuing ---------------------------------------------------------------------------------
def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def check_name(name: str) -> str:
    """Raises InvalidArgument unless `name` is a safe certificate/file name."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in ("ca",):
        raise InvalidArgument(f"certificate name {str(name)[:70]!r} must be 1-64 of [A-Za-z0-9._@-], not 'ca'")
    return name


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signatures only; a CA also signs certificates and revocation lists."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca,
        crl_sign=ca, encipher_only=False, decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def init_ca(directory: str | os.PathLike[str], *, common_name: str = "lepton cluster CA",
            days: int = CA_DAYS) -> Path:
    """Create the cluster CA (`ca.key` 0600, `ca.crt`) in `directory` (made 0700 if absent).

    Returns the certificate's path. Raises AlreadyExists if either file is already there:
    replacing a CA would orphan every certificate it issued.
    """
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, cert_path = d / CA_KEY, d / CA_CERT
    if key_path.exists() or cert_path.exists():
        raise AlreadyExists(f"a CA already exists in {d}; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:  # exclusive: a CA made meanwhile is never replaced
        write_atomic(key_path, _key_pem(key), exclusive=True)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644, exclusive=True)
    except FileExistsError:
        raise AlreadyExists(f"a CA already exists in {d}; refusing to overwrite it") from None
    logger.info("created cluster CA in %s", d)
    return cert_path


def _load_ca(d: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as err:
        raise FailedPrecondition(f"no CA in {d} ({Path(err.filename).name} missing); run init_ca first") from None
    except ValueError as err:
        raise InvalidArgument(f"the CA in {d} does not load: {err}") from None
    return ca_cert, ca_key  # type: ignore[return-value]


def _sans(hosts: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hosts:
        host = raw.strip().strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _DNS_RE.match(host):
                raise InvalidArgument(f"host {host[:70]!r} is neither an IP address nor a DNS name") from None
            out.append(x509.DNSName(host.lower()))
    return out


def issue(
    directory: str | os.PathLike[str],
    name: str,
    *,
    kind: str = "node",
    hosts: Sequence[str] = (),
    role: str = "user",
    days: int = CERT_DAYS,
    overwrite: bool = False,
) -> CertPaths:
    """Issue `<name>.crt`/`<name>.key` signed by the CA in `directory`.

    `kind="node"`: SANs are `hosts` plus localhost/127.0.0.1/::1, EKU server+client auth.
    `kind="user"`: `role` (admin|user|viewer) goes into OU as `user:<role>`, EKU client auth;
    `hosts` is ignored. Raises InvalidArgument (bad name/kind/role/host), FailedPrecondition
    (no CA), AlreadyExists (files exist and not `overwrite`).
    """
    d = Path(directory)
    check_name(name)
    if kind not in KINDS:
        raise InvalidArgument(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "user" and role not in USER_ROLES:
        raise InvalidArgument(f"role {role!r} is not one of {', '.join(USER_ROLES)}")
    if not 1 <= days <= CA_DAYS:
        raise InvalidArgument(f"days must be between 1 and {CA_DAYS}")
    ca_cert, ca_key = _load_ca(d)
    cert_path, key_path = d / f"{name}.crt", d / f"{name}.key"
    if not overwrite and (cert_path.exists() or key_path.exists()):
        raise AlreadyExists(f"{cert_path} already exists")
    key = ec.generate_private_key(ec.SECP256R1())
    ou = f"user:{role}" if kind == "user" else kind
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    eku = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "node":
        eku.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if kind == "node":
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_sans([*hosts, *LOCAL_HOSTS])), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    try:  # the key 0600 from its first byte; `overwrite` replaces each file whole
        write_atomic(key_path, _key_pem(key), exclusive=not overwrite)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644,
                     exclusive=not overwrite)
    except FileExistsError:
        raise AlreadyExists(f"{cert_path} already exists") from None
    logger.info("issued %s certificate %s (%s), valid until %s", kind, name, ou, not_after.date())
    return CertPaths(cert_path, key_path, d / CA_CERT)


def _problem(d: Path, name: str, hosts: Sequence[str]) -> str:
    """Why the node certificate `name` in `d` is unusable; "" when it is fine."""
    cert_path, key_path = d / f"{name}.crt", d / f"{name}.key"
    if not cert_path.exists() or not key_path.exists():
        return "no certificate"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
    except (ValueError, OSError) as err:
        return f"unreadable ({err})"
    try:
        cert.verify_directly_issued_by(ca_cert)
    except Exception:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError (key type)
        return "not issued by this CA"
    if not _same_key(key, cert):
        return "key does not match certificate"
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return f"expires {cert.not_valid_after_utc.date()}"
    identity = identity_from_cert(cert)
    if identity is None or identity.kind != "node" or identity.name != name:
        return "not a node certificate for this name"
    have = {str(v) for v in _cert_sans(cert)}
    missing = [h for h in (str(s.value) for s in _sans(hosts)) if h not in have]
    if missing:
        return f"does not cover {', '.join(missing)}"
    return ""


def ensure_node_cert(directory: str | os.PathLike[str], name: str, hosts: Sequence[str]) -> CertPaths:
    """Make sure a usable node certificate `<name>.crt` exists in `directory`; return its paths.

    A missing, foreign, mismatched, soon-expiring certificate, or one that does not cover
    `hosts`, is (re)issued from the CA, and that is logged. Raises FailedPrecondition when
    no CA certificate is present, or a certificate is needed and there is no CA key here
    (the operator must issue one elsewhere and copy it in).
    """
    d = Path(directory)
    check_name(name)
    if not (d / CA_CERT).exists():
        raise FailedPrecondition(f"no {CA_CERT} in {d}: copy the cluster CA certificate there first")
    problem = _problem(d, name, hosts)
    if not problem:
        return CertPaths(d / f"{name}.crt", d / f"{name}.key", d / CA_CERT)
    if not (d / CA_KEY).exists():
        raise FailedPrecondition(
            f"node certificate {d / (name + '.crt')}: {problem}, and no CA key in {d} to issue one; "
            f"issue it where the CA key is (lepton-ctl certs issue {name} --host ...) and copy it here"
        )
    logger.warning("node certificate %s: %s; issuing a new one from the CA", name, problem)
    return issue(d, name, kind="node", hosts=hosts, overwrite=True)


def _same_key(key: Any, cert: x509.Certificate) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def task_cert_usable(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` holds a task certificate of its CA (OU=task, not expiring within
    RENEW_BEFORE) with the key that matches it."""
    d = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((d / f"{TASK_CERT}.crt").read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate((d / CA_CERT).read_bytes()))
        key = serialization.load_pem_private_key((d / f"{TASK_CERT}.key").read_bytes(), password=None)
    except Exception:  # noqa: BLE001 - missing, unreadable, foreign, another key type
        return False
    ous = [str(o.value) for o in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    return ous == ["task"] and cert.not_valid_after_utc - _now() >= RENEW_BEFORE and _same_key(key, cert)


def ensure_task_cert(directory: str | os.PathLike[str]) -> CertPaths | None:
    """The task certificate (`task.crt`/`task.key`, OU=task) in `directory`, issued from the
    CA when missing or unusable and the CA key is here; None when it cannot be had (the
    caller says what tasks lose). Never raises for a missing file; OSError when it cannot
    write one."""
    d = Path(directory)
    if task_cert_usable(d):
        return CertPaths(d / f"{TASK_CERT}.crt", d / f"{TASK_CERT}.key", d / CA_CERT)
    if not (d / CA_KEY).exists() or not (d / CA_CERT).exists():
        return None
    return issue(d, TASK_CERT, kind="task", overwrite=True)


# -- reading identities ------------------------------------------------------------------
def _cert_sans(cert: x509.Certificate) -> list[Any]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName), *ext.get_values_for_type(x509.IPAddress)]


def identity_from_cert(cert: x509.Certificate) -> PeerIdentity | None:
    """The Lepton identity a certificate carries, or None if it carries none (or a bad one)."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        return None  # ambiguous subjects are not guessed at
    name, ou = str(cns[0].value), str(ous[0].value)
    if not _NAME_RE.match(name):
        return None
    if ou == "node":
        return PeerIdentity(name, "node", "node")
    kind, _, role = ou.partition(":")
    if kind == "user" and role in USER_ROLES:
        return PeerIdentity(name, "user", role)
    return None


def identity_from_pem(pem: bytes) -> PeerIdentity | None:
    try:
        return identity_from_cert(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None


def peer_identity(context: Any) -> PeerIdentity | None:
    """The verified peer of a grpc(.aio) servicer context, or None (plaintext, no cert).

    Only meaningful on a server with `require_client_auth=True`: there gRPC has verified the
    chain against the cluster CA before the call reaches us, so the subject can be trusted.
    """
    try:
        auth = context.auth_context() or {}
    except Exception:  # noqa: BLE001 - a context without TLS support
        return None
    if b"ssl" not in auth.get("transport_security_type", []):
        return None
    pems = auth.get("x509_pem_cert") or []
    return identity_from_pem(pems[0]) if pems else None


# -- credentials -------------------------------------------------------------------------
def _read(d: Path, name: str) -> tuple[bytes, bytes, bytes]:
    try:
        return (d / f"{name}.key").read_bytes(), (d / f"{name}.crt").read_bytes(), (d / CA_CERT).read_bytes()
    except FileNotFoundError as err:
        raise FailedPrecondition(f"TLS file {err.filename} is missing") from None


def server_credentials(directory: str | os.PathLike[str], name: str, *,
                       require_client_auth: bool = True) -> grpc.ServerCredentials:
    """mTLS server credentials from `<name>.key/.crt` and `ca.crt`: clients must present a
    certificate from the cluster CA. Raises FailedPrecondition if a file is missing."""
    key, cert, ca = _read(Path(directory), check_name(name))
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=require_client_auth)


def channel_credentials(directory: str | os.PathLike[str], name: str | None = None) -> grpc.ChannelCredentials:
    """Client credentials trusting only the cluster CA, presenting `<name>`'s certificate
    (when `name` is given). Raises FailedPrecondition if a file is missing."""
    d = Path(directory)
    if name is None:
        try:
            return grpc.ssl_channel_credentials(root_certificates=(d / CA_CERT).read_bytes())
        except FileNotFoundError:
            raise FailedPrecondition(f"TLS file {d / CA_CERT} is missing") from None
    key, cert, ca = _read(d, check_name(name))
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def server_ssl_context(directory: str | os.PathLike[str], name: str) -> ssl.SSLContext:
    """For the raw-socket shard side channel: TLS 1.2+, client certificate from the CA
    required. Check `identity_from_ssl(sock)` after the handshake to see who it is."""
    d = Path(directory)
    check_name(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(d / f"{name}.crt", d / f"{name}.key")
    ctx.load_verify_locations(cafile=str(d / CA_CERT))
    return ctx


def client_ssl_context(directory: str | os.PathLike[str], name: str) -> ssl.SSLContext:
    """The puller's end: verifies the server's certificate and host name against the CA and
    presents `<name>`'s certificate. Pass `server_hostname=` to `wrap_socket`."""
    d = Path(directory)
    check_name(name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(d / CA_CERT))
    ctx.load_cert_chain(d / f"{name}.crt", d / f"{name}.key")
    return ctx


def identity_from_ssl(sock: ssl.SSLSocket) -> PeerIdentity | None:
    """The verified peer of a TLS socket made with one of the contexts above."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        return identity_from_cert(x509.load_der_x509_certificate(der))
    except ValueError:
        return None
