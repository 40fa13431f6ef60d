"""`lepton-ctl`: the command line of Lepton. Reference: docs/cli.md.

Exit codes: 0 ok, 1 failed, 2 usage, 130 interrupted. An error is one line on stderr,
`lepton-ctl: <message>`; `--debug` adds logs and, for unexpected errors, the traceback.

This module is the program's entry (`lepton-ctl` and `python -m lepton.client.cli`) and
imports nothing heavy itself: the parser and the commands live in `cli_app`, which pulls in
grpc, protobuf and rich (a few hundred ms). `entry()` imports it under its own guard, so a
Ctrl-C while the program is still loading exits 130 quietly instead of printing Python's
traceback. The names of `cli_app` (`main`, `build_parser`, the `cmd_*` functions) stay
reachable here for the tools and tests that import them from `lepton.client.cli`.
"""

from __future__ import annotations

import os
import signal
import sys

from lepton.common.version import VERSION

PROG = "lepton-ctl"
# The signals that end a command as a Ctrl-C does (_cli_common.STOP_SIGNALS; repeated here so
# that ignoring them after the command does not import the client).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def __getattr__(name: str) -> object:
    # PEP 562: `from lepton.client.cli import main` and `cli.build_parser()` load the app.
    if name.startswith("__"):
        raise AttributeError(name)
    from . import cli_app

    try:
        return getattr(cli_app, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def _exit_interrupted(_signum: int, _frame: object) -> None:
    os._exit(130)  # nothing done yet, nothing to flush or undo


def _load_app():  # -> cli_app.main
    """Import the commands (grpc, protobuf, rich: the slow part of the start). A Ctrl-C (or
    SIGTERM, SIGHUP: treated as Ctrl-C) meanwhile exits 130 at once and quietly: a handler
    that exits, rather than the KeyboardInterrupt that Python would raise wherever the
    import happened to be (some of those places only print it and go on). A signal the
    caller set to be ignored (nohup, `&`) stays ignored."""
    guarded = {}
    for sig in (signal.SIGINT, *_STOP_SIGNALS):
        if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL):
            guarded[sig] = signal.signal(sig, _exit_interrupted)
    from .cli_app import main

    for sig, before in guarded.items():
        signal.signal(sig, before)
    return main


def entry() -> None:
    """The `lepton-ctl` program: `cli_app.main()`, then exit with its code. A Ctrl-C while the
    client is still loading exits 130 with nothing on stderr. Once the command has finished,
    a late Ctrl-C or SIGTERM changes nothing (Python restores the default SIGINT action while
    it shuts down, which would end a finished command as killed)."""
    argv = sys.argv[1:]
    if argv == ["--version"]:  # answered without loading the client
        sys.stdout.write(f"{PROG} {VERSION}\n")
        code = 0
    else:
        try:
            code = _load_app()(argv)
        except KeyboardInterrupt:  # between the guard's end and main()'s own handling
            code = 130
    for sig in (signal.SIGINT, *_STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
