"""Telling gRPC-core's own UNAVAILABLE (nobody answered) from a server's UNAVAILABLE."""

from __future__ import annotations

import grpc
import pytest

from lepton.client._transport import Transport, retryable, transport_failure, unreachable_error


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("details", "want"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Failed to connect to remote host: Connection refused",
            Transport("connection refused", maybe_sent=False),
        ),
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:10.0.0.9:7070: "
            "No route to host",
            Transport("no route to host", maybe_sent=False),
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: Connection timed out",
            Transport("connection timed out", maybe_sent=False),
        ),
        ("failed to connect to all addresses", Transport("connection failed", maybe_sent=False)),
        (
            "errors resolving nosuch.invalid:7070: [field:hostname lookup error:Domain name not found]",
            Transport("cannot resolve host", maybe_sent=False),
        ),
        (
            "DNS resolution failed for nosuch:7070",
            Transport("cannot resolve host", maybe_sent=False),
        ),
        ("Socket closed", Transport("connection lost", maybe_sent=True)),
        ("recvmsg:Connection reset by peer", Transport("connection lost", maybe_sent=True)),
        ("GOAWAY received", Transport("connection lost", maybe_sent=True)),
        # The server's own answers are not transport failures:
        ("not the leader", None),
        ("no leader elected yet", None),
    ],
)
def test_transport_failure(details: str, want: Transport | None) -> None:
    assert transport_failure(FakeRpcError(UNAVAILABLE, details)) == want


def test_other_codes_are_never_transport_failures() -> None:
    err = FakeRpcError(grpc.StatusCode.INTERNAL, "failed to connect to all addresses")
    assert transport_failure(err) is None
    assert not retryable(err) and retryable(FakeRpcError(UNAVAILABLE, "x"))


def test_unreachable_error_messages() -> None:
    assert (
        str(unreachable_error({"a:1": "connection refused"}))
        == "cannot reach a:1 (connection refused)"
    )
    assert (
        str(unreachable_error({"a:1": "connection refused", "b:2": "cannot resolve host"}))
        == "cannot reach any server: a:1 (connection refused), b:2 (cannot resolve host)"
    )
