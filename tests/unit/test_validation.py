"""The shared validators: one rule per name, whichever layer calls it (agent config, client,
coordinator API, Raft membership, data plane)."""

from __future__ import annotations

import pytest

from lepton.common.config import AgentConfig
from lepton.common.errors import InvalidArgument
from lepton.common.validation import (
    check_address,
    check_text,
    join_host_port,
    require_id,
    split_host_port,
)

# -- check_address ---------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a:1", "127.0.0.1:7070", "[::1]:7070", "host.example:65535"])
def test_check_address_accepts_host_port(good: str) -> None:
    assert check_address(good, "address") == good
    assert check_address(good, "listen", bind=True) == good


@pytest.mark.parametrize(
    "bad",
    [
        "", "   ", "host", "host:", ":7070", "host:http", "host:70000", "host:-1", "host:²",
        "::1:7070",  # an IPv6 host without brackets is ambiguous
        "a b:1", "host\n:1", "x" * 300 + ":1",
    ],
)
def test_check_address_refuses_what_is_not_host_port(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="address"):
        check_address(bad, "address")
    with pytest.raises(InvalidArgument, match="address"):
        check_address(bad, "address", bind=True)


def test_port_zero_only_for_an_address_to_bind() -> None:
    assert check_address("127.0.0.1:0", "listen", bind=True) == "127.0.0.1:0"
    with pytest.raises(InvalidArgument, match="is not HOST:PORT"):
        check_address("127.0.0.1:0", "source")


def test_agent_config_binds_port_zero_but_never_dials_it() -> None:
    cfg = AgentConfig(listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    assert cfg.listen == "127.0.0.1:0"
    for field in ("advertise", "join"):
        with pytest.raises(InvalidArgument, match="is not HOST:PORT"):
            AgentConfig(**{field: "127.0.0.1:0"})
    with pytest.raises(InvalidArgument, match="listen"):
        AgentConfig(listen="::1:7070")


def test_client_server_list_uses_the_same_rule() -> None:
    from lepton.client.client import parse_servers

    assert parse_servers("[::1]:7070, a:1") == ["[::1]:7070", "a:1"]
    with pytest.raises(InvalidArgument, match="server address 'host:0' is not HOST:PORT"):
        parse_servers("host:0")


# -- split_host_port / join_host_port ----------------------------------------------------------


@pytest.mark.parametrize(
    "address, host, port",
    [
        ("127.0.0.1:7070", "127.0.0.1", 7070),
        ("node-1.example:0", "node-1.example", 0),
        ("[::1]:7070", "::1", 7070),  # brackets are syntax, not part of the host
        ("[::]:65535", "::", 65535),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80),
    ],
)
def test_split_host_port_unbrackets_ipv6_and_join_puts_them_back(address: str, host: str, port: int) -> None:
    assert split_host_port(address) == (host, port)
    assert join_host_port(host, port) == address


@pytest.mark.parametrize(
    "bad", ["", "host", "host:", ":7070", "[]:1", "::1:7070", "[::1:7070", "::1]:7070", "[a]b]:1",
            "host:http", "host:70000", "host:000070000", "host:-1", "host:²", "a b:1", "1" * 5000 + ":" + "1" * 5000]
)
def test_split_host_port_refuses_what_is_not_host_port(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="^--peers .* is not HOST:PORT$"):
        split_host_port(bad, "--peers")


def test_join_host_port_leaves_a_bracketed_host_alone() -> None:
    assert join_host_port("[::1]", 80) == "[::1]:80"


# -- require_id ------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "t-0123abcd", "node_1.example", "A" * 128])
def test_require_id_accepts_ids(good: str) -> None:
    assert require_id(good, "task id") == good


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_require_id_names_a_missing_id(blank: str) -> None:
    with pytest.raises(InvalidArgument, match="^task id must not be empty$"):
        require_id(blank, "task id")


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("A" * 129, "129 characters; at most 128"),
        ("-leading-dash", "may hold only"),
        (".hidden", "may hold only"),
        ("a/b", "may hold only"),
        (" padded ", "may hold only"),
        ("a\nb", "may hold only"),
    ],
)
def test_require_id_refuses_what_no_id_looks_like(bad: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        require_id(bad, "node_id")


def test_require_id_refuses_a_non_string() -> None:
    with pytest.raises(InvalidArgument, match="must not be empty"):
        require_id(None, "node_id")  # type: ignore[arg-type]


def test_required_text_may_not_be_blank() -> None:
    assert check_text("gpu box 1", "name", required=True) == "gpu box 1"
    with pytest.raises(InvalidArgument, match="name must not be empty"):
        check_text("  ", "name", required=True)
    assert check_text("", "name") == ""


def test_agent_config_reads_ipv6_listen_addresses() -> None:
    import socket

    assert AgentConfig(listen="[::1]:7070").advertise_address == "[::1]:7070"
    assert AgentConfig(listen="[::]:7070", insecure=True).advertise_address == f"{socket.gethostname()}:7070"
    AgentConfig(listen="[::1]:7070", metrics_listen="[::1]:9100")  # loopback: no TLS needed
    with pytest.raises(InvalidArgument, match=r"refusing to listen on \[::\]:7070 without TLS"):
        AgentConfig(listen="[::]:7070")
    with pytest.raises(InvalidArgument, match=r"refusing to serve metrics on \[::\]:9100 without TLS"):
        AgentConfig(listen="[::1]:7070", metrics_listen="[::]:9100")
    AgentConfig(listen="[::1]:7070", metrics_listen="[::]:0")  # port 0: metrics off
