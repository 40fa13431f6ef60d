"""Code archives: a `--working-dir` folder as one deterministic tar.gz, and its safe unpacking.

`pack_folder` walks the folder in sorted order and writes a gzip'd tar whose bytes depend
only on the files' names, contents and executable bits (mtimes, owners and gzip's header
time are zeroed), so the same folder always gives the same SHA-256: the archive's digest is
its blob id in the shard store, and an unchanged folder is never uploaded twice.

What is left out, git's way (`pathspec.GitIgnoreSpec`): `.git/`, `__pycache__/`, `*.pyc`,
`.venv/` and `.lepton-local/` always; the patterns of every `.gitignore` in the folder
(each for the folder it sits in, deeper ones winning); then the root's `.leptonignore`
(last, so `!name` there brings back what a .gitignore left out). Symbolic links are kept as links when they point inside the
folder; one that points out is an error. Sockets, FIFOs and devices are skipped.

`unpack` refuses anything that could write outside its destination: absolute names, `..`,
links that lead out (or through another link), hard links, devices; and caps the member
count and the unpacked size (an archive from the network is not trusted).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from lepton.common.errors import FailedPrecondition, InvalidArgument
from lepton.common.validation import check_sha256_hex

# The archive of a folder, compressed: refused above this, warned about above WARN_BYTES.
MAX_ARCHIVE_BYTES = 100 << 20
WARN_ARCHIVE_BYTES = 10 << 20
# Files (and folders) in one archive; unpacked bytes an agent accepts.
MAX_MEMBERS = 100_000
MAX_UNPACKED_BYTES = 1 << 30
LEPTONIGNORE = ".leptonignore"
# Never shipped: git's store, bytecode, a virtualenv, `lepton-ctl local up`'s data dir.
ALWAYS_IGNORED = (".git/", "__pycache__/", "*.pyc", ".venv/", ".lepton-local/")
# The dataset a code archive is stored as (one shard, whose id is the digest).
DATASET_PREFIX = "code-"
ARCHIVE_DTYPE = "tar.gz"  # the shard's dtype: not an array


def dataset_name(digest: str) -> str:
    return DATASET_PREFIX + check_digest(digest)


def check_code_dataset(name: str, shard_ids: list[str]) -> None:
    """A dataset named `code-<sha256>` holds exactly that one blob, so that nobody can put
    other bytes under the name a folder's archive will have. Raises InvalidArgument."""
    digest = name[len(DATASET_PREFIX):]
    if name.startswith(DATASET_PREFIX) and _looks_like_digest(digest) and shard_ids != [digest]:
        raise InvalidArgument(f"dataset {name[:20]}...: names code-<sha256> are kept for code "
                              "archives (--working-dir), whose one shard has that id")


def _looks_like_digest(text: str) -> bool:
    try:
        check_sha256_hex(text, "")
    except InvalidArgument:
        return False
    return True


def check_digest(value: object) -> str:
    """A code digest: 64 lowercase hex digits (a SHA-256). Raises InvalidArgument."""
    return check_sha256_hex(value, "code digest")


@dataclass
class Archive:
    path: Path
    digest: str  # SHA-256 hex of the archive's bytes
    size: int  # bytes of the archive (compressed)
    files: int  # regular files and links in it
    content_bytes: int  # their sizes, uncompressed
    warnings: list[str] = field(default_factory=list)


class _Ignore:
    """The ignore rules of one folder tree: the specs of each `.gitignore` met on the way
    down, then `.leptonignore`, evaluated in that order so the last match wins."""

    def __init__(self, root: Path):
        import pathspec

        self._spec = pathspec.GitIgnoreSpec.from_lines
        self._rules: list[tuple[str, object]] = [("", self._spec(ALWAYS_IGNORED))]
        self._last: list[tuple[str, object]] = []
        extra = root / LEPTONIGNORE
        if extra.is_file():
            self._last.append(("", self._spec(_lines(extra))))

    def enter(self, rel_dir: str, folder: Path) -> None:
        """Take the `.gitignore` of `folder` (at `rel_dir`, "" for the root) into account."""
        gi = folder / ".gitignore"
        if gi.is_file():
            self._rules.append((rel_dir, self._spec(_lines(gi))))

    def ignored(self, rel: str, is_dir: bool) -> bool:
        verdict = False
        for base, spec in (*self._rules, *self._last):
            if base and not rel.startswith(base + "/"):
                continue
            sub = rel[len(base) + 1:] if base else rel
            result = spec.check_file(sub + "/" if is_dir else sub)
            if result.include is not None:
                verdict = result.include
        return verdict


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror or err}") from None


def _size_text(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def pack_folder(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_ARCHIVE_BYTES,
    warn_bytes: int = WARN_ARCHIVE_BYTES,
    max_members: int = MAX_MEMBERS,
) -> Archive:
    """Pack `folder` into the file `out` (see the module doc). Raises InvalidArgument for a
    folder that is missing, holds a link that points out of it, or whose archive would pass
    `max_bytes` (saying what to do about it)."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidArgument(f"--working-dir {folder}: not a folder")
    root = root.resolve()
    entries = _walk(root, max_members)
    warnings: list[str] = []
    content = sum(size for _, _, size in entries)
    if content > MAX_UNPACKED_BYTES:
        raise InvalidArgument(_too_big(root, f"holds {_size_text(content)} of files to ship; at most {_size_text(MAX_UNPACKED_BYTES)}"))
    digest = hashlib.sha256()
    written = [0]
    with open(out, "wb") as raw:
        sink = _Hashing(raw, digest, written, max_bytes, root)
        with gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=6) as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel, st, _ in entries:
                _add(tar, root, rel, st)
    if written[0] > warn_bytes:
        warnings.append(f"the code of {root} is {_size_text(written[0])} packed; "
                        f"list what the task does not need in {root / LEPTONIGNORE}")
    files = sum(1 for _, st, _ in entries if not stat.S_ISDIR(st.st_mode))
    return Archive(Path(out), digest.hexdigest(), written[0], files, content, warnings)


def _too_big(root: Path, what: str) -> str:
    return (f"--working-dir {root} {what}: list large files and folders (data, checkpoints, "
            f"environments) in {root / LEPTONIGNORE} or .gitignore")


class _Hashing(io.RawIOBase):
    """The archive file's writer: hashes what passes and stops at the size cap."""

    def __init__(self, raw, digest, written: list[int], cap: int, root: Path):
        self._raw, self._digest, self._written, self._cap, self._root = raw, digest, written, cap, root

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._written[0] += len(data)
        if self._written[0] > self._cap:
            raise InvalidArgument(_too_big(self._root, f"packs to more than {_size_text(self._cap)}, the most it may"))
        self._digest.update(data)
        return self._raw.write(data)


def _walk(root: Path, max_members: int) -> list[tuple[str, os.stat_result, int]]:
    """(relative name, lstat, size) of everything to pack, sorted by name, folders first
    among their own contents."""
    rules = _Ignore(root)
    out: list[tuple[str, os.stat_result, int]] = []

    def visit(folder: Path, rel_dir: str) -> None:
        rules.enter(rel_dir, folder)
        try:
            names = sorted(os.listdir(folder))
        except OSError as err:
            raise InvalidArgument(f"cannot list {folder}: {err.strerror or err}") from None
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            path = folder / name
            st = path.lstat()
            is_dir = stat.S_ISDIR(st.st_mode)
            if rules.ignored(rel, is_dir):
                continue
            if not (is_dir or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                continue  # sockets, FIFOs, devices: nothing a task could use from a copy
            out.append((rel, st, st.st_size if stat.S_ISREG(st.st_mode) else 0))
            if len(out) > max_members:
                raise InvalidArgument(
                    f"--working-dir {root} holds more than {max_members} files and folders to ship; "
                    f"list what the task does not need in {root / LEPTONIGNORE} or .gitignore")
            if is_dir:
                visit(path, rel)

    visit(root, "")
    links = {rel: os.readlink(root / rel) for rel, st, _ in out if stat.S_ISLNK(st.st_mode)}
    for rel, target in links.items():
        if why := link_problem(rel, target, set(links)):
            raise InvalidArgument(f"--working-dir {root}: the link {rel} -> {target} {why}; copy "
                                  f"what it points to in, or list it in {LEPTONIGNORE}")
    return out


def link_problem(name: str, target: str, links: set[str]) -> str:
    """Why the link `name` -> `target` (names relative to the top) could lead out of the
    top, or "" when it cannot. A target is relative, climbs with leading `..` only, and
    passes through no other link (`links`): then where it leads on disk is where it leads
    on paper, whatever order the links are made in."""
    if not target or "\0" in target or posixpath.isabs(target):
        return "is absolute"
    parts = target.split("/")
    climb = 0
    while climb < len(parts) and parts[climb] == "..":
        climb += 1
    rest = parts[climb:]
    if any(p in ("", ".", "..") for p in rest[:-1]) or (rest and rest[-1] in (".", "..")):
        return "is not a plain relative path (., .. or // after the start)"
    base = name.split("/")[:-1]
    if climb > len(base):
        return "points out of the folder"
    here = base[:len(base) - climb]
    for part in rest[:-1]:
        here = [*here, part]
        if "/".join(here) in links:
            return "passes through another link"
    return ""


def _add(tar: tarfile.TarFile, root: Path, rel: str, st: os.stat_result) -> None:
    info = tarfile.TarInfo(rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    executable = bool(st.st_mode & 0o111)
    if stat.S_ISDIR(st.st_mode):
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, os.readlink(root / rel)
        tar.addfile(info)
    else:
        info.mode = 0o755 if executable else 0o644
        info.size = st.st_size
        with open(root / rel, "rb") as f:
            tar.addfile(info, f)


# -- unpacking ------------------------------------------------------------------------------


def check_member(m: tarfile.TarInfo, links: set[str]) -> str:
    """The member's normalised name; raises FailedPrecondition when it could write outside
    the destination or is not a plain file, folder or inward link. `links`: the names of
    every link in the archive (nothing may be written through one, wherever it comes)."""
    name = m.name.rstrip("/") if m.isdir() else m.name
    if not name or "\0" in name or posixpath.isabs(name) or name.startswith("\\"):
        raise FailedPrecondition(f"code archive: refused member {name!r}: an absolute name")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise FailedPrecondition(f"code archive: refused member {name!r}: '..', '.' or '//' in its name")
    for i in range(1, len(parts)):
        if "/".join(parts[:i]) in links:
            raise FailedPrecondition(f"code archive: refused member {name!r}: it is under a link")
    if m.issym():
        if why := link_problem(name, m.linkname, links):
            raise FailedPrecondition(f"code archive: refused link {name!r} -> {m.linkname!r}: it {why}")
    elif not (m.isreg() or m.isdir()):
        raise FailedPrecondition(f"code archive: refused member {name!r}: not a file, folder or link")
    return name


def unpack(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_UNPACKED_BYTES,
    max_members: int = MAX_MEMBERS,
) -> int:
    """Unpack `archive` into the folder `dest` (made; must not exist). Returns the bytes
    written. Raises FailedPrecondition for an archive that breaks a rule (see
    `check_member`; a name twice), passes a cap, or is not a tar.gz; `dest` may then hold
    part of it. Every member is checked before anything is written."""
    dest_path = Path(dest)
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members: list[tarfile.TarInfo] = []
            total = 0
            for m in tar:  # headers only: contents are read at extraction
                members.append(m)
                if len(members) > max_members:
                    raise FailedPrecondition(f"code archive: more than {max_members} members")
                total += m.size if m.isreg() else 0
                if total > max_bytes:
                    raise FailedPrecondition(f"code archive: unpacks to more than {_size_text(max_bytes)}")
            links = {m.name for m in members if m.issym()}
            seen: set[str] = set()
            for m in members:
                name = check_member(m, links)
                if name in seen:
                    raise FailedPrecondition(f"code archive: refused member {name!r}: named twice")
                seen.add(name)
            dest_path.mkdir(mode=0o700)
            for m in members:
                # The 'data' filter too: a second line against anything check_member missed.
                tar.extract(m, dest_path, filter="data")
    except tarfile.FilterError as err:
        raise FailedPrecondition(f"code archive: refused: {err}") from None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise FailedPrecondition(f"code archive: not a readable tar.gz ({err})") from None
    except OSError as err:
        raise FailedPrecondition(f"code archive: cannot unpack into {dest_path}: {err.strerror or err}") from None
    return total
