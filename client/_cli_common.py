"""What every lepton-ctl command module shares: the parser class, option types, the global
options, making the client, printing a result (JSON or for eyes)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from lepton.common.errors import LeptonError
from lepton.common.sizes import parse_size

from .client import DEFAULT_SERVER, DEFAULT_TIMEOUT, Client
from .render import dump_json, emit

PROG = "lepton-ctl"
# When no server can be reached at all, say so after this long rather than the full
# --timeout: at a prompt, "cannot reach" now beats a silent wait (a restarting one-node
# cluster is still covered).
CLI_CONNECT_TIMEOUT_S = 2.0


class UsageError(Exception):
    """A usage mistake found after parsing; lepton-ctl prints it in one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with lepton-ctl's one-line error format; exit code stays 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


# -- option types: argparse `type=` functions, one-line messages ------------------------


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0 or value == float("inf"):  # NaN fails the first test
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _size(text: str) -> int:
    """Bytes, or a size such as 512MiB (`parse_size`)."""
    try:
        return parse_size(text)
    except LeptonError as e:
        raise argparse.ArgumentTypeError(e.message) from None


def _global_options(
    parser: argparse.ArgumentParser, *, defaults: bool, timeout: bool = True
) -> None:
    # Given twice: on the top parser with defaults, and on every subcommand with SUPPRESS,
    # so `lepton-ctl -o json nodes list` and `lepton-ctl nodes list -o json` both work.
    # `timeout=False` for `submit` and `run`, whose own --timeout is the task's time limit:
    # there the call budget goes before the command (`lepton-ctl --timeout 30 run ...`).
    def d(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    g = parser.add_argument_group("global options")
    g.add_argument(
        "--server",
        metavar="ADDR[,ADDR...]",
        default=d(os.environ.get("LEPTON_SERVER") or DEFAULT_SERVER),
        help=f"coordinator address(es), any voters (default: $LEPTON_SERVER, else {DEFAULT_SERVER})",
    )
    g.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=d("table"),
        help="output format (default: table)",
    )
    if timeout:
        g.add_argument(
            "--timeout",
            metavar="SECONDS",
            type=_positive_float,
            default=d(DEFAULT_TIMEOUT),
            help=f"time budget of each call, retries included (default: {DEFAULT_TIMEOUT:g})",
        )
    g.add_argument(
        "--debug", action="store_true", default=d(False), help="log to stderr, show tracebacks"
    )
    g.add_argument(
        "--tls-dir",
        metavar="DIR",
        default=d(os.environ.get("LEPTON_TLS_DIR") or None),
        help="connect with mutual TLS using a certificate from DIR (default: $LEPTON_TLS_DIR)",
    )
    g.add_argument(
        "--cert-name",
        metavar="NAME",
        default=d(os.environ.get("LEPTON_CERT_NAME") or None),
        help="which certificate in --tls-dir (default: $LEPTON_CERT_NAME, else admin, else the only user one)",
    )
    g.add_argument(
        "--token",
        metavar="TOKEN",
        default=d(os.environ.get("LEPTON_TOKEN") or ""),
        help="API token sent as 'authorization: Bearer' (default: $LEPTON_TOKEN)",
    )


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.server,
        timeout=args.timeout,
        connect_timeout=min(args.timeout, CLI_CONNECT_TIMEOUT_S),
        **tls_options(args),
    )


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """`tls_dir`/`cert_name` (and the API `token`) for `Client` from the global options
    (absent on old parsers)."""
    return {"tls_dir": getattr(args, "tls_dir", None), "cert_name": getattr(args, "cert_name", None),
            "token": getattr(args, "token", None)}


def wants_json(args: argparse.Namespace) -> bool:
    """`-o json`: print the result as JSON (and nothing meant for eyes, such as progress)."""
    return args.output == "json"


def print_result(args: argparse.Namespace, doc: Any, human: str | Callable[[], Any], *,
                 empty: str = "", line: bool = False) -> int:
    """The one output switch of lepton-ctl; returns 0, the command's exit code.

    `-o json` prints `doc` in the JSON format (`render.dump_json`), or with `line` as one
    compact line (JSON Lines, for streams). Otherwise `empty` (as "no tasks") goes to stderr
    when `doc` is empty, else `human` is shown. A function is called only then (its
    lookups serve the human form alone) for what to show. Text is written as it is; a
    rich table or view goes through `render.emit`; None shows nothing more.
    """
    if wants_json(args):
        sys.stdout.write((json.dumps(doc, sort_keys=True) if line else dump_json(doc)) + "\n")
        return 0
    if empty and not doc:
        sys.stderr.write(f"{empty}\n")
        return 0
    shown = human() if callable(human) else human
    if isinstance(shown, str):
        sys.stdout.write(shown)
    elif shown is not None:
        emit(shown)
    return 0
