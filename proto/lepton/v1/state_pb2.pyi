from lepton.v1 import common_pb2 as _common_pb2
from lepton.v1 import datasets_pb2 as _datasets_pb2
from lepton.v1 import security_pb2 as _security_pb2
from lepton.v1 import serving_pb2 as _serving_pb2
from lepton.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterNodeCmd(_message.Message):
    __slots__ = ("node_id", "name", "address", "labels", "capacity", "voter", "version")
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
    node_id: str
    name: str
    address: str
    labels: _containers.ScalarMap[str, str]
    capacity: _common_pb2.Capacity
    voter: bool
    version: str
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., address: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity: _Optional[_Union[_common_pb2.Capacity, _Mapping]] = ..., voter: _Optional[bool] = ..., version: _Optional[str] = ...) -> None: ...

class SetNodeStateCmd(_message.Message):
    __slots__ = ("node_id", "state", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: _common_pb2.NodeState
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.NodeState, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class NodeLostCmd(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetDrainCmd(_message.Message):
    __slots__ = ("node_id", "draining")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    draining: bool
    def __init__(self, node_id: _Optional[str] = ..., draining: _Optional[bool] = ...) -> None: ...

class SubmitTaskCmd(_message.Message):
    __slots__ = ("task_id", "spec")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    spec: _tasks_pb2.TaskSpec
    def __init__(self, task_id: _Optional[str] = ..., spec: _Optional[_Union[_tasks_pb2.TaskSpec, _Mapping]] = ...) -> None: ...

class SubmitTasksCmd(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[SubmitTaskCmd]
    def __init__(self, tasks: _Optional[_Iterable[_Union[SubmitTaskCmd, _Mapping]]] = ...) -> None: ...

class PlacementCmd(_message.Message):
    __slots__ = ("task_id", "attempt", "node_id", "gpu_indices", "master_addr", "master_port")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GPU_INDICES_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    node_id: str
    gpu_indices: _containers.RepeatedScalarFieldContainer[int]
    master_addr: str
    master_port: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., gpu_indices: _Optional[_Iterable[int]] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ...) -> None: ...

class SubmitJobCmd(_message.Message):
    __slots__ = ("job_id", "spec", "nodes")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: _tasks_pb2.TaskSpec
    nodes: int
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[_tasks_pb2.TaskSpec, _Mapping]] = ..., nodes: _Optional[int] = ...) -> None: ...

class PreemptionCmd(_message.Message):
    __slots__ = ("task_id", "attempt", "for_task_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FOR_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    for_task_id: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., for_task_id: _Optional[str] = ...) -> None: ...

class ApplyPlanCmd(_message.Message):
    __slots__ = ("term", "placements", "preemptions")
    TERM_FIELD_NUMBER: _ClassVar[int]
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    term: int
    placements: _containers.RepeatedCompositeFieldContainer[PlacementCmd]
    preemptions: _containers.RepeatedCompositeFieldContainer[PreemptionCmd]
    def __init__(self, term: _Optional[int] = ..., placements: _Optional[_Iterable[_Union[PlacementCmd, _Mapping]]] = ..., preemptions: _Optional[_Iterable[_Union[PreemptionCmd, _Mapping]]] = ...) -> None: ...

class TaskEventCmd(_message.Message):
    __slots__ = ("node_id", "event")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    event: _tasks_pb2.TaskEvent
    def __init__(self, node_id: _Optional[str] = ..., event: _Optional[_Union[_tasks_pb2.TaskEvent, _Mapping]] = ...) -> None: ...

class TaskEventsCmd(_message.Message):
    __slots__ = ("node_id", "events")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    events: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.TaskEvent]
    def __init__(self, node_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[_tasks_pb2.TaskEvent, _Mapping]]] = ...) -> None: ...

class CancelTaskCmd(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class PutDatasetCmd(_message.Message):
    __slots__ = ("dataset", "only_owner")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ONLY_OWNER_FIELD_NUMBER: _ClassVar[int]
    dataset: _datasets_pb2.Dataset
    only_owner: str
    def __init__(self, dataset: _Optional[_Union[_datasets_pb2.Dataset, _Mapping]] = ..., only_owner: _Optional[str] = ...) -> None: ...

class DeleteDatasetCmd(_message.Message):
    __slots__ = ("name", "only_owner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLY_OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    only_owner: str
    def __init__(self, name: _Optional[str] = ..., only_owner: _Optional[str] = ...) -> None: ...

class ReplicaChange(_message.Message):
    __slots__ = ("shard_id", "node_id")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    node_id: str
    def __init__(self, shard_id: _Optional[str] = ..., node_id: _Optional[str] = ...) -> None: ...

class AddReplicasCmd(_message.Message):
    __slots__ = ("replicas",)
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaChange]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaChange, _Mapping]]] = ...) -> None: ...

class DropReplicasCmd(_message.Message):
    __slots__ = ("replicas", "reason")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaChange]
    reason: str
    def __init__(self, replicas: _Optional[_Iterable[_Union[ReplicaChange, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class CreateTokenCmd(_message.Message):
    __slots__ = ("token_id", "name", "role", "token_hash", "created_at")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_HASH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    name: str
    role: str
    token_hash: str
    created_at: int
    def __init__(self, token_id: _Optional[str] = ..., name: _Optional[str] = ..., role: _Optional[str] = ..., token_hash: _Optional[str] = ..., created_at: _Optional[int] = ...) -> None: ...

class RevokeTokenCmd(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class AppendAuditCmd(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_security_pb2.AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[_security_pb2.AuditRecord, _Mapping]]] = ...) -> None: ...

class SetClusterIdCmd(_message.Message):
    __slots__ = ("cluster_id",)
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    def __init__(self, cluster_id: _Optional[str] = ...) -> None: ...

class SetTaskTokenKeyCmd(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    def __init__(self, key: _Optional[bytes] = ...) -> None: ...

class CollectGarbageCmd(_message.Message):
    __slots__ = ("keep_finished", "max_age_ms", "history_limit")
    KEEP_FINISHED_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    keep_finished: int
    max_age_ms: int
    history_limit: int
    def __init__(self, keep_finished: _Optional[int] = ..., max_age_ms: _Optional[int] = ..., history_limit: _Optional[int] = ...) -> None: ...

class SetQuotaCmd(_message.Message):
    __slots__ = ("quota", "unlimited")
    QUOTA_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    quota: _security_pb2.Quota
    unlimited: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, quota: _Optional[_Union[_security_pb2.Quota, _Mapping]] = ..., unlimited: _Optional[_Iterable[str]] = ...) -> None: ...

class CreateDeploymentCmd(_message.Message):
    __slots__ = ("spec", "owner", "request_id", "owner_role", "owner_token_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ROLE_FIELD_NUMBER: _ClassVar[int]
    OWNER_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    spec: _serving_pb2.DeploymentSpec
    owner: str
    request_id: str
    owner_role: str
    owner_token_id: str
    def __init__(self, spec: _Optional[_Union[_serving_pb2.DeploymentSpec, _Mapping]] = ..., owner: _Optional[str] = ..., request_id: _Optional[str] = ..., owner_role: _Optional[str] = ..., owner_token_id: _Optional[str] = ...) -> None: ...

class ScaleDeploymentCmd(_message.Message):
    __slots__ = ("name", "replicas", "only_owner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ONLY_OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    only_owner: str
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ..., only_owner: _Optional[str] = ...) -> None: ...

class UpdateDeploymentCmd(_message.Message):
    __slots__ = ("name", "model", "only_owner")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ONLY_OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    only_owner: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., only_owner: _Optional[str] = ...) -> None: ...

class DeleteDeploymentCmd(_message.Message):
    __slots__ = ("name", "only_owner", "remove")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLY_OWNER_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    name: str
    only_owner: str
    remove: bool
    def __init__(self, name: _Optional[str] = ..., only_owner: _Optional[str] = ..., remove: _Optional[bool] = ...) -> None: ...

class DeploymentReplicasCmd(_message.Message):
    __slots__ = ("deployment", "submit", "drain")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    submit: _containers.RepeatedCompositeFieldContainer[SubmitTaskCmd]
    drain: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deployment: _Optional[str] = ..., submit: _Optional[_Iterable[_Union[SubmitTaskCmd, _Mapping]]] = ..., drain: _Optional[_Iterable[str]] = ...) -> None: ...

class DeploymentRecord(_message.Message):
    __slots__ = ("deployment", "task_ids", "draining", "deleting", "request_id", "owner_role", "owner_token_id")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    DELETING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ROLE_FIELD_NUMBER: _ClassVar[int]
    OWNER_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    deployment: _serving_pb2.Deployment
    task_ids: _containers.RepeatedScalarFieldContainer[str]
    draining: _containers.RepeatedScalarFieldContainer[str]
    deleting: bool
    request_id: str
    owner_role: str
    owner_token_id: str
    def __init__(self, deployment: _Optional[_Union[_serving_pb2.Deployment, _Mapping]] = ..., task_ids: _Optional[_Iterable[str]] = ..., draining: _Optional[_Iterable[str]] = ..., deleting: _Optional[bool] = ..., request_id: _Optional[str] = ..., owner_role: _Optional[str] = ..., owner_token_id: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("at_ms", "register_node", "set_node_state", "set_drain", "noop", "submit_task", "apply_plan", "task_event", "cancel_task", "submit_job", "submit_tasks", "put_dataset", "delete_dataset", "add_replicas", "drop_replicas", "node_lost", "collect_garbage", "task_events", "create_token", "revoke_token", "append_audit", "set_cluster_id", "set_quota", "set_task_token_key", "create_deployment", "scale_deployment", "update_deployment", "delete_deployment", "deployment_replicas")
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    REGISTER_NODE_FIELD_NUMBER: _ClassVar[int]
    SET_NODE_STATE_FIELD_NUMBER: _ClassVar[int]
    SET_DRAIN_FIELD_NUMBER: _ClassVar[int]
    NOOP_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TASK_FIELD_NUMBER: _ClassVar[int]
    APPLY_PLAN_FIELD_NUMBER: _ClassVar[int]
    TASK_EVENT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TASK_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_JOB_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TASKS_FIELD_NUMBER: _ClassVar[int]
    PUT_DATASET_FIELD_NUMBER: _ClassVar[int]
    DELETE_DATASET_FIELD_NUMBER: _ClassVar[int]
    ADD_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DROP_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    NODE_LOST_FIELD_NUMBER: _ClassVar[int]
    COLLECT_GARBAGE_FIELD_NUMBER: _ClassVar[int]
    TASK_EVENTS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    APPEND_AUDIT_FIELD_NUMBER: _ClassVar[int]
    SET_CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SET_QUOTA_FIELD_NUMBER: _ClassVar[int]
    SET_TASK_TOKEN_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATE_DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    SCALE_DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DELETE_DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    at_ms: int
    register_node: RegisterNodeCmd
    set_node_state: SetNodeStateCmd
    set_drain: SetDrainCmd
    noop: Noop
    submit_task: SubmitTaskCmd
    apply_plan: ApplyPlanCmd
    task_event: TaskEventCmd
    cancel_task: CancelTaskCmd
    submit_job: SubmitJobCmd
    submit_tasks: SubmitTasksCmd
    put_dataset: PutDatasetCmd
    delete_dataset: DeleteDatasetCmd
    add_replicas: AddReplicasCmd
    drop_replicas: DropReplicasCmd
    node_lost: NodeLostCmd
    collect_garbage: CollectGarbageCmd
    task_events: TaskEventsCmd
    create_token: CreateTokenCmd
    revoke_token: RevokeTokenCmd
    append_audit: AppendAuditCmd
    set_cluster_id: SetClusterIdCmd
    set_quota: SetQuotaCmd
    set_task_token_key: SetTaskTokenKeyCmd
    create_deployment: CreateDeploymentCmd
    scale_deployment: ScaleDeploymentCmd
    update_deployment: UpdateDeploymentCmd
    delete_deployment: DeleteDeploymentCmd
    deployment_replicas: DeploymentReplicasCmd
    def __init__(self, at_ms: _Optional[int] = ..., register_node: _Optional[_Union[RegisterNodeCmd, _Mapping]] = ..., set_node_state: _Optional[_Union[SetNodeStateCmd, _Mapping]] = ..., set_drain: _Optional[_Union[SetDrainCmd, _Mapping]] = ..., noop: _Optional[_Union[Noop, _Mapping]] = ..., submit_task: _Optional[_Union[SubmitTaskCmd, _Mapping]] = ..., apply_plan: _Optional[_Union[ApplyPlanCmd, _Mapping]] = ..., task_event: _Optional[_Union[TaskEventCmd, _Mapping]] = ..., cancel_task: _Optional[_Union[CancelTaskCmd, _Mapping]] = ..., submit_job: _Optional[_Union[SubmitJobCmd, _Mapping]] = ..., submit_tasks: _Optional[_Union[SubmitTasksCmd, _Mapping]] = ..., put_dataset: _Optional[_Union[PutDatasetCmd, _Mapping]] = ..., delete_dataset: _Optional[_Union[DeleteDatasetCmd, _Mapping]] = ..., add_replicas: _Optional[_Union[AddReplicasCmd, _Mapping]] = ..., drop_replicas: _Optional[_Union[DropReplicasCmd, _Mapping]] = ..., node_lost: _Optional[_Union[NodeLostCmd, _Mapping]] = ..., collect_garbage: _Optional[_Union[CollectGarbageCmd, _Mapping]] = ..., task_events: _Optional[_Union[TaskEventsCmd, _Mapping]] = ..., create_token: _Optional[_Union[CreateTokenCmd, _Mapping]] = ..., revoke_token: _Optional[_Union[RevokeTokenCmd, _Mapping]] = ..., append_audit: _Optional[_Union[AppendAuditCmd, _Mapping]] = ..., set_cluster_id: _Optional[_Union[SetClusterIdCmd, _Mapping]] = ..., set_quota: _Optional[_Union[SetQuotaCmd, _Mapping]] = ..., set_task_token_key: _Optional[_Union[SetTaskTokenKeyCmd, _Mapping]] = ..., create_deployment: _Optional[_Union[CreateDeploymentCmd, _Mapping]] = ..., scale_deployment: _Optional[_Union[ScaleDeploymentCmd, _Mapping]] = ..., update_deployment: _Optional[_Union[UpdateDeploymentCmd, _Mapping]] = ..., delete_deployment: _Optional[_Union[DeleteDeploymentCmd, _Mapping]] = ..., deployment_replicas: _Optional[_Union[DeploymentReplicasCmd, _Mapping]] = ...) -> None: ...

class Noop(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("index", "term", "command")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    command: bytes
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., command: _Optional[bytes] = ...) -> None: ...

class StateSnapshot(_message.Message):
    __slots__ = ("index", "term", "nodes", "tasks", "datasets", "tokens", "audit", "cluster_id", "task_history", "quotas", "task_token_key", "audit_first_seq", "deployments")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_HISTORY_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    TASK_TOKEN_KEY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    term: int
    nodes: _containers.RepeatedCompositeFieldContainer[_common_pb2.Node]
    tasks: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Task]
    datasets: _containers.RepeatedCompositeFieldContainer[_datasets_pb2.Dataset]
    tokens: _containers.RepeatedCompositeFieldContainer[_security_pb2.ApiToken]
    audit: _containers.RepeatedCompositeFieldContainer[_security_pb2.AuditRecord]
    cluster_id: str
    task_history: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.TaskSummary]
    quotas: _containers.RepeatedCompositeFieldContainer[_security_pb2.Quota]
    task_token_key: bytes
    audit_first_seq: int
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentRecord]
    def __init__(self, index: _Optional[int] = ..., term: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[_common_pb2.Node, _Mapping]]] = ..., tasks: _Optional[_Iterable[_Union[_tasks_pb2.Task, _Mapping]]] = ..., datasets: _Optional[_Iterable[_Union[_datasets_pb2.Dataset, _Mapping]]] = ..., tokens: _Optional[_Iterable[_Union[_security_pb2.ApiToken, _Mapping]]] = ..., audit: _Optional[_Iterable[_Union[_security_pb2.AuditRecord, _Mapping]]] = ..., cluster_id: _Optional[str] = ..., task_history: _Optional[_Iterable[_Union[_tasks_pb2.TaskSummary, _Mapping]]] = ..., quotas: _Optional[_Iterable[_Union[_security_pb2.Quota, _Mapping]]] = ..., task_token_key: _Optional[bytes] = ..., audit_first_seq: _Optional[int] = ..., deployments: _Optional[_Iterable[_Union[DeploymentRecord, _Mapping]]] = ...) -> None: ...
