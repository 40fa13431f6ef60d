from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnDisconnect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_DISCONNECT_STOP: _ClassVar[OnDisconnect]
    ON_DISCONNECT_KEEP: _ClassVar[OnDisconnect]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_PENDING: _ClassVar[TaskState]
    TASK_STATE_ASSIGNED: _ClassVar[TaskState]
    TASK_STATE_RUNNING: _ClassVar[TaskState]
    TASK_STATE_SUCCEEDED: _ClassVar[TaskState]
    TASK_STATE_FAILED: _ClassVar[TaskState]
    TASK_STATE_CANCELLED: _ClassVar[TaskState]
    TASK_STATE_PREEMPTED: _ClassVar[TaskState]
ON_DISCONNECT_STOP: OnDisconnect
ON_DISCONNECT_KEEP: OnDisconnect
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_PENDING: TaskState
TASK_STATE_ASSIGNED: TaskState
TASK_STATE_RUNNING: TaskState
TASK_STATE_SUCCEEDED: TaskState
TASK_STATE_FAILED: TaskState
TASK_STATE_CANCELLED: TaskState
TASK_STATE_PREEMPTED: TaskState

class Resources(_message.Message):
    __slots__ = ("cpu", "memory_bytes", "gpus", "gpu_memory_bytes")
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu: float
    memory_bytes: int
    gpus: int
    gpu_memory_bytes: int
    def __init__(self, cpu: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., gpus: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ...) -> None: ...

class TaskSpec(_message.Message):
    __slots__ = ("name", "argv", "shell", "env", "workdir", "resources", "priority", "constraints", "max_retries", "timeout_s", "owner", "request_id", "grace_s", "job_id", "gang_size", "gang_rank", "max_restarts", "torch", "code_digest", "on_disconnect", "replica", "owner_role", "owner_token_id")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ConstraintsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    SHELL_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    WORKDIR_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CONSTRAINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RETRIES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GANG_SIZE_FIELD_NUMBER: _ClassVar[int]
    GANG_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    TORCH_FIELD_NUMBER: _ClassVar[int]
    CODE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    OWNER_ROLE_FIELD_NUMBER: _ClassVar[int]
    OWNER_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    shell: str
    env: _containers.ScalarMap[str, str]
    workdir: str
    resources: Resources
    priority: int
    constraints: _containers.ScalarMap[str, str]
    max_retries: int
    timeout_s: float
    owner: str
    request_id: str
    grace_s: float
    job_id: str
    gang_size: int
    gang_rank: int
    max_restarts: int
    torch: TorchSpec
    code_digest: str
    on_disconnect: OnDisconnect
    replica: ReplicaSpec
    owner_role: str
    owner_token_id: str
    def __init__(self, name: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., shell: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., workdir: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ..., priority: _Optional[int] = ..., constraints: _Optional[_Mapping[str, str]] = ..., max_retries: _Optional[int] = ..., timeout_s: _Optional[float] = ..., owner: _Optional[str] = ..., request_id: _Optional[str] = ..., grace_s: _Optional[float] = ..., job_id: _Optional[str] = ..., gang_size: _Optional[int] = ..., gang_rank: _Optional[int] = ..., max_restarts: _Optional[int] = ..., torch: _Optional[_Union[TorchSpec, _Mapping]] = ..., code_digest: _Optional[str] = ..., on_disconnect: _Optional[_Union[OnDisconnect, str]] = ..., replica: _Optional[_Union[ReplicaSpec, _Mapping]] = ..., owner_role: _Optional[str] = ..., owner_token_id: _Optional[str] = ...) -> None: ...

class ReplicaSpec(_message.Message):
    __slots__ = ("deployment", "generation")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    generation: int
    def __init__(self, deployment: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class TorchSpec(_message.Message):
    __slots__ = ("nproc_per_node", "dataset")
    NPROC_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    nproc_per_node: int
    dataset: str
    def __init__(self, nproc_per_node: _Optional[int] = ..., dataset: _Optional[str] = ...) -> None: ...

class AttemptRecord(_message.Message):
    __slots__ = ("attempt", "node_id", "state", "exit_code", "reason", "started_at_ms", "finished_at_ms")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    node_id: str
    state: TaskState
    exit_code: int
    reason: str
    started_at_ms: int
    finished_at_ms: int
    def __init__(self, attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., started_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("id", "spec", "state", "attempt", "failures", "node_id", "node_address", "gpu_indices", "has_exit_code", "exit_code", "reason", "created_at_ms", "assigned_at_ms", "started_at_ms", "finished_at_ms", "assigned_term", "history", "restart_count", "master_addr", "master_port", "node_losses")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_TERM_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    NODE_LOSSES_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: TaskSpec
    state: TaskState
    attempt: int
    failures: int
    node_id: str
    node_address: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    has_exit_code: bool
    exit_code: int
    reason: str
    created_at_ms: int
    assigned_at_ms: int
    started_at_ms: int
    finished_at_ms: int
    assigned_term: int
    history: _containers.RepeatedCompositeFieldContainer[AttemptRecord]
    restart_count: int
    master_addr: str
    master_port: int
    node_losses: int
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., state: _Optional[_Union[TaskState, str]] = ..., attempt: _Optional[int] = ..., failures: _Optional[int] = ..., node_id: _Optional[str] = ..., node_address: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., has_exit_code: _Optional[bool] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., assigned_at_ms: _Optional[int] = ..., started_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ..., assigned_term: _Optional[int] = ..., history: _Optional[_Iterable[_Union[AttemptRecord, _Mapping]]] = ..., restart_count: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., node_losses: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "state", "reason", "restart_count", "tasks", "owner")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: TaskState
    reason: str
    restart_count: int
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    owner: str
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., reason: _Optional[str] = ..., restart_count: _Optional[int] = ..., tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., owner: _Optional[str] = ...) -> None: ...

class TaskSummary(_message.Message):
    __slots__ = ("id", "name", "owner", "job_id", "state", "has_exit_code", "exit_code", "reason", "created_at_ms", "finished_at_ms", "collected_at_ms", "attempt")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HAS_EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    COLLECTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    owner: str
    job_id: str
    state: TaskState
    has_exit_code: bool
    exit_code: int
    reason: str
    created_at_ms: int
    finished_at_ms: int
    collected_at_ms: int
    attempt: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., owner: _Optional[str] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., has_exit_code: _Optional[bool] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ..., collected_at_ms: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("task_id", "attempt", "spec", "gpu_indices", "term", "restart_count", "master_addr", "master_port", "task_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    TASK_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    spec: TaskSpec
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    term: int
    restart_count: int
    master_addr: str
    master_port: int
    task_token: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., spec: _Optional[_Union[TaskSpec, _Mapping]] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., term: _Optional[int] = ..., restart_count: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., task_token: _Optional[str] = ...) -> None: ...

class AssignmentRemoval(_message.Message):
    __slots__ = ("task_id", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AssignmentSet(_message.Message):
    __slots__ = ("term", "assignments", "more", "version", "delta", "removed")
    TERM_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    term: int
    assignments: _containers.RepeatedCompositeFieldContainer[Assignment]
    more: bool
    version: int
    delta: bool
    removed: _containers.RepeatedCompositeFieldContainer[AssignmentRemoval]
    def __init__(self, term: _Optional[int] = ..., assignments: _Optional[_Iterable[_Union[Assignment, _Mapping]]] = ..., more: _Optional[bool] = ..., version: _Optional[int] = ..., delta: _Optional[bool] = ..., removed: _Optional[_Iterable[_Union[AssignmentRemoval, _Mapping]]] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("task_id", "attempt", "kind", "exit_code", "reason", "at_ms", "term", "requeue")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TaskEvent.Kind]
        KIND_STARTED: _ClassVar[TaskEvent.Kind]
        KIND_EXITED: _ClassVar[TaskEvent.Kind]
    KIND_UNSPECIFIED: TaskEvent.Kind
    KIND_STARTED: TaskEvent.Kind
    KIND_EXITED: TaskEvent.Kind
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    REQUEUE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    kind: TaskEvent.Kind
    exit_code: int
    reason: str
    at_ms: int
    term: int
    requeue: bool
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., kind: _Optional[_Union[TaskEvent.Kind, str]] = ..., exit_code: _Optional[int] = ..., reason: _Optional[str] = ..., at_ms: _Optional[int] = ..., term: _Optional[int] = ..., requeue: _Optional[bool] = ...) -> None: ...
