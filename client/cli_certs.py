"""lepton-ctl's certificate commands: `certs init` (the cluster CA) and `certs issue`.

Hooked into lepton-ctl with `register(top, common)`. They work on a local folder and never
call the cluster: run them where the CA key is kept (see docs/operations.md, TLS).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._cli_common import command, command_group, print_result

__all__ = ["register"]


def cmd_certs_init(args: argparse.Namespace) -> int:
    from lepton.common import tls

    cert = tls.init_ca(args.dir)  # AlreadyExists when there is one: never overwritten
    return print_result(args, {"ca_cert": str(cert), "ca_key": str(cert.with_name(tls.CA_KEY))},
                        f"created the cluster CA in {args.dir} ({tls.CA_CERT}, {tls.CA_KEY})\n"
                        f"keep {tls.CA_KEY} where certificates are issued, not on every node\n")


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from lepton.common import tls

    if args.kind != "node" and args.host:
        sys.stderr.write("lepton-ctl: --host applies to node certificates only\n")
        return 2
    paths = tls.issue(
        args.dir, args.name, kind=args.kind, role=args.role, hosts=args.host or (),
        days=args.days, overwrite=args.force,
    )
    identity = f"user:{args.role}" if args.kind == "user" else args.kind
    return print_result(args, {"name": args.name, "identity": identity, "cert": str(paths.cert),
                               "key": str(paths.key), "ca_cert": str(paths.ca)},
                        f"issued {identity} certificate {args.name}: {paths.cert}, {paths.key}\n")


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `certs init|issue` to lepton-ctl's subcommands."""
    from lepton.common import tls

    sub = command_group(top, "certs", "the cluster CA and its certificates (mTLS)")
    p = command(sub, "init", cmd_certs_init,
                "create the cluster CA (ca.crt, ca.key) in DIR; refuses to overwrite one", [common])
    p.add_argument("--dir", required=True, metavar="DIR", help="the TLS folder (made 0700)")

    p = command(sub, "issue", cmd_certs_issue,
                "issue a node, user or task certificate signed by the CA in DIR (task: what tasks "
                "connect with; it carries no identity, so name it `task`)", [common])
    p.add_argument("name", metavar="NAME", help="node id or user name (the certificate's CN)")
    p.add_argument("--dir", required=True, metavar="DIR", help="the TLS folder holding the CA")
    p.add_argument("--kind", choices=tls.KINDS, default="node", help="default: node")
    p.add_argument("--role", choices=tls.USER_ROLES, default="user",
                   help="a user's role (default: user)")
    p.add_argument("--host", action="append", metavar="H",
                   help="a host name or IP the node is dialled by (repeatable; "
                        "localhost, 127.0.0.1 and ::1 are always included)")
    p.add_argument("--days", type=int, default=tls.CERT_DAYS, help="validity (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing certificate of that name")
