"""The agent's port probes: the free port a node reports (a job's rank 0 hosts torch's store
on it) and the bind check before gRPC listens, in the host's own address family."""

from __future__ import annotations

import socket

import pytest

from lepton.agent.daemon import check_bindable, free_port


def _has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")


@pytest.mark.parametrize("host, family", [
    ("127.0.0.1", socket.AF_INET),
    ("0.0.0.0", socket.AF_INET),
    pytest.param("::1", socket.AF_INET6, marks=needs_ipv6),
    pytest.param("::", socket.AF_INET6, marks=needs_ipv6),
])
def test_free_port_is_one_a_listener_can_take_on_that_host(host: str, family: int) -> None:
    port = free_port(host)
    assert port > 0
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()


def test_free_port_is_zero_where_nothing_can_be_bound() -> None:
    assert free_port("no-such-host.invalid") == 0
    assert free_port("192.0.2.1") == 0  # TEST-NET-1: never this machine's address


def _listening(family: int, host: str) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen()
    return s


def test_check_bindable_names_the_address_and_the_flag_of_a_taken_port() -> None:
    with _listening(socket.AF_INET, "127.0.0.1") as taken:
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on {address}: .*--listen"):
            check_bindable(address, "--listen")
    check_bindable("127.0.0.1:0", "--listen")  # port 0: the OS picks one, nothing to check


@needs_ipv6
def test_check_bindable_reads_a_bracketed_ipv6_address() -> None:
    with _listening(socket.AF_INET6, "::1") as taken:
        address = f"[::1]:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=r"cannot listen on \[::1\]:\d+: .*--metrics-listen"):
            check_bindable(address, "--metrics-listen")
    with _listening(socket.AF_INET6, "::1") as other:
        port = other.getsockname()[1]
    check_bindable(f"[::1]:{port}", "--listen")  # free again: no error
