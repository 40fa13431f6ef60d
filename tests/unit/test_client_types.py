"""Conversions from the wire to lepton.client's typed results, and their JSON shapes."""

from __future__ import annotations

import json

import pytest

import lepton.client as lc
from lepton.client import ClusterStatusInfo, InvalidArgument, NodeEvent, NodeInfo
from lepton.client.testing import make_node
from lepton.client.types import state_to_proto
from lepton.common import errors
from lepton.v1 import common_pb2 as pb
from lepton.v1 import coordinator_pb2 as cpb

NODE_KEYS = {
    "id",
    "name",
    "address",
    "labels",
    "state",
    "draining",
    "voter",
    "capacity",
    "usage",
    "registered_at",
    "state_changed_at",
    "state_reason",
    "last_heartbeat_ms",
    "version",
}


def test_package_reexports_the_error_hierarchy() -> None:
    for name in (
        "LeptonError",
        "NotFound",
        "NotLeader",
        "Unavailable",
        "InvalidArgument",
        "DeadlineExceeded",
    ):
        assert getattr(lc, name) is getattr(errors, name)
    for name in lc.__all__:
        assert hasattr(lc, name)


def test_node_from_proto_with_usage_and_gpus() -> None:
    usage = pb.Usage(
        cpu_percent=12.3,
        memory_used_bytes=4 * 1024**3,
        disk_free_bytes=7,
        load1=0.3,
        gpus=[pb.Gpu(index=0, utilization_percent=55.5, memory_used_bytes=1)],
    )
    msg = make_node(
        "abc", "agent-1", gpus=2, usage=usage, labels={"z": "1", "a": "2"}, draining=True
    )
    n = NodeInfo.from_proto(msg)
    assert n.state == "ready" and n.display_state == "ready (draining)"
    assert [g.index for g in n.capacity.gpus] == [0, 1]
    assert n.capacity.gpus[0].memory_total_bytes == 80 * 1024**3
    assert n.usage is not None
    # float32 on the wire: rounded so the JSON is stable
    assert (n.usage.cpu_percent, n.usage.load1, n.usage.gpus[0].utilization_percent) == (
        12.3,
        0.3,
        55.5,
    )
    assert list(n.labels) == ["a", "z"]


def test_node_to_dict_is_the_documented_shape() -> None:
    d = NodeInfo.from_proto(make_node("abc", "agent-1", gpus=1)).to_dict()
    assert set(d) == NODE_KEYS
    assert d["usage"] is None
    assert set(d["capacity"]) == {
        "cpu_logical",
        "cpu_physical",
        "cpu_model",
        "memory_bytes",
        "disk_bytes",
        "gpus",
    }
    assert set(d["capacity"]["gpus"][0]) == {
        "index",
        "uuid",
        "name",
        "memory_total_bytes",
        "memory_used_bytes",
        "utilization_percent",
    }
    assert isinstance(d["capacity"]["memory_bytes"], int) and isinstance(d["registered_at"], int)
    json.dumps(d)  # serializable as is


def test_unknown_enum_values_do_not_crash() -> None:
    msg = make_node("abc")
    msg.state = 99  # a state from a newer server
    assert NodeInfo.from_proto(msg).state == "unknown"
    ev = NodeEvent.from_proto(cpb.NodeEvent(kind=42, node=msg))
    assert ev.kind == "unknown"


def test_cluster_status_to_dict() -> None:
    s = ClusterStatusInfo.from_proto(
        cpb.ClusterStatus(
            leader_id="a",
            leader="h:1",
            term=2,
            voters=[cpb.Voter(id="a", address="h:1")],
            nodes_by_state={"ready": 3},
            node_count=3,
        )
    )
    d = s.to_dict()
    assert set(d) == {
        "leader_id",
        "leader",
        "term",
        "commit_index",
        "applied_index",
        "voters",
        "nodes_by_state",
        "node_count",
        "version",
        "state_backend",
        "etcd_endpoints",
        "etcd_prefix",
    }
    assert d["voters"] == [
        {"id": "a", "address": "h:1", "role": "unknown", "match_index": 0, "lag": 0}
    ]
    assert d["nodes_by_state"] == {"ready": 3}


def test_node_event_to_dict() -> None:
    ev = NodeEvent.from_proto(
        cpb.NodeEvent(kind=cpb.NodeEvent.KIND_REGISTERED, node=make_node("abc"), at_ms=5, index=9)
    )
    d = ev.to_dict()
    assert (d["kind"], d["at_ms"], d["index"], d["node"]["id"]) == ("registered", 5, 9, "abc")


def test_state_names() -> None:
    assert state_to_proto("ready") == pb.NODE_STATE_READY
    assert state_to_proto(" Suspect ") == pb.NODE_STATE_SUSPECT
    with pytest.raises(InvalidArgument):
        state_to_proto("unspecified")
