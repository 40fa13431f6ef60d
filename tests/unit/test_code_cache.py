"""Shipped code on the agent: each attempt starts in a fresh, importable copy of the node's
cached tree; --task-path is the PATH tasks get; an attempt whose code cannot be fetched fails
to start saying why; a failed fetch is remembered for a while, then tried again."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from lepton.agent.code_cache import RETRY_AFTER_S, UNUSED_TREE_S, CodeCache, copy_code
from lepton.agent.tasks.runner import FAILED_TO_START_CODE, RunSpec
from lepton.common.errors import NotFound
from lepton.dataplane.code_archive import pack_folder, unpack
from tests.unit import test_runner
from tests.unit.test_runner import Node, wait_until

DIGEST = "ab" * 32
node = test_runner.node  # the runner tests' fixture: a data dir, its runners cleaned up


def tree_of(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "helper.py").write_text("NAME = 'helper'\n")
    (src / "pkg/__init__.py").write_text("")
    (src / "pkg/mod.py").write_text("V = 7\n")
    archive = pack_folder(src, tmp_path / "code.tgz")
    tree = tmp_path / "tree"
    unpack(archive.path, tree)
    return tree


def py(task_id: str, code: str, tree: Path, attempt: int = 1, **kw) -> RunSpec:
    return RunSpec(task_id=task_id, attempt=attempt, term=1, argv=(sys.executable, "-c", code),
                   code_dir=str(tree), **kw)


async def test_attempts_start_in_a_fresh_importable_copy(node: Node, tmp_path):
    tree = tree_of(tmp_path)
    r = await node.runner()
    script = ("import os, helper, pkg.mod; print(helper.NAME, pkg.mod.V, os.path.exists('mine'));"
              "open('mine', 'w').write('x'); open('../helper.py', 'a').write('# edited')")
    r.launch(py("t", script, tree, workdir="pkg"))  # --workdir: taken from the copy
    assert (await node.exited("t")).exit_code == 0
    assert node.log("t") == "helper 7 False\n"
    r.launch(py("t", script, tree, attempt=2, workdir="pkg"))
    assert (await node.exited("t", 2)).exit_code == 0
    assert node.log("t", 2) == "helper 7 False\n"  # the first attempt's writes are not here
    assert (tree / "helper.py").read_text() == "NAME = 'helper'\n"  # the cache is untouched
    work = node.data_dir / "tasks/t/2/work"
    assert (work / "pkg/mine").exists() and (work / "helper.py").read_text().endswith("# edited")


async def test_a_missing_tree_or_a_refusal_fails_the_start_with_the_reason(node: Node, tmp_path):
    r = await node.runner()
    r.launch(py("gone", "print(1)", tmp_path / "nope"))
    ev = await node.exited("gone")
    assert ev.exit_code == FAILED_TO_START_CODE and "is missing on this node" in ev.reason
    r.refuse(py("refused", "print(1)", tmp_path / "nope"), "cannot fetch code abababababab: gone")
    ev = await node.exited("refused")
    assert (ev.exit_code, ev.reason) == (FAILED_TO_START_CODE, "failed to start: cannot fetch code abababababab: gone")
    assert "cannot fetch code" in node.log("refused")


async def test_task_path_is_the_path_tasks_get_and_the_spec_still_wins(node: Node, tmp_path):
    bindir = tmp_path / "venv-bin"
    bindir.mkdir()
    tool = bindir / "only-here"
    tool.write_text("#!/bin/sh\necho found $PATH\n")
    tool.chmod(0o755)
    r = await node.runner(task_path=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    r.launch(RunSpec(task_id="p", attempt=1, term=1, argv=("only-here",)))
    assert (await node.exited("p")).exit_code == 0
    assert node.log("p") == f"found {bindir}:/usr/bin:/bin\n"
    r.launch(RunSpec(task_id="q", attempt=1, term=1, shell="echo $PATH", env={"PATH": "/bin"}))
    await node.exited("q")
    assert node.log("q") == "/bin\n"


class GoneDatasets:
    """The leader's Datasets service, for an archive that is not stored."""

    def __init__(self):
        self.calls = 0

    async def call(self, method: str, request, timeout: float):
        self.calls += 1
        raise NotFound(f'dataset "{request.name}" not found')


async def test_a_failed_fetch_is_remembered_then_retried(tmp_path):
    now = [100.0]
    datasets = GoneDatasets()
    cache = CodeCache(tmp_path, datasets, clock=lambda: now[0])
    done = asyncio.Event()
    cache.fetch(DIGEST, done.set)
    cache.fetch(DIGEST, done.set)  # under way: not a second fetch
    await asyncio.wait_for(done.wait(), 10)
    assert datasets.calls == 1 and cache.tree(DIGEST) is None
    assert cache.failure(DIGEST).startswith("cannot fetch code ababababab")
    assert "does not store it" in cache.failure(DIGEST)
    now[0] += RETRY_AFTER_S
    assert cache.failure(DIGEST) == ""  # time to try again
    await cache.close()


def test_copy_code_is_a_copy(tmp_path):
    tree = tree_of(tmp_path)
    dest = copy_code(tree, tmp_path / "work")
    (dest / "helper.py").write_text("changed")
    assert (tree / "helper.py").read_text() == "NAME = 'helper'\n"
    assert sorted(p.name for p in dest.iterdir()) == ["helper.py", "pkg"]


async def test_cache_keeps_trees_across_restarts_and_clears_partial_fetches(tmp_path):
    cache = CodeCache(tmp_path, GoneDatasets())
    (cache.root / "trees" / DIGEST).mkdir()
    (cache.root / "tmp" / DIGEST).mkdir()
    old = "cd" * 32
    (cache.root / "trees" / old).mkdir()
    long_ago = time.time() - UNUSED_TREE_S - 60
    os.utime(cache.root / "trees" / old, (long_ago, long_ago))
    os.utime(cache.root / "trees" / DIGEST, (long_ago, long_ago))
    assert cache.tree(DIGEST) is not None  # used now: kept
    again = CodeCache(tmp_path, GoneDatasets())
    assert again.tree(DIGEST) == cache.root / "trees" / DIGEST
    assert again.tree(old) is None  # unused for a week: deleted at start
    assert not (again.root / "tmp" / DIGEST).exists()


# -- the assignment loop holds attempts back while their code comes --------------------------


class FakeCode:
    """The loop's code cache: trees appear when a test says so."""

    def __init__(self, root: Path):
        self.root = root
        self.fetches: list[str] = []
        self.failed: dict[str, str] = {}
        self.ready: set[str] = set()
        self.done = None

    def tree(self, digest: str) -> Path | None:
        return self.root / digest if digest in self.ready else None

    def failure(self, digest: str) -> str:
        return self.failed.get(digest, "")

    def fetch(self, digest: str, on_done) -> None:
        self.fetches.append(digest)
        self.done = on_done


async def test_attempts_wait_for_their_code_then_start_with_it(tmp_path):
    from lepton.v1 import tasks_pb2
    from tests.unit.test_assignment_loop import A, FakeRunner, World

    class Runner(FakeRunner):
        def __init__(self):
            super().__init__()
            self.specs: list = []
            self.refused: list[tuple[str, str]] = []

        def reconcile(self, specs, term):
            self.specs.append(list(specs))
            return super().reconcile(specs, term)

        def refuse(self, spec, why):
            self.refused.append((spec.task_id, why))

    world = World(tmp_path)
    world.runner = Runner()
    world.loop.attach(world.runner)
    code = world.loop._code = FakeCode(tmp_path / "trees")
    later, broken = "cd" * 32, "ef" * 32
    code.failed[broken] = "cannot fetch code efefefefefef: gone"

    def assignment(task_id: str, digest: str = "") -> tasks_pb2.Assignment:
        return tasks_pb2.Assignment(task_id=task_id, attempt=1, term=3,
                                    spec=tasks_pb2.TaskSpec(argv=["python", "train.py"], code_digest=digest))

    try:
        world.start(world.loop.watch())
        stream = await world.stream_at(A)
        stream.push(tasks_pb2.AssignmentSet(term=3, assignments=[
            assignment("plain"), assignment("shipped", later), assignment("broken", broken)]))
        await wait_until(lambda: world.runner.reconciled, "the first reconcile")
        # "shipped" waits for its code; "broken" is refused with the reason and stays wanted.
        assert world.runner.reconciled[0] == ([("plain", 1), ("broken", 1)], 3)
        assert code.fetches == [later]
        assert world.runner.refused == [("broken", "cannot fetch code efefefefefef: gone")]
        code.ready.add(later)
        code.done()  # the fetch ended: the same set again, now with the code
        assert world.runner.reconciled[-1] == ([("plain", 1), ("shipped", 1), ("broken", 1)], 3)
        shipped = next(s for s in world.runner.specs[-1] if s.task_id == "shipped")
        assert shipped.code_dir == str(tmp_path / "trees" / later)
    finally:
        await world.stop()



@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_copy_code_belongs_to_the_task_user(tmp_path):
    from lepton.agent.tasks.task_user import TaskUser

    tree = tree_of(tmp_path)
    os.symlink("helper.py", tree / "alias.py")
    user = TaskUser("nobody", 65534, 65534, "/nonexistent", "/usr/bin/setpriv")
    dest = copy_code(tree, tmp_path / "work", user)
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [dest, *dest.rglob("*")]}
    assert owners == {(65534, 65534)}
    assert os.readlink(dest / "alias.py") == "helper.py"  # a link stays a link
