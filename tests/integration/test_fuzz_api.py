"""Fuzz the API of ONE real `lepton-agent`: random, malformed and oversized requests to every
method of every `lepton.v1` service it serves.

Every call must end with a clean status code (never UNKNOWN, never INTERNAL), the daemon must
stay up, and a refused call must leave the cluster state as it was (nodes, tasks, datasets
and the commit index, read before and after).

`test_every_reflected_method` also asks each agent's reflection service what it serves (a
Raft node waiting to join included, so Raft and Health are reached too) and feeds every
method malformed and random bytes: no UNKNOWN or INTERNAL, and no traceback in the log.

Two kinds of input: raw bytes sent with no serializer (`channel.unary_unary(path)`), and
well-typed random messages built from the proto descriptors (hypothesis). Typed requests are
defused where a success would have side effects outside the test: every TaskSpec carries
a constraint no node matches (so random commands never run), and addresses are loopback
ports nothing listens on. Liveness timers are an hour, so fake nodes a fuzzed RegisterNode
adds never change state behind the test's back.
"""

from __future__ import annotations

import os
import random
import string
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.v1 import agent_pb2, coordinator_pb2, datasets_pb2, raft_pb2, serving_pb2
from lepton.v1.coordinator_pb2_grpc import CoordinatorStub
from lepton.v1.datasets_pb2_grpc import DatasetsStub
from tests.integration.cluster import AgentProcess, wait_until

# One worker for the module: its agents (module fixtures) start once, not once per worker,
# and test_agent_is_still_healthy, last, looks at the agent every fuzz test hit.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("fuzz_api")]

SERVICES = [
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"],
    agent_pb2.DESCRIPTOR.services_by_name["Agent"],
    datasets_pb2.DESCRIPTOR.services_by_name["Datasets"],
    datasets_pb2.DESCRIPTOR.services_by_name["Shards"],
    raft_pb2.DESCRIPTOR.services_by_name["Raft"],  # not served by a single voter: UNIMPLEMENTED
    serving_pb2.DESCRIPTOR.services_by_name["Inference"],  # every agent's Predict
]  # test_every_reflected_method reaches a Raft node
METHODS: list[MethodDescriptor] = [m for s in SERVICES for m in s.methods]
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# The outcome of a call we cut short is unknown by definition: no before/after comparison.
UNKNOWN_OUTCOME = {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
UNARY_TIMEOUT_S = 5.0
STREAM_TIMEOUT_S = 1.0  # watches never end on their own
MAX_STREAM_ITEMS = 3
SLOW = ["--suspect-after", "3600", "--down-after", "3600", "--failover-grace", "3600"]
# LEPTON_FUZZ_EXAMPLES=2000 for a deeper local run; 60 keeps CI under a minute.
FUZZ = settings(max_examples=int(os.environ.get("LEPTON_FUZZ_EXAMPLES", "60")), deadline=None,
                database=None, suppress_health_check=list(HealthCheck))


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# -- the agent and its state ------------------------------------------------------------------
class Target:
    def __init__(self, agent: AgentProcess):
        self.agent = agent
        self.channel = grpc.insecure_channel(agent.address)
        self.coordinator = CoordinatorStub(self.channel)
        self.datasets = DatasetsStub(self.channel)

    def state(self) -> tuple:
        """What a refused call must not change. Soft state (usage, heartbeat times, why a
        task waits) is left out: it moves on its own."""
        nodes = self.coordinator.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=10).nodes
        tasks = self.coordinator.ListTasks(coordinator_pb2.ListTasksRequest(), timeout=10).tasks
        sets = self.datasets.ListDatasets(datasets_pb2.ListDatasetsRequest(), timeout=10).datasets
        status = self.coordinator.GetClusterStatus(coordinator_pb2.GetClusterStatusRequest(), timeout=10)
        return (
            tuple((n.id, n.name, n.address, n.state, n.draining, n.voter, dict(n.labels).__repr__()) for n in nodes),
            tuple((t.id, t.state, t.attempt, t.node_id, t.failures) for t in tasks),
            tuple((d.name, d.version, len(d.shards)) for d in sets),
            status.commit_index,
        )

    def alive(self) -> None:
        rc = self.agent.proc.poll()
        assert rc is None, f"the agent died (exit {rc}):\n{self.agent.log()}"

    def call(self, method: MethodDescriptor, payloads: list[bytes],
             stream_timeout_s: float = STREAM_TIMEOUT_S) -> tuple[grpc.StatusCode, str]:
        """Send raw request bytes; (code, details). A stream is read for a few items only."""
        path = path_of(method)
        try:
            if method.client_streaming:
                it = self.channel.stream_stream(path)(iter(payloads), timeout=stream_timeout_s)
                self._drain(it)
            elif method.server_streaming:
                it = self.channel.unary_stream(path)(payloads[0], timeout=stream_timeout_s)
                self._drain(it)
            else:
                self.channel.unary_unary(path)(payloads[0], timeout=UNARY_TIMEOUT_S)
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as err:
            return err.code(), err.details() or ""

    @staticmethod
    def _drain(it: Any) -> None:
        for n, _ in enumerate(it, 1):
            if n >= MAX_STREAM_ITEMS:
                it.cancel()
                return

    def check(self, method: MethodDescriptor, payloads: list[bytes], what: str,
              stream_timeout_s: float = STREAM_TIMEOUT_S) -> grpc.StatusCode:
        before = self.state()
        code, details = self.call(method, payloads, stream_timeout_s)
        self.alive()
        assert code not in BAD_CODES, (
            f"{path_of(method)} answered {code.name} to {what} "
            f"{[p[:80] for p in payloads]!r}: {details}\n{self.agent.log()[-2000:]}")
        if code not in UNKNOWN_OUTCOME:
            after = self.state()
            assert after == before, (
                f"{path_of(method)} refused {what} with {code.name} ({details}) but changed the state:\n"
                f"before {before}\nafter  {after}")
        return code


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    agent = AgentProcess(tmp_path_factory.mktemp("fuzz"), "fuzz", SLOW).start()
    t = Target(agent)
    try:
        t.state()  # serving, and leader
        yield t
    finally:
        t.channel.close()
        agent.stop()


# -- raw bytes ------------------------------------------------------------------------------------
MALFORMED = {
    "empty": b"",
    "0xff": b"\xff" * 7,
    "bad utf-8 in field 1": b"\x0a\x02\xc3\x28",
    "truncated length": b"\x0a\xff\xff\xff\xff\x0f",
    "varint overflow": b"\x08" + b"\xff" * 11,
    "nested groups": b"\x7b" * 5000 + b"\x7c" * 5000,
    "unbalanced group": b"\x7b" * 50,
    "wrong wire type": b"\x0d\x00\x00\x00\x00",
    "huge field number": b"\xfa\xff\xff\xff\x0f\x00",
    "random": bytes(range(256)),
}


@pytest.mark.parametrize("method", METHODS, ids=path_of)
def test_malformed_bytes(target, method):
    for what, payload in MALFORMED.items():
        target.check(method, [payload, payload] if method.client_streaming else [payload], what)


@pytest.mark.parametrize("method", [
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name["SubmitTask"],
    coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name["WatchNodes"],
    datasets_pb2.DESCRIPTOR.services_by_name["Shards"].methods_by_name["WriteShard"],
], ids=path_of)
def test_oversized_message(target, method):
    blob = b"\x0a" + b"\xff" * 3 + b"\x0f" + os.urandom(16 * 1024 * 1024 + 1)
    # Sending 16 MiB took over the 1 s a watch gets on a loaded 2-core machine.
    code = target.check(method, [blob], "an oversized message (16 MiB + 6 bytes)", UNARY_TIMEOUT_S)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


@FUZZ
@given(data=st.data())
def test_fuzz_random_bytes(target, data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    payloads = [data.draw(st.binary(max_size=512), label="payload") for _ in range(count)]
    target.check(method, payloads, "random bytes")


# -- typed random messages ---------------------------------------------------------------------
SHARD_ID = st.one_of(st.text(string.hexdigits.lower()[:16], min_size=64, max_size=64),
                     st.sampled_from(["0" * 64, "f" * 64, "../" * 21 + "a"]), st.text(max_size=70))
ADDRESS = st.sampled_from(["127.0.0.1:1", "[::1]:1", "localhost:1", "127.0.0.1:0", "", ":", "127.0.0.1",
                           "127.0.0.1:99999", "10.255.255.1"])
TEXT = st.one_of(st.text(max_size=24), st.sampled_from(
    ["", "a", "node-0001", "x" * 300, "../../etc/passwd", "\x00", "é", "{}", "[]", "null",
     '{"steps": [{"op": "normalize"}]}', '{"stats": ["mean"]}', "NaN"]))
NAMED: dict[str, st.SearchStrategy[Any]] = {
    "address": ADDRESS, "addresses": ADDRESS, "sources": ADDRESS,
    "shard_id": SHARD_ID, "shard_ids": SHARD_ID,
}
_INT = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(fd: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if fd.name in NAMED:
        return NAMED[fd.name]
    t = fd.type
    if t in _INT:
        lo, hi = _INT[t]
        return st.one_of(st.integers(lo, hi), st.sampled_from(sorted({max(lo, 0), min(hi, 1), hi, lo})))
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers too
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), st.integers(-3, 50))
    return message_of(fd.message_type, depth + 1)


def message_of(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, val_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            fields[fd.name] = st.dictionaries(_scalar(key_fd, depth), _scalar(val_fd, depth), max_size=3)
        elif fd.is_repeated:
            fields[fd.name] = st.lists(_scalar(fd, depth), max_size=3)
        else:
            fields[fd.name] = _scalar(fd, depth)
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _build(cls: Any, values: dict[str, Any]) -> Any:
    msg = cls()
    for name, value in values.items():
        fd = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name) if fd.is_repeated or fd.message_type is not None else None
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            val_is_msg = fd.message_type.fields_by_name["value"].message_type is not None
            for k, v in value.items():
                if val_is_msg:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif fd.is_repeated:
            if fd.message_type is not None:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif fd.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def _defuse(method: MethodDescriptor, msg: Any) -> Any:
    """Keep a fuzzed success from acting outside the test (see the module docstring)."""
    for fd in msg.DESCRIPTOR.fields:  # SubmitTask, SubmitJob, and whatever comes next
        if fd.message_type is not None and fd.message_type.full_name == "lepton.v1.TaskSpec" and not fd.is_repeated:
            getattr(msg, fd.name).constraints["lepton.fuzz"] = "never-matches"
    if method.name == "RegisterNode":
        msg.labels.pop("lepton.fuzz", None)
    return msg


REQUESTS: dict[str, st.SearchStrategy[Any]] = {m.full_name: message_of(m.input_type) for m in METHODS}


@FUZZ
@given(data=st.data())
def test_fuzz_typed_messages(target, data):
    method = data.draw(st.sampled_from(METHODS), label="method")
    count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
    messages = [_defuse(method, data.draw(REQUESTS[method.full_name], label="request")) for _ in range(count)]
    target.check(method, [m.SerializeToString() for m in messages], "a typed random request")


# -- every method the agents serve, as reflection lists them -------------------------------------
@pytest.fixture(scope="module")
def raft_node(target, tmp_path_factory):
    """A Raft node waiting to be added as a voter: it serves Raft, unlike a single voter."""
    agent = AgentProcess(tmp_path_factory.mktemp("fuzz-raft"), "fuzz-raft",
                         [*SLOW, "--join", target.agent.address, "--join-as-voter"]).start()
    joined = Target(agent)
    try:
        # Registered before any test compares the target's node table.
        wait_until(lambda: agent.node_id in {n[0] for n in target.state()[0]}, timeout=60,
                   what="the Raft node to register")
        yield joined
    finally:
        joined.channel.close()
        agent.stop()


def reflected_methods(channel: grpc.Channel) -> list[MethodDescriptor]:
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    return [m for name in database.get_services() for m in pool.FindServiceByName(name).methods]


def test_every_reflected_method(target, raft_node):
    rng = random.Random(12)
    for agent in (target, raft_node):
        methods = reflected_methods(agent.channel)
        services = {m.containing_service.full_name for m in methods}
        assert {"grpc.health.v1.Health", "lepton.v1.Shards"} <= services, services
        payloads = [*MALFORMED.values(), *(rng.randbytes(rng.randint(1, 512)) for _ in range(20))]
        for method in methods:
            for payload in payloads:
                code, details = agent.call(method, [payload, payload] if method.client_streaming else [payload])
                assert code not in BAD_CODES, f"{path_of(method)} answered {code.name}: {details}"
            agent.alive()
        assert "Traceback" not in agent.agent.log_path.read_text(errors="replace"), agent.agent.log()
    assert "lepton.v1.Raft" in services  # the Raft node's


# -- standard services and the end state ----------------------------------------------------
STANDARD: list[tuple[str, Callable[[grpc.Channel, bytes], Any]]] = [
    ("/grpc.health.v1.Health/Check",
     lambda ch, p: ch.unary_unary("/grpc.health.v1.Health/Check")(p, timeout=UNARY_TIMEOUT_S)),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
     lambda ch, p: list(ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")(
         iter([p]), timeout=UNARY_TIMEOUT_S))),
]


@pytest.mark.parametrize("path, send", STANDARD, ids=[p for p, _ in STANDARD])
def test_standard_services_malformed(target, path, send):
    """grpc's own services too: the agent registers them through register_service, so a
    malformed request is INVALID_ARGUMENT, not grpc's UNKNOWN with a logged traceback."""
    codes = {}
    for what, payload in MALFORMED.items():
        try:
            send(target.channel, payload)
            codes[what] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            codes[what] = err.code()
        target.alive()
    bad = {w: c.name for w, c in codes.items() if c in BAD_CODES}
    assert not bad, f"{path} answers {bad}"


def test_agent_is_still_healthy(target):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target.alive()
    resp = health_pb2_grpc.HealthStub(target.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    nodes = target.coordinator.ListNodes(coordinator_pb2.ListNodesRequest(), timeout=5).nodes
    me = next(n for n in nodes if n.id == target.agent.node_id)
    assert me.state == 1  # NODE_STATE_READY
