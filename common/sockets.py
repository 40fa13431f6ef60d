"""TCP sockets bound in the address family of the host they name (IPv4, IPv6 or a name)."""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host` and `port` (0: any free one), not yet listening.

    `host` is bare, as validation.split_host_port gives it: a name, an IPv4 or IPv6 address
    or a wildcard; the socket takes that host's own address family (a plain socket() is
    IPv4 only, so "::1" would fail). SO_REUSEADDR as gRPC and torch's store set it.
    Raises OSError (socket.gaierror for a name that resolves to nothing).
    """
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock
