"""How a candidate authenticates to etcd: paths only, read when the channel opens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """PEM paths: `ca` verifies etcd's server certificate; `cert`/`key` (both or neither)
    are the client certificate when etcd runs with --client-cert-auth."""

    ca: str
    cert: str | None = None
    key: str | None = None
