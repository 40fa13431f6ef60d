"""Client contexts: the config file, resolution order (flag > env > context), the `config`
commands, and Client() with no arguments. (tests/conftest.py gives each test its own file.)"""

from __future__ import annotations

import io
import os
import stat

import pytest

from lepton.client import Client, cli
from lepton.client.contexts import (
    ClientConfig,
    Context,
    config_path,
    load_config,
    resolve_connection,
    save_config,
    switch_from_local,
    switch_to_local,
)
from lepton.client.testing import FakeCoordinator, make_node, serve
from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LEPTON_SERVER", "LEPTON_TLS_DIR", "LEPTON_CERT_NAME", "LEPTON_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _save(*contexts: Context, current: str = "") -> None:
    save_config(ClientConfig({c.name: c for c in contexts}, current_context=current))


def test_round_trip_and_mode() -> None:
    odd = Context("we.ird_name-1", servers="a:1,b:2", tls_dir="/t\\ls", cert_name="x", token="s3cr\"t")
    _save(odd, Context("b", "c:3"), current="b")
    path = config_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tokens inside
    config = load_config()
    assert config.contexts == {odd.name: odd, "b": Context("b", "c:3")}
    assert config.current_context == "b"


def test_unknown_keys_and_bad_files_are_refused_with_the_key() -> None:
    path = config_path()
    path.write_text('current_context = "a"\n[contexts.a]\nservers = "a:1"\nsever = "x"\n')
    with pytest.raises(FailedPrecondition, match="unknown key 'sever'"):
        load_config()
    path.write_text("current_context = \n")
    with pytest.raises(FailedPrecondition, match="cannot read the client config"):
        load_config()
    path.unlink()
    assert load_config().contexts == {}  # no file: no contexts


def test_resolution_order_flag_then_env_then_context(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_connection().servers == "127.0.0.1:7070"
    _save(Context("prod", "p:1", tls_dir="/prod-tls", token="prod-token"), current="prod")
    conn = resolve_connection()
    assert (conn.servers, conn.tls_dir, conn.token, conn.source) == (
        "p:1", "/prod-tls", "prod-token", "context 'prod'")
    monkeypatch.setenv("LEPTON_SERVER", "e:1")
    conn = resolve_connection()
    # The context's credentials never go to servers other than its own.
    assert (conn.servers, conn.tls_dir, conn.token, conn.source) == ("e:1", "", "", "$LEPTON_SERVER")
    assert resolve_connection("f:1").servers == "f:1"
    # A context named explicitly beats the environment, credentials included.
    monkeypatch.setenv("LEPTON_TOKEN", "env-token")
    conn = resolve_connection(context="prod")
    assert (conn.servers, conn.token) == ("p:1", "prod-token")
    # The environment's token beats the current context's; a flag beats both.
    monkeypatch.delenv("LEPTON_SERVER")
    assert resolve_connection().token == "env-token"
    assert resolve_connection(token="flag-token").token == "flag-token"
    with pytest.raises(NotFound, match="no context 'nope'"):
        resolve_connection(context="nope")


def test_client_with_no_arguments_uses_the_current_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeCoordinator()
    fake.add_node(make_node("aaaa1111ffff0000", "agent-1"))
    with serve(fake) as address:
        _save(Context("here", address), current="here")
        with Client() as c:
            assert [n.name for n in c.nodes()] == ["agent-1"]
            assert c.servers_source == "context 'here'"
        monkeypatch.setenv("LEPTON_SERVER", "a:1,b:2")
        with Client() as c:
            assert c.addresses == ["a:1", "b:2"] and c.servers_source == "$LEPTON_SERVER"
    with pytest.raises(InvalidArgument, match="no server address given"):
        Client([])  # given but empty: not a silent fallback


def test_unreachable_server_fails_fast_in_the_client() -> None:
    with Client("127.0.0.1:1", timeout=60) as c, pytest.raises(Exception, match="cannot reach 127.0.0.1:1"):
        c.nodes()  # the 2 s connect timeout, not the 60 s budget (pytest-timeout guards)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_config_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "config", "current-context")
    assert code == 1 and "no current context" in err
    assert run(capsys, "config", "set-context", "a", "--server", "a:1", "--token", "tok")[0] == 0
    assert run(capsys, "config", "set-context", "b", "--server", "b:1,b:2", "--tls-dir", "rel")[0] == 0
    assert load_config().get("b").tls_dir == os.path.abspath("rel")  # stored absolute
    code, _, err = run(capsys, "config", "set-context", "c")
    assert code == 1 and "needs --server" in err
    assert run(capsys, "config", "use-context", "a")[0] == 0
    assert run(capsys, "config", "current-context")[1] == "a\n"
    code, out, _ = run(capsys, "config", "get-contexts")
    assert code == 0 and "tok" not in out  # the token is never printed
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["*", "a"] and lines[2].split()[0] == "b"
    assert run(capsys, "-q", "config", "get-contexts")[1] == "a\nb\n"
    code, _, err = run(capsys, "config", "use-context", "zz")
    assert code == 1 and "no context 'zz'" in err
    assert run(capsys, "config", "delete-context", "a")[0] == 0
    assert run(capsys, "config", "current-context")[0] == 1
    code, _, err = run(capsys, "config", "set-context", "bad name", "--server", "x:1")
    assert code == 1 and "bad context name" in err


def test_local_contexts_switch_back() -> None:
    _save(Context("prod", "p:1"), current="prod")
    switch_to_local("127.0.0.1:7070")
    assert load_config().current_context == "local"
    assert switch_from_local() == "prod"
    assert load_config().current_context == "prod"
    assert switch_from_local() is None  # not on local: left alone


def test_cannot_reach_says_where_the_servers_came_from(capsys: pytest.CaptureFixture[str]) -> None:
    _save(Context("gone", "127.0.0.1:1"), current="gone")
    code, _, err = run(capsys, "nodes", "list")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("lepton-ctl: cannot reach 127.0.0.1:1") and "servers of context 'gone'" in err
    code, _, err = run(capsys, "--server", "127.0.0.1:1", "nodes", "list")
    assert code == 1 and err == "lepton-ctl: cannot reach 127.0.0.1:1 (connection refused)\n"


def test_token_from_stdin_and_a_warning_for_a_readable_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from-stdin\n"))
    assert run(capsys, "config", "set-context", "a", "--server", "a:1", "--token", "-")[0] == 0
    assert load_config().get("a").token == "from-stdin"
    assert not caplog.records
    config_path().chmod(0o644)
    load_config()
    assert "readable by others" in caplog.text
