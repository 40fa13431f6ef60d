from lepton.v1 import common_pb2 as _common_pb2
from lepton.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitTaskRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: _tasks_pb2.TaskSpec
    def __init__(self, spec: _Optional[_Union[_tasks_pb2.TaskSpec, _Mapping]] = ...) -> None: ...

class SubmitTasksRequest(_message.Message):
    __slots__ = ("specs",)
    SPECS_FIELD_NUMBER: _ClassVar[int]
    specs: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.TaskSpec]
    def __init__(self, specs: _Optional[_Iterable[_Union[_tasks_pb2.TaskSpec, _Mapping]]] = ...) -> None: ...

class SubmitTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_tasks_pb2.Task, _Mapping]]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "nodes")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    spec: _tasks_pb2.TaskSpec
    nodes: int
    def __init__(self, spec: _Optional[_Union[_tasks_pb2.TaskSpec, _Mapping]] = ..., nodes: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("states", "owner", "limit", "page_size", "page_token", "newest_first", "id_prefix")
    STATES_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_tasks_pb2.TaskState]
    owner: str
    limit: int
    page_size: int
    page_token: str
    newest_first: bool
    id_prefix: str
    def __init__(self, states: _Optional[_Iterable[_Union[_tasks_pb2.TaskState, str]]] = ..., owner: _Optional[str] = ..., limit: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., newest_first: _Optional[bool] = ..., id_prefix: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[_tasks_pb2.Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("keep_finished", "max_age_s")
    KEEP_FINISHED_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_S_FIELD_NUMBER: _ClassVar[int]
    keep_finished: int
    max_age_s: float
    def __init__(self, keep_finished: _Optional[int] = ..., max_age_s: _Optional[float] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("tasks_collected", "jobs_collected", "finished_kept", "history_size")
    TASKS_COLLECTED_FIELD_NUMBER: _ClassVar[int]
    JOBS_COLLECTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_KEPT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_SIZE_FIELD_NUMBER: _ClassVar[int]
    tasks_collected: int
    jobs_collected: int
    finished_kept: int
    history_size: int
    def __init__(self, tasks_collected: _Optional[int] = ..., jobs_collected: _Optional[int] = ..., finished_kept: _Optional[int] = ..., history_size: _Optional[int] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class WaitTaskRequest(_message.Message):
    __slots__ = ("task_id", "timeout_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    timeout_s: float
    def __init__(self, task_id: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class WatchAssignmentsRequest(_message.Message):
    __slots__ = ("node_id", "deltas")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DELTAS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    deltas: bool
    def __init__(self, node_id: _Optional[str] = ..., deltas: _Optional[bool] = ...) -> None: ...

class ReportTaskEventsRequest(_message.Message):
    __slots__ = ("node_id", "events", "running", "full_report")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    FULL_REPORT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    events: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.TaskEvent]
    running: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Assignment]
    full_report: bool
    def __init__(self, node_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[_tasks_pb2.TaskEvent, _Mapping]]] = ..., running: _Optional[_Iterable[_Union[_tasks_pb2.Assignment, _Mapping]]] = ..., full_report: _Optional[bool] = ...) -> None: ...

class ReportTaskEventsResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    def __init__(self, accepted: _Optional[int] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("node_id", "name", "address", "labels", "capacity", "voter", "version", "state_backend")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    VOTER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    address: str
    labels: _containers.ScalarMap[str, str]
    capacity: _common_pb2.Capacity
    voter: bool
    version: str
    state_backend: str
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity: _Optional[_Union[_common_pb2.Capacity, _Mapping]] = ..., voter: _Optional[bool] = ..., version: _Optional[str] = ..., state_backend: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("node", "heartbeat_interval_ms")
    NODE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    node: _common_pb2.Node
    heartbeat_interval_ms: int
    def __init__(self, node: _Optional[_Union[_common_pb2.Node, _Mapping]] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "usage")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    usage: _common_pb2.Usage
    def __init__(self, node_id: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("state", "draining", "heartbeat_interval_ms", "term")
    STATE_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.NodeState
    draining: bool
    heartbeat_interval_ms: int
    term: int
    def __init__(self, state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., draining: _Optional[bool] = ..., heartbeat_interval_ms: _Optional[int] = ..., term: _Optional[int] = ...) -> None: ...

class LeaveNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class DrainNodeRequest(_message.Message):
    __slots__ = ("node_id", "enable")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ENABLE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    enable: bool
    def __init__(self, node_id: _Optional[str] = ..., enable: _Optional[bool] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("states", "page_size", "page_token")
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedScalarFieldContainer[_common_pb2.NodeState]
    page_size: int
    page_token: str
    def __init__(self, states: _Optional[_Iterable[_Union[_common_pb2.NodeState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "next_page_token")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Node]
    next_page_token: str
    def __init__(self, nodes: _Optional[_Iterable[_Union[_common_pb2.Node, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AddVoterRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RemoveVoterRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class Voter(_message.Message):
    __slots__ = ("id", "address", "role", "match_index", "lag")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    role: str
    match_index: int
    lag: int
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[str] = ..., match_index: _Optional[int] = ..., lag: _Optional[int] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("leader_id", "leader", "term", "commit_index", "applied_index", "voters", "nodes_by_state", "node_count", "version", "state_backend", "etcd_endpoints", "etcd_prefix")
    class NodesByStateEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    VOTERS_FIELD_NUMBER: _ClassVar[int]
    NODES_BY_STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_COUNT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ETCD_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    ETCD_PREFIX_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    leader: str
    term: int
    commit_index: int
    applied_index: int
    voters: _containers.RepeatedCompositeFieldContainer[Voter]
    nodes_by_state: _containers.ScalarMap[str, int]
    node_count: int
    version: str
    state_backend: str
    etcd_endpoints: _containers.RepeatedScalarFieldContainer[str]
    etcd_prefix: str
    def __init__(self, leader_id: _Optional[str] = ..., leader: _Optional[str] = ..., term: _Optional[int] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., voters: _Optional[_Iterable[_Union[Voter, _Mapping]]] = ..., nodes_by_state: _Optional[_Mapping[str, int]] = ..., node_count: _Optional[int] = ..., version: _Optional[str] = ..., state_backend: _Optional[str] = ..., etcd_endpoints: _Optional[_Iterable[str]] = ..., etcd_prefix: _Optional[str] = ...) -> None: ...

class WatchNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeEvent(_message.Message):
    __slots__ = ("kind", "node", "at_ms", "index")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[NodeEvent.Kind]
        KIND_REGISTERED: _ClassVar[NodeEvent.Kind]
        KIND_STATE_CHANGED: _ClassVar[NodeEvent.Kind]
        KIND_DRAIN_CHANGED: _ClassVar[NodeEvent.Kind]
    KIND_UNSPECIFIED: NodeEvent.Kind
    KIND_REGISTERED: NodeEvent.Kind
    KIND_STATE_CHANGED: NodeEvent.Kind
    KIND_DRAIN_CHANGED: NodeEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    kind: NodeEvent.Kind
    node: _common_pb2.Node
    at_ms: int
    index: int
    def __init__(self, kind: _Optional[_Union[NodeEvent.Kind, str]] = ..., node: _Optional[_Union[_common_pb2.Node, _Mapping]] = ..., at_ms: _Optional[int] = ..., index: _Optional[int] = ...) -> None: ...
