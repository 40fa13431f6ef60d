"""Shipping code: `--working-dir DIR` / `submit(..., working_dir=DIR)`.

The folder is packed into a deterministic tar.gz (`lepton.dataplane.code_archive`: ignore
rules, caps), whose SHA-256 names it. It is stored through the data plane as the one-shard
dataset `code-<digest>`, unless the cluster already has it: an unchanged folder is never
uploaded twice. Tasks carry the digest (`TaskSpec.code_digest`); each agent fetches the
blob from its holders once, unpacks it into a cache, and starts every attempt in a fresh
copy of it (see `lepton.agent.code_cache`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lepton.common.errors import FailedPrecondition, InvalidArgument, LeptonError, NotFound
from lepton.dataplane import code_archive as ca
from lepton.v1 import datasets_pb2 as dpb

if TYPE_CHECKING:
    from .data import DatasetInfo

__all__ = ["CodeMethods", "CodeUpload"]

log = logging.getLogger(__name__)

# Copies of a code archive: two when the cluster has two ready nodes, else one.
CODE_REPLICAS = 2


@dataclass(frozen=True)
class CodeUpload:
    """A folder as the cluster stores it: `digest` goes into `TaskSpec.code_digest`."""

    folder: str
    digest: str
    size: int  # bytes of the archive
    files: int
    uploaded: bool  # False: the cluster already had it; nothing was sent
    warnings: list[str] = field(default_factory=list)

    @property
    def dataset(self) -> str:
        return ca.dataset_name(self.digest)

    def describe(self) -> str:
        """`code: 3 files, 1.2 KiB as 9f86d081884c (uploaded)`"""
        size = f"{self.size / (1 << 20):.1f} MiB" if self.size >= 1 << 20 else f"{self.size / 1024:.1f} KiB"
        how = "uploaded" if self.uploaded else "already stored, not uploaded again"
        return f"code: {self.files} files, {size} as {self.digest[:12]} ({how})"


class CodeMethods:
    """`push_code` and the `working_dir=` keyword of the submit calls (a mixin of `Client`)."""

    if TYPE_CHECKING:
        def dataset(self, name: str, *, timeout: float | None = None) -> DatasetInfo: ...
        def put_shards(self, name: str, metas: list[dpb.Shard], files: dict[str, Path],
                       **kw: Any) -> DatasetInfo: ...

    def push_code(self, folder: str | os.PathLike[str], *, max_bytes: int = ca.MAX_ARCHIVE_BYTES,
                  warn_bytes: int = ca.WARN_ARCHIVE_BYTES) -> CodeUpload:
        """Pack `folder` and store it unless the cluster has it already. Warnings (a large
        archive) are logged and listed in the result. Raises InvalidArgument (no such
        folder, a link out of it, past `max_bytes`: the message says what to leave out),
        FailedPrecondition (the name is taken by other bytes), or the put's errors."""
        with tempfile.TemporaryDirectory(prefix="lepton-code-") as tmp:
            archive = ca.pack_folder(folder, Path(tmp) / "code.tar.gz", max_bytes=max_bytes,
                                     warn_bytes=warn_bytes)
            for text in archive.warnings:
                log.warning("%s", text)
            uploaded = not self._has_code(archive.digest)
            if uploaded:
                self._put_code(archive)
        return CodeUpload(str(folder), archive.digest, archive.size, archive.files, uploaded,
                          archive.warnings)

    def _has_code(self, digest: str) -> bool:
        """Whether the cluster stores this archive (asked first: an unchanged folder is not
        sent again). FailedPrecondition when its name holds something else."""
        try:
            ds = self.dataset(ca.dataset_name(digest))
        except NotFound:
            return False
        if len(ds.shards) != 1 or ds.shards[0].id != digest:
            raise FailedPrecondition(
                f"dataset {ca.dataset_name(digest)} does not hold the code archive its name says; "
                "its owner or an admin must delete it (lepton-ctl data rm)")
        return True

    def _put_code(self, archive: ca.Archive) -> None:
        meta = dpb.Shard(id=archive.digest, size=archive.size, rows=0, dtype=ca.ARCHIVE_DTYPE)
        name = ca.dataset_name(archive.digest)
        try:
            try:
                self.put_shards(name, [meta], {archive.digest: archive.path}, replicas=CODE_REPLICAS,
                                source="code archive")
            except FailedPrecondition:  # fewer ready nodes than copies: one copy will do
                self.put_shards(name, [meta], {archive.digest: archive.path}, replicas=1,
                                source="code archive")
        except LeptonError:
            if self._has_code(archive.digest):  # someone stored the same folder meanwhile
                return
            raise

    def _with_code(self, options: Mapping[str, Any], shipped: dict[str, str] | None = None) -> dict[str, Any]:
        """Submit keywords with `working_dir` replaced by the `code_digest` of the stored
        folder. `shipped` (folder -> digest) spares packing a folder twice in one call."""
        out = dict(options)
        folder = out.pop("working_dir", None)
        if folder is None or folder == "":
            return out
        if out.get("code_digest"):
            raise InvalidArgument("give working_dir or code_digest, not both")
        if not isinstance(folder, (str, os.PathLike)):
            raise InvalidArgument(f"working_dir must be a folder path, not {type(folder).__name__}")
        key = os.path.abspath(folder)
        if shipped is None or key not in shipped:
            digest = self.push_code(folder).digest
            if shipped is not None:
                shipped[key] = digest
        else:
            digest = shipped[key]
        out["code_digest"] = digest
        return out
