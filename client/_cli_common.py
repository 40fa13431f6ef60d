"""What every lepton-ctl command module shares: the parser class, option types, the global
options, making the client, printing a result (JSON or for eyes)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from lepton.common.errors import LeptonError
from lepton.common.sizes import parse_size

from .client import CONNECT_TIMEOUT_S, DEFAULT_SERVER, DEFAULT_TIMEOUT, Client
from .contexts import resolve_connection
from .render import dump_json, dump_yaml, emit

PROG = "lepton-ctl"
# When no server can be reached at all, say so after this long rather than the full
# --timeout (the client's own default, kept under this name for tools and tests).
CLI_CONNECT_TIMEOUT_S = CONNECT_TIMEOUT_S
OUTPUT_FORMATS = ("table", "json", "yaml", "wide")
# The keys `-q` takes an item's id from, first present wins.
ID_KEYS = ("id", "name", "user")


class UsageError(Exception):
    """A usage mistake found after parsing; lepton-ctl prints it in one line and exits 2."""


# `kill`, `timeout`, a closed terminal, a supervisor stopping us: treated as Ctrl-C is.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: every command handles it as Ctrl-C (`run` cancels its
    task, or with --detach leaves it running; `logs -f` stops). `str()`: the signal's name."""


def interrupt_reason(exc: BaseException) -> str:
    """How a command was stopped, for its last line: `interrupted` or `terminated (SIGTERM)`."""
    return f"terminated ({exc})" if isinstance(exc, Terminated) else "interrupted"


@contextmanager
def stop_signals_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Terminated` in the main thread. The first one
    only: later ones are ignored so the clean-up it starts (cancelling a task) is not itself
    cut short; SIGKILL and Ctrl-C still end the process. A signal already ignored (nohup)
    stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signal.Signals(signum).name)

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in before.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _Parser(argparse.ArgumentParser):
    """argparse with lepton-ctl's one-line error format; exit code stays 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


# -- declaring subcommands: the one way every CLI module does it -------------------------

def command(
    group: Any,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    parents: Sequence[argparse.ArgumentParser] = (),
    *,
    description: str | bool = True,
) -> argparse.ArgumentParser:
    """Add subcommand `name` to `group` (what `command_group` returns, or lepton-ctl's top
    level), run by `func`. `help` is its line in the parent's --help and the opening of its
    own (`description`: other text for that, or False for none); `parents` are usually the
    global options (`_global_options(..., defaults=False)`). Returns it, for its options."""
    text = help if description is True else description or None
    p = group.add_parser(name, help=help, description=text, parents=list(parents))
    p.set_defaults(func=func)
    return p


def command_group(top: Any, name: str, help: str, *, description: str | None = None) -> Any:
    """Add `name` to `top` as a group of subcommands (`lepton-ctl NAME COMMAND`, one of
    them required); returns the group, for `command`."""
    p = top.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True, parser_class=_Parser)


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


# Every positive-float option is seconds. Past this (about 31 years) gRPC's deadline
# arithmetic overflows and the call ends at once ("no answer within 1e+308s").
MAX_SECONDS = 1e9


def _positive_float(text: str) -> float:
    value = _float(text)
    if not 0 < value <= MAX_SECONDS:  # NaN fails it too (a wait that never ends or starts)
        raise argparse.ArgumentTypeError(f"must be positive and at most {MAX_SECONDS:g}: {text!r}")
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


def _positive_int_at_most(high: int) -> Callable[[str], int]:
    """A `type=` for 1..high: past `high` a one-line usage error, not a message field's
    ValueError later."""
    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"at most {high}: {text!r}")
        return value

    return parse


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
        default=d(None),
        help="coordinator address(es), any voters (default: $LEPTON_SERVER, else the "
        f"current context, else {DEFAULT_SERVER})",
    )
    g.add_argument(
        "--context",
        metavar="NAME",
        default=d(None),
        help="use this context of the client config (see 'config get-contexts')",
    )
    g.add_argument(
        "-o",
        "--output",
        choices=OUTPUT_FORMATS,
        default=d("table"),
        help="output format: table, json, yaml, or wide (a table with more columns)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=d(False),
        help="lists: print only the ids, one per line",
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
    # None: not given, so Client() resolves it (environment, then the context).
    g.add_argument(
        "--tls-dir",
        metavar="DIR",
        default=d(None),
        help="connect with mutual TLS using a certificate from DIR (default: $LEPTON_TLS_DIR, "
        "else the context's)",
    )
    g.add_argument(
        "--cert-name",
        metavar="NAME",
        default=d(None),
        help="which certificate in --tls-dir (default: $LEPTON_CERT_NAME, else the context's, "
        "else admin, else the only user one)",
    )
    g.add_argument(
        "--token",
        metavar="TOKEN",
        default=d(None),
        help="API token sent as 'authorization: Bearer' (default: $LEPTON_TOKEN, else the "
        "context's)",
    )


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.server,
        timeout=args.timeout,
        connect_timeout=min(args.timeout, CLI_CONNECT_TIMEOUT_S),
        context=getattr(args, "context", None),
        **tls_options(args),
    )


def unreachable_hint(args: argparse.Namespace) -> str:
    """Where the servers that could not be reached came from, for "cannot reach" errors:
    a new user's first failure should say what to change."""
    try:
        conn = resolve_connection(getattr(args, "server", None), context=getattr(args, "context", None))
    except LeptonError:
        return ""
    if conn.source == "the default":
        return f"; no cluster there? '{PROG} local up' starts one, --server or a context names one"
    if conn.source.startswith("context"):
        return f"; servers of {conn.source} ('{PROG} config get-contexts')"
    if conn.source == "$LEPTON_SERVER":
        return "; servers from $LEPTON_SERVER"
    return ""


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """`tls_dir`/`cert_name` (and the API `token`) for `Client` from the global options
    (absent on old parsers)."""
    return {"tls_dir": getattr(args, "tls_dir", None), "cert_name": getattr(args, "cert_name", None),
            "token": getattr(args, "token", None)}


def wants_json(args: argparse.Namespace) -> bool:
    """`-o json` or `-o yaml` (or `-q`): print a document for programs, and nothing meant
    for eyes such as progress."""
    return args.output in ("json", "yaml") or bool(getattr(args, "quiet", False))


def wide(args: argparse.Namespace) -> bool:
    """`-o wide`: tables show every column."""
    return getattr(args, "output", "table") == "wide"


def ids_of(doc: Any) -> list[str]:
    """What `-q` prints: each item's id (its name, or user, where it has no id). A
    UsageError for results without any."""
    items = doc if isinstance(doc, list) else [doc]
    out = []
    for item in items:
        key = next((k for k in ID_KEYS if isinstance(item, dict) and item.get(k)), None)
        if key is None:
            raise UsageError("-q: these results have no ids; use -o json")
        out.append(str(item[key]))
    return out


def print_result(args: argparse.Namespace, doc: Any, human: str | Callable[[], Any], *,
                 empty: str = "", line: bool = False) -> int:
    """The one output switch of lepton-ctl; returns 0, the command's exit code.

    `-q` prints the ids in `doc` (`ids_of`), one per line. `-o json` prints `doc` in the
    JSON format (`render.dump_json`), or with `line` as one compact line (JSON Lines, for
    streams); `-o yaml` the same document as YAML (with `line`, one document each, `---`
    before it). Otherwise `empty` (as "no tasks") goes to stderr when `doc` is empty, else
    `human` is shown. A function is called only then (its lookups serve the human form
    alone) for what to show; `-o wide` is for it to read (`wide(args)`). Text is written as
    it is; a rich table or view goes through `render.emit`; None shows nothing more.
    """
    if getattr(args, "quiet", False):
        sys.stdout.write("".join(i + "\n" for i in ids_of(doc)))
        return 0
    if args.output == "yaml":
        sys.stdout.write(("---\n" if line else "") + dump_yaml(doc))
        return 0
    if args.output == "json":
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
