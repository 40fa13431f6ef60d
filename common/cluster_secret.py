"""The cluster secret: 32 random bytes, base64 text in a file only the agent's user reads.

Made once by `lepton-ctl secret init --out FILE` and copied to every agent
(`--shard-key-file`, `LEPTON_SHARD_KEY_FILE`, `shard_key_file` in the TOML file). The
shard-at-rest key is derived from it (`lepton.dataplane.shard_crypto`). Nothing here ever logs
or prints the secret itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from pathlib import Path

from lepton.common.durable import write_atomic
from lepton.common.errors import AlreadyExists, InvalidArgument

SECRET_BYTES = 32


def create(path: str | os.PathLike[str]) -> Path:
    """Write a new secret to `path` (mode 0600, never over an existing file: losing the old
    one would make every encrypted shard unreadable). Raises AlreadyExists, OSError."""
    path = Path(path)
    text = base64.b64encode(secrets.token_bytes(SECRET_BYTES)) + b"\n"
    try:
        write_atomic(path, text, exclusive=True)
    except FileExistsError:
        raise AlreadyExists(f"{path} already exists; a cluster secret is never overwritten") from None
    return path


def read(path: str | os.PathLike[str], *, what: str = "shard key file") -> bytes:
    """The secret's 32 bytes. Raises InvalidArgument naming the file (`what` says which
    one) and what is wrong (missing, unreadable, not base64, wrong length), never its content."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {path}: no such file (make one with lepton-ctl secret init)") from None
    except OSError as err:
        raise InvalidArgument(f"{what} {path}: cannot read it: {err.strerror}") from None
    try:
        secret = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{what} {path}: not base64 text (make one with lepton-ctl secret init)") from None
    if len(secret) != SECRET_BYTES:
        raise InvalidArgument(f"{what} {path}: holds {len(secret)} bytes, not {SECRET_BYTES}")
    return secret


def loosely_readable(path: str | os.PathLike[str]) -> bool:
    """True when group or others may read the file (the agent warns about it)."""
    try:
        return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))
    except OSError:
        return False
