"""lepton-ctl's cluster secret commands: `secret init` (make one) and `secret id` (which key).

The secret encrypts shards at rest (`lepton-agent --shard-key-file`); see docs/operations.md.
They work on local files and never call the cluster, and never print the secret itself.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._cli_common import command, command_group, print_result

__all__ = ["register"]


def _key_id(path: str) -> str:
    from lepton.dataplane.shard_crypto import ShardCipher

    return ShardCipher.from_file(path).key_id


def cmd_secret_init(args: argparse.Namespace) -> int:
    from lepton.common import cluster_secret

    path = cluster_secret.create(args.out)  # AlreadyExists when there is one: never overwritten
    key_id = _key_id(str(path))
    return print_result(args, {"secret_file": str(path), "key_id": key_id},
                        f"created the cluster secret {path} (mode 0600, key id {key_id})\n"
                        "copy it to every agent and start each with --shard-key-file FILE; "
                        "losing it loses the encrypted shards\n")


def cmd_secret_id(args: argparse.Namespace) -> int:
    key_id = _key_id(args.file)
    return print_result(args, {"secret_file": args.file, "key_id": key_id}, f"{key_id}\n")


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `secret init|id` to lepton-ctl's subcommands."""
    sub = command_group(top, "secret", "the cluster secret (shard encryption at rest)")
    p = command(sub, "init", cmd_secret_init,
                "write a new cluster secret (32 random bytes, base64) to FILE, mode 0600; never overwrites",
                [common])
    p.add_argument("--out", required=True, metavar="FILE", help="where to write it")

    p = command(sub, "id", cmd_secret_id,
                "print the key id of the secret in FILE (agents log it; stores record it)", [common])
    p.add_argument("file", metavar="FILE")
