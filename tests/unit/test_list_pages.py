"""ListTasks and ListNodes pages as the coordinator serves them, on a real state machine."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from lepton.common import paging
from lepton.common.errors import InvalidArgument
from lepton.coordinator.api.service import CoordinatorService
from lepton.coordinator.state.state_machine import ClusterStateMachine
from lepton.v1 import common_pb2, coordinator_pb2, state_pb2, tasks_pb2

TASKS = 2_500  # more than two pages of the largest size


async def _no_barrier() -> None:
    return None


def service() -> tuple[CoordinatorService, ClusterStateMachine]:
    sm = ClusterStateMachine()
    index = 0

    def apply(at, **op):
        nonlocal index
        index += 1
        return sm.apply(index, state_pb2.Command(at_ms=at, **op).SerializeToString())

    for n in range(3):
        apply(1, register_node=state_pb2.RegisterNodeCmd(node_id=f"n{n}", name=f"node-{2 - n}", address="x:1",
                                                         capacity=common_pb2.Capacity(cpu_logical=1)))
    batch = [state_pb2.SubmitTaskCmd(task_id=f"t-{i:05d}", spec=tasks_pb2.TaskSpec(
        argv=["true"], owner="alice" if i % 3 else "bob")) for i in range(TASKS)]
    for lo in range(0, TASKS, 500):  # five submissions, 10 ms apart: created_at_ms ties within each
        apply(1_000 + lo, submit_tasks=state_pb2.SubmitTasksCmd(tasks=batch[lo:lo + 500]))
    ctx = SimpleNamespace(state=sm, read=_no_barrier, scheduling=SimpleNamespace(reasons={}),
                          with_soft_state=lambda node: node)
    return CoordinatorService(ctx), sm


def list_tasks(svc, **fields) -> coordinator_pb2.ListTasksResponse:
    call = CoordinatorService.ListTasks.__wrapped__  # past the gRPC boundary: errors raise
    return asyncio.run(call(svc, coordinator_pb2.ListTasksRequest(**fields), None))


def all_pages(svc, **fields) -> tuple[list[str], int]:
    ids, token, pages = [], "", 0
    while True:
        resp = list_tasks(svc, page_token=token, **fields)
        ids += [t.id for t in resp.tasks]
        pages += 1
        token = resp.next_page_token
        if not token:
            return ids, pages


def test_pages_walk_every_task_once_in_creation_order_both_ways():
    svc, sm = service()
    expected = [t.id for t in sorted(sm.tasks.tasks.values(), key=lambda t: (t.created_at_ms, t.id))]
    ids, pages = all_pages(svc, page_size=10_000)  # cut to the server's maximum
    assert ids == expected and pages == 3
    newest, _ = all_pages(svc, page_size=700, newest_first=True)
    assert newest == expected[::-1]
    first = list_tasks(svc)
    assert len(first.tasks) == paging.DEFAULT_PAGE and first.next_page_token


def test_filters_and_the_older_clients_limit():
    svc, _ = service()
    bobs, _ = all_pages(svc, owner="bob")
    assert len(bobs) == len(range(0, TASKS, 3)) and all(int(i[2:]) % 3 == 0 for i in bobs)
    assert all_pages(svc, id_prefix="t-0012")[0] == [f"t-0012{d}" for d in range(10)]
    assert all_pages(svc, states=[tasks_pb2.TASK_STATE_RUNNING])[0] == []
    legacy = list_tasks(svc, limit=3)  # the newest three, oldest first, no token
    assert [t.id for t in legacy.tasks] == ["t-02497", "t-02498", "t-02499"] and not legacy.next_page_token


def test_bad_tokens_and_sizes_are_invalid_argument():
    svc, _ = service()
    with pytest.raises(InvalidArgument, match="page_token"):
        list_tasks(svc, page_token="garbage")
    nodes_token = asyncio.run(CoordinatorService.ListNodes.__wrapped__(
        svc, coordinator_pb2.ListNodesRequest(page_size=1), None)).next_page_token
    with pytest.raises(InvalidArgument, match="page_token"):
        list_tasks(svc, page_token=nodes_token)  # a node list's token: (name, id), not (time, id)


def test_nodes_page_by_name():
    svc, _ = service()
    names, token = [], ""
    while True:
        resp = asyncio.run(CoordinatorService.ListNodes.__wrapped__(
            svc, coordinator_pb2.ListNodesRequest(page_size=2, page_token=token), None))
        names += [n.name for n in resp.nodes]
        token = resp.next_page_token
        if not token:
            break
    assert names == ["node-0", "node-1", "node-2"]
