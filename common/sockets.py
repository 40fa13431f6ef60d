"""TCP sockets bound in the address family of the host they name (IPv4, IPv6 or a name);
gRPC targets for unix sockets whose paths are longer than the kernel takes."""

from __future__ import annotations

import os
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


MAX_UNIX_PATH = 107  # a unix socket's path: sun_path's 108 bytes, less the NUL


class UnixTarget:
    """A gRPC `unix:` target (to bind or to dial) for a socket path of any length.

    Linux takes at most MAX_UNIX_PATH bytes of path for a unix socket, and data dirs can be
    deep (a replica's socket sits in its attempt's folder). A longer path is reached through
    a handle on its folder held open here, as `/proc/self/fd/N/<name>` (the kernel follows
    the handle), until `close()`. The folder must exist. Raises OSError.
    """

    def __init__(self, path: str | os.PathLike[str]):
        path = os.fspath(path)
        self._fd: int | None = None
        if len(os.fsencode(path)) <= MAX_UNIX_PATH:
            self.target = f"unix:{path}"
            return
        folder, name = os.path.split(path)
        self._fd = os.open(folder or ".", os.O_PATH | os.O_DIRECTORY)
        self.target = f"unix:/proc/self/fd/{self._fd}/{name}"

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
