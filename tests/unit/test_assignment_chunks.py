"""Assignment sets in chunks (issue 14): the leader cuts a set too large for one message,
the agent acts only on the whole set, and a broken stream never hands on part of one."""

from __future__ import annotations

from lepton.agent.assignments import AssignmentChunks
from lepton.common import validation as v
from lepton.v1 import tasks_pb2
from tests.unit.link_fakes import wait_until
from tests.unit.test_assignment_loop import A, assignment_set, world  # noqa: F401 - the fixture


def chunked(term: int, *pairs: tuple[str, int], per: int) -> list[tasks_pb2.AssignmentSet]:
    """`pairs` as the leader sends them: `per` assignments a message, `more` on all but the last."""
    whole = assignment_set(term, *pairs).assignments
    runs = [whole[k:k + per] for k in range(0, len(whole), per)] or [[]]
    return [tasks_pb2.AssignmentSet(term=term, assignments=r, more=k < len(runs) - 1) for k, r in enumerate(runs)]


def test_the_leader_cuts_a_large_set_to_fit_and_keeps_its_order() -> None:
    big = tasks_pb2.TaskSpec(argv=["echo", "x" * 900_000])  # a large-but-allowed spec
    sets = [tasks_pb2.Assignment(task_id=f"t{i}", attempt=1, spec=big) for i in range(40)]
    runs = v.batches_by_size(sets, v.ASSIGNMENT_CHUNK_BYTES)
    assert len(runs) > 1 and all(sum(a.ByteSize() for a in r) <= v.ASSIGNMENT_CHUNK_BYTES for r in runs)
    assert [a.task_id for r in runs for a in r] == [f"t{i}" for i in range(40)]
    assert len(v.batches_by_size(sets[:8], v.ASSIGNMENT_CHUNK_BYTES)) == 1  # 7 MB: whole, as before
    assert v.batches_by_size([], v.STREAM_CHUNK_BYTES) == []


def test_chunks_join_into_the_whole_set() -> None:
    j = AssignmentChunks()
    parts = chunked(3, ("t1", 1), ("t2", 1), ("t3", 2), per=2)
    assert j.add(parts[0]) is None
    whole = j.add(parts[1])
    assert [(a.task_id, a.attempt) for a in whole] == [("t1", 1), ("t2", 1), ("t3", 2)]
    assert j.add(assignment_set(3)) == []  # an empty set is whole at once


def test_a_new_term_drops_the_part_of_the_old_set() -> None:
    j = AssignmentChunks()
    assert j.add(chunked(3, ("t1", 1), ("t2", 1), per=1)[0]) is None
    whole = j.add(assignment_set(4, ("t9", 1)))
    assert [a.task_id for a in whole] == ["t9"]


async def test_the_agent_acts_only_once_a_chunked_set_is_whole(world):  # noqa: F811
    world.start(world.loop.watch())
    stream = await world.stream_at(A)
    for part in chunked(3, ("t1", 1), ("t2", 1), ("t3", 1), per=1):
        stream.push(part)
    await wait_until(lambda: world.runner.reconciled, "a reconcile")
    assert world.runner.reconciled == [([("t1", 1), ("t2", 1), ("t3", 1)], 3)]  # never a part


async def test_a_broken_stream_hands_on_no_part_of_a_set(world):  # noqa: F811
    world.start(world.loop.watch())
    stream = await world.stream_at(A)
    stream.push(chunked(3, ("t1", 1), ("t2", 1), per=1)[0])
    stream.push(None)  # the stream ends mid-set
    again = await world.stream_at(A, 2)
    again.push(assignment_set(3, ("t9", 1)))
    await wait_until(lambda: world.runner.reconciled, "a reconcile")
    assert world.runner.reconciled == [([("t9", 1)], 3)]
