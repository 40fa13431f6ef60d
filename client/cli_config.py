"""`lepton-ctl config ...`: the contexts of the client config file (`contexts.py`), and
`lepton-ctl completion SHELL` (a static completion script made from the parser by shtab).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any

from lepton.common.errors import FailedPrecondition

from ._cli_common import command, command_group, print_result
from .client import parse_servers
from .contexts import Context, check_context_name, config_path, load_config, save_config
from .tables import FitTable

__all__ = ["COMPLETION_SHELLS", "register", "register_completion"]

COMPLETION_SHELLS = ("bash", "zsh", "tcsh")


def register(top: Any, common: argparse.ArgumentParser) -> None:
    cfg_sub = command_group(top, "config", "contexts: named clusters to talk to (kubectl-style)")
    command(cfg_sub, "get-contexts", cmd_get_contexts, "list the contexts; * marks the current one", [common])
    command(cfg_sub, "current-context", cmd_current_context, "print the current context's name", [common])
    p = command(cfg_sub, "use-context", cmd_use_context, "make a context the current one", [common])
    p.add_argument("name", metavar="NAME")
    # Its own --server/--tls-dir/--cert-name/--token (what to store), so not the globals.
    p = command(cfg_sub, "set-context", cmd_set_context, "create a context, or change the settings given")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--server", dest="ctx_servers", metavar="ADDR[,ADDR...]",
                   help="coordinator address(es); required for a new context")
    p.add_argument("--tls-dir", dest="ctx_tls_dir", metavar="DIR", help='"" for plaintext')
    p.add_argument("--cert-name", dest="ctx_cert_name", metavar="NAME")
    p.add_argument("--token", dest="ctx_token", metavar="TOKEN",
                   help="API token, or - to read it from stdin (kept out of the shell's "
                   "history); the file is 0600 and the token is never printed")
    p.add_argument("--use", action="store_true", help="also make it the current context")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p = command(cfg_sub, "delete-context", cmd_delete_context, "delete a context", [common])
    p.add_argument("name", metavar="NAME")


def register_completion(top: Any, parser_of: Any) -> None:
    """`completion SHELL`; `parser_of()` gives the whole parser (built after this)."""
    p = command(top, "completion", lambda args: cmd_completion(args, parser_of()),
                "print a shell completion script",
                description="Print a completion script: "
                "'source <(lepton-ctl completion bash)' in ~/.bashrc; for zsh, "
                "'lepton-ctl completion zsh > \"${fpath[1]}/_lepton-ctl\"'.")
    p.add_argument("shell", choices=COMPLETION_SHELLS)


def cmd_completion(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import shtab  # only here

    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0


def _contexts_table(contexts: list[dict[str, Any]]) -> FitTable:
    table = FitTable(("CURRENT", "NAME", "SERVERS", "TLS", "TOKEN"), keep=("NAME",))
    for c in contexts:
        tls = c["tls_dir"] + (f" ({c['cert_name']})" if c["cert_name"] else "") or "-"
        table.add_row("*" if c["current"] else "", c["name"], c["servers"], tls,
                      "yes" if c["token"] else "-")
    return table


def cmd_get_contexts(args: argparse.Namespace) -> int:
    config = load_config()
    docs = [config.contexts[n].to_dict(current=n == config.current_context)
            for n in sorted(config.contexts)]
    return print_result(args, docs, lambda: _contexts_table(docs),
                        empty=f"no contexts in {config_path()}")


def cmd_current_context(args: argparse.Namespace) -> int:
    name = load_config().current_context
    if not name:
        raise FailedPrecondition("no current context ('lepton-ctl config use-context NAME')")
    return print_result(args, {"name": name}, name + "\n")


def cmd_use_context(args: argparse.Namespace) -> int:
    config = load_config()
    config.use(check_context_name(args.name))
    save_config(config)
    return print_result(args, {"name": args.name}, f"switched to context {args.name!r}\n")


def cmd_set_context(args: argparse.Namespace) -> int:
    name = check_context_name(args.name)
    config = load_config()
    ctx = config.contexts.get(name)
    if ctx is None:
        if not args.ctx_servers:
            raise FailedPrecondition(f"a new context needs --server (context {name!r})")
        ctx = Context(name, servers="")
    changes = {k: getattr(args, f"ctx_{k}") for k in ("servers", "tls_dir", "cert_name", "token")}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("tls_dir"):  # used from any folder later: stored absolute
        changes["tls_dir"] = os.path.abspath(os.path.expanduser(changes["tls_dir"]))
    if changes.get("token") == "-":
        changes["token"] = sys.stdin.readline().strip()
    if "servers" in changes:
        changes["servers"] = ",".join(parse_servers(changes["servers"]))
    ctx = replace(ctx, **changes)
    config.contexts[name] = ctx
    if args.use:
        config.use(name)
    path = save_config(config)
    doc = ctx.to_dict(current=config.current_context == name)
    return print_result(args, doc, f"context {name!r} saved in {path}\n")


def cmd_delete_context(args: argparse.Namespace) -> int:
    config = load_config()
    config.get(args.name)
    del config.contexts[args.name]
    if config.current_context == args.name:
        config.current_context = ""
    if config.previous_context == args.name:
        config.previous_context = ""
    save_config(config)
    return print_result(args, {"name": args.name}, f"deleted context {args.name!r}\n")
