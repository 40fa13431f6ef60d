"""Code archives (`--working-dir`): what is packed (ignore rules), that the same folder gives
the same bytes, the caps, and that unpacking refuses whatever could write outside its folder."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from lepton.common.errors import FailedPrecondition, InvalidArgument
from lepton.dataplane.code_archive import check_code_dataset, link_problem, pack_folder, unpack


def write(root: Path, rel: str, text: str = "x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "proj"
    write(root, "train.py", "import helper\n")
    write(root, "helper.py", "X = 1\n")
    write(root, "pkg/__init__.py", "")
    write(root, "pkg/mod.py", "V = 2\n")
    return root


def test_the_same_folder_gives_the_same_bytes_whatever_the_times(project, tmp_path):
    first = pack_folder(project, tmp_path / "a.tgz")
    os.utime(project / "helper.py", (1, 1))
    os.utime(project / "pkg", (12345, 12345))
    second = pack_folder(project, tmp_path / "b.tgz")
    assert first.digest == second.digest
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()
    assert names(tmp_path / "a.tgz") == ["helper.py", "pkg", "pkg/__init__.py", "pkg/mod.py", "train.py"]
    with tarfile.open(tmp_path / "a.tgz") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar} == {(0, 0, 0, "")}


def test_a_changed_file_or_exec_bit_changes_the_digest(project, tmp_path):
    base = pack_folder(project, tmp_path / "a.tgz").digest
    write(project, "helper.py", "X = 2\n")
    edited = pack_folder(project, tmp_path / "b.tgz").digest
    os.chmod(project / "train.py", 0o755)
    executable = pack_folder(project, tmp_path / "c.tgz").digest
    assert len({base, edited, executable}) == 3
    with tarfile.open(tmp_path / "c.tgz") as tar:
        assert tar.getmember("train.py").mode == 0o755
        assert tar.getmember("helper.py").mode == 0o644


def test_ignore_rules_gitignore_nested_and_leptonignore(project, tmp_path):
    write(project, ".git/HEAD")
    write(project, ".venv/bin/python")
    write(project, ".lepton-local/agent-1/agent.log")
    write(project, "pkg/__pycache__/mod.cpython-311.pyc")
    write(project, "stray.pyc")
    write(project, "data/big.bin")
    write(project, "logs/run.log")
    write(project, "keep.log")
    write(project, "pkg/notes.txt")
    write(project, "pkg/local.cfg")
    write(project, ".gitignore", "data/\n*.log\n")
    write(project, "pkg/.gitignore", "*.txt\n")  # only for pkg/
    write(project, "notes.txt")  # not under pkg: stays
    write(project, ".leptonignore", "pkg/local.cfg\n!keep.log\n")
    got = names(pack_folder(project, tmp_path / "a.tgz").path)
    # logs/ stays, empty: folders are kept, only what the rules name is left out.
    assert got == [".gitignore", ".leptonignore", "helper.py", "keep.log", "logs", "notes.txt", "pkg",
                   "pkg/.gitignore", "pkg/__init__.py", "pkg/mod.py", "train.py"]


def test_size_cap_refuses_with_what_to_do_and_a_warning_below_it(project, tmp_path):
    write(project, "weights.bin", os.urandom(64 * 1024).hex())
    with pytest.raises(InvalidArgument, match="packs to more than 16.0 KiB, the most it may: .*.leptonignore"):
        pack_folder(project, tmp_path / "a.tgz", max_bytes=16 * 1024)
    archive = pack_folder(project, tmp_path / "b.tgz", warn_bytes=1024)
    assert len(archive.warnings) == 1 and ".leptonignore" in archive.warnings[0]
    assert not pack_folder(project, tmp_path / "c.tgz").warnings


def test_file_count_cap_and_missing_folder(project, tmp_path):
    with pytest.raises(InvalidArgument, match="more than 3 files"):
        pack_folder(project, tmp_path / "a.tgz", max_members=3)
    with pytest.raises(InvalidArgument, match="not a folder"):
        pack_folder(tmp_path / "nope", tmp_path / "b.tgz")


def test_links_inside_are_kept_links_out_refused(project, tmp_path):
    os.symlink("helper.py", project / "alias.py")
    os.symlink("../helper.py", project / "pkg/up.py")
    archive = pack_folder(project, tmp_path / "a.tgz")
    out = tmp_path / "out"
    unpack(archive.path, out)
    assert (out / "alias.py").read_text() == "X = 1\n"
    assert (out / "pkg/up.py").read_text() == "X = 1\n"
    os.symlink("/etc/passwd", project / "secret")
    with pytest.raises(InvalidArgument, match="link secret -> /etc/passwd"):
        pack_folder(project, tmp_path / "b.tgz")
    (project / "secret").unlink()
    os.symlink("../../outside", project / "pkg/out")
    with pytest.raises(InvalidArgument, match="points out of the folder"):
        pack_folder(project, tmp_path / "c.tgz")


def test_round_trip(project, tmp_path):
    archive = pack_folder(project, tmp_path / "a.tgz")
    out = tmp_path / "out"
    assert unpack(archive.path, out) == archive.content_bytes
    for rel in ("train.py", "helper.py", "pkg/mod.py"):
        assert (out / rel).read_text() == (project / rel).read_text()


# -- hostile archives ---------------------------------------------------------------------


def tar_of(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def file(name: str) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), b"pwned"


def special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, b""


@pytest.mark.parametrize(("members", "why"), [
    ([file("/tmp/abs")], "absolute"),
    ([file("../escape")], r"'\.\.'"),
    ([file("a/../../escape")], r"'\.\.'"),
    ([special("out", tarfile.SYMTYPE, "/etc")], "absolute"),
    ([special("out", tarfile.SYMTYPE, "../..")], "points out"),
    ([special("d", tarfile.SYMTYPE, "sub"), file("d/x")], "under a link"),
    # Order-independent: the link that makes "b" lead out comes after it.
    ([special("b", tarfile.SYMTYPE, "a/.."), special("a", tarfile.SYMTYPE, ".")], "plain relative"),
    ([special("c", tarfile.SYMTYPE, "a/x"), special("a", tarfile.SYMTYPE, "sub")], "through another link"),
    ([special("h", tarfile.LNKTYPE, "train.py")], "not a file, folder or link"),
    ([special("dev", tarfile.CHRTYPE)], "not a file, folder or link"),
    ([special("fifo", tarfile.FIFOTYPE)], "not a file, folder or link"),
    ([file("x"), file("x")], "named twice"),
])
def test_unpack_refuses_what_could_write_outside(tmp_path, members, why):
    archive = tar_of(tmp_path / "evil.tgz", *members)
    dest = tmp_path / "dest"
    with pytest.raises(FailedPrecondition, match=why):
        unpack(archive, dest)
    assert not dest.exists()  # every member is checked before anything is written
    assert not (tmp_path / "escape").exists()


def test_unpack_caps_and_garbage(tmp_path):
    archive = tar_of(tmp_path / "big.tgz", (tarfile.TarInfo("a"), b"x" * 5000))
    with pytest.raises(FailedPrecondition, match="more than"):
        unpack(archive, tmp_path / "d1", max_bytes=4096)
    many = tar_of(tmp_path / "many.tgz", *(file(f"f{i}") for i in range(5)))
    with pytest.raises(FailedPrecondition, match="more than 4 members"):
        unpack(many, tmp_path / "d2", max_members=4)
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not a tarball at all")
    with pytest.raises(FailedPrecondition, match="not a readable tar.gz"):
        unpack(junk, tmp_path / "d3")


@pytest.mark.parametrize(("name", "target", "links", "ok"), [
    ("a", "b", set(), True),
    ("d/a", "../b", set(), True),
    ("d/a", "../../b", set(), False),
    ("a", "./b", set(), False),
    ("a", "x/../b", set(), False),
    ("a", "l/b", {"l"}, False),
    ("a", "l", {"l"}, True),  # a link to a link: each is checked on its own
    ("a", "", set(), False),
])
def test_link_problem(name, target, links, ok):
    assert (link_problem(name, target, links) == "") is ok


def test_code_dataset_names_hold_only_their_own_archive():
    digest = "ab" * 32
    check_code_dataset(f"code-{digest}", [digest])
    check_code_dataset("code-review", ["cd" * 32, "ef" * 32])  # not a digest: any dataset
    check_code_dataset("digits", ["cd" * 32])
    for shards in ([], ["cd" * 32], [digest, "cd" * 32]):
        with pytest.raises(InvalidArgument, match="kept for code archives"):
            check_code_dataset(f"code-{digest}", shards)
