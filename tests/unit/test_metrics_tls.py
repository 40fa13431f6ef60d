"""Metrics behind TLS (issue 12c): a non-loopback --metrics-listen needs --tls-dir or
--insecure; with TLS, /metrics answers only clients with a certificate of the cluster CA."""

from __future__ import annotations

import ssl
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from lepton.agent.metrics import start_metrics_server
from lepton.common import tls
from lepton.common.config import AgentConfig
from lepton.common.errors import InvalidArgument
from tests.integration.cluster import free_port


def test_a_non_loopback_metrics_listen_needs_tls_or_insecure():
    with pytest.raises(InvalidArgument, match="metrics on 0.0.0.0:9400 without TLS"):
        AgentConfig(metrics_listen="0.0.0.0:9400")
    AgentConfig(metrics_listen="127.0.0.1:9400")
    AgentConfig(metrics_listen="[::1]:9400")
    AgentConfig(metrics_listen="0.0.0.0:9400", insecure=True)
    AgentConfig(metrics_listen="0.0.0.0:9400", tls_dir="/etc/lepton/tls")


def _get(url: str, ctx: ssl.SSLContext) -> bytes:
    with urllib.request.urlopen(url, context=ctx, timeout=10) as r:
        return r.read()


def test_metrics_over_tls_need_a_cluster_client_certificate(tmp_path):
    d = tmp_path / "tls"
    tls.init_ca(d)
    tls.issue(d, "n1", kind="node", hosts=["127.0.0.1"])
    tls.issue(d, "prom", kind="user", role="viewer")
    other = tmp_path / "other"
    tls.init_ca(other)
    tls.issue(other, "prom", kind="user", role="viewer")
    registry = CollectorRegistry()
    Counter("lepton_probe", "a metric to find", registry=registry).inc()
    server = start_metrics_server("127.0.0.1", free_port(), registry, certfile=str(d / "n1.crt"),
                                  keyfile=str(d / "n1.key"), client_cafile=str(d / "ca.crt"))
    try:
        assert server.url.startswith("https://")
        assert b"lepton_probe_total 1.0" in _get(server.url, tls.client_ssl_context(d, "prom"))
        anonymous = ssl.create_default_context(cafile=str(d / "ca.crt"))
        foreign = tls.client_ssl_context(other, "prom")
        foreign.load_verify_locations(cafile=str(d / "ca.crt"))
        for ctx in (anonymous, foreign):
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                _get(server.url, ctx)
    finally:
        server.close()
