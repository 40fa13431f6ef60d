"""lepton-agent's --state / --etcd-* flags: what they become, and one stderr line for each bad combination."""

from __future__ import annotations

import pytest

from lepton.agent.main import main
from lepton.common.config import load_config
from lepton.common.errors import InvalidArgument


@pytest.fixture
def pem(tmp_path):
    """A self-signed certificate (as the CA and the client certificate) and its key, plus a
    file that is neither (`junk`): flags are checked to name PEM files of their kind."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "etcd-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    contents = {
        "ca": cert.public_bytes(serialization.Encoding.PEM),
        "cert": cert.public_bytes(serialization.Encoding.PEM),
        "key": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()),
        "junk": b"x",
    }
    paths = {}
    for name, data in contents.items():
        path = tmp_path / f"{name}.pem"
        path.write_bytes(data)
        paths[name] = str(path)
    return paths


def test_raft_is_the_default_and_changes_nothing():
    config = load_config({}, env={})
    assert config.state == "raft" and not config.uses_etcd and config.etcd_endpoints == []
    assert config.dev_mode  # a bare agent is still a one-voter cluster of its own


def test_etcd_endpoints_prefix_and_candidates():
    config = load_config({"state": "etcd:// 127.0.0.1:2379 ,[::1]:2380/", "cluster_name": "prod"}, env={})
    assert config.state == "etcd://127.0.0.1:2379,[::1]:2380"
    assert config.etcd_endpoints == ["127.0.0.1:2379", "[::1]:2380"]
    assert config.etcd_prefix == "/lepton/prod"
    assert config.etcd_lease_ttl == 2.0
    assert config.uses_etcd and not config.dev_mode  # a candidate, not a one-voter cluster
    joined = load_config({"state": "etcd://127.0.0.1:2379", "join": "127.0.0.1:7070", "etcd_prefix": "/a/b/"}, env={})
    assert joined.etcd_prefix == "/a/b"


def test_env_and_file_set_the_state_too(tmp_path):
    assert load_config({}, env={"LEPTON_STATE": "etcd://127.0.0.1:2379"}).etcd_endpoints == ["127.0.0.1:2379"]
    toml = tmp_path / "agent.toml"
    toml.write_text('state = "etcd://127.0.0.1:2379"\netcd-lease-ttl = 5\n')
    config = load_config({"config": str(toml)}, env={})
    assert config.uses_etcd and config.etcd_lease_ttl == 5


def test_tls_files_are_made_absolute(pem, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config({"state": "etcd://127.0.0.1:2379", "etcd_ca": "ca.pem", "etcd_cert": "cert.pem",
                          "etcd_key": "key.pem"}, env={})
    assert config.etcd_ca == pem["ca"] and config.etcd_cert == pem["cert"] and config.etcd_key == pem["key"]


BAD = [
    (["--state", "zookeeper://h:1"], "neither raft nor etcd://"),
    (["--state", "etcd://"], "lists no etcd endpoint"),
    (["--state", "etcd://,,"], "lists no etcd endpoint"),
    (["--state", "etcd://localhost"], "is not HOST:PORT"),
    (["--state", "etcd://h:2379,h:2379"], "lists an etcd endpoint twice"),
    (["--state", "etcd://h:2379", "--peers", "127.0.0.1:7070"], "cannot be mixed with --peers or --join-as-voter"),
    (["--state", "etcd://h:2379", "--join", "127.0.0.1:7070", "--join-as-voter"], "cannot be mixed"),
    (["--state", "etcd://h:2379", "--etcd-key", "{key}"], "--etcd-cert and --etcd-key go together"),
    (["--state", "etcd://h:2379", "--etcd-cert", "{cert}", "--etcd-key", "{key}"], "--etcd-cert needs --etcd-ca"),
    (["--state", "etcd://h:2379", "--etcd-ca", "/nonexistent/ca.pem"], "not a readable file"),
    (["--state", "etcd://h:2379", "--etcd-ca", "{junk}"], "not PEM certificates"),
    (["--state", "etcd://h:2379", "--etcd-ca", "{key}"], "not PEM certificates"),
    (["--state", "etcd://h:2379", "--etcd-ca", "{ca}", "--etcd-cert", "{cert}", "--etcd-key", "{cert}"],
     "not an unencrypted PEM private key"),
    (["--etcd-ca", "{ca}"], "need --state etcd://"),
    (["--etcd-prefix", "/x"], "need --state etcd://"),
    (["--state", "etcd://h:2379", "--etcd-prefix", "lepton"], "must start with '/'"),
    (["--state", "etcd://h:2379", "--etcd-lease-ttl", "0.5"], "whole seconds"),
    (["--state", "etcd://h:2379", "--etcd-lease-ttl", "2.5"], "whole seconds"),
    (["--cluster-name", "a/b"], "cluster_name"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_fail_with_one_line(argv, needle, pem, tmp_path, capsys):
    argv = [arg.format(**pem) for arg in argv]
    rc = main(["--data-dir", str(tmp_path / "data"), *argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("lepton-agent: "), err
    assert needle in err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_config_errors_are_invalid_argument():
    with pytest.raises(InvalidArgument, match="cannot be mixed"):
        load_config({"state": "etcd://127.0.0.1:2379", "peers": "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"}, env={})


def test_a_data_dir_keeps_its_backend(tmp_path):
    """A Raft voter's data dir refuses --state etcd; an etcd candidate's refuses a Raft start."""
    from lepton.common.errors import FailedPrecondition
    from lepton.coordinator.coordinator import STATE_BACKEND_FILE, check_state_backend
    from lepton.coordinator.storage.log_store import FileLogStore

    raft_dir, etcd_dir = tmp_path / "raft-voter", tmp_path / "etcd-candidate"
    store = FileLogStore(raft_dir / "raft")
    store.set_hard_state(3, "")
    store.close()
    etcd = {"state": "etcd://127.0.0.1:2379", "task_user": "none"}
    with pytest.raises(FailedPrecondition, match="holds a built-in Raft log"):
        check_state_backend(load_config({**etcd, "data_dir": str(raft_dir)}, env={}))
    check_state_backend(load_config({"data_dir": str(raft_dir), "task_user": "none"}, env={}))  # still a voter

    etcd_dir.mkdir()
    check_state_backend(load_config({**etcd, "data_dir": str(etcd_dir)}, env={}))
    assert (etcd_dir / STATE_BACKEND_FILE).exists()
    check_state_backend(load_config({**etcd, "data_dir": str(etcd_dir)}, env={}))  # again: fine
    with pytest.raises(FailedPrecondition, match="belongs to an etcd candidate.*--state etcd://127.0.0.1:2379"):
        check_state_backend(load_config({"data_dir": str(etcd_dir), "task_user": "none"}, env={}))
