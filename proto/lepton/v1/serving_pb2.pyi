from lepton.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_PENDING: _ClassVar[ReplicaState]
    REPLICA_READY: _ClassVar[ReplicaState]
    REPLICA_UNHEALTHY: _ClassVar[ReplicaState]
    REPLICA_DRAINING: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_PENDING: ReplicaState
REPLICA_READY: ReplicaState
REPLICA_UNHEALTHY: ReplicaState
REPLICA_DRAINING: ReplicaState

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeploymentSpec(_message.Message):
    __slots__ = ("name", "model", "replicas", "resources", "max_batch", "max_wait_ms", "priority", "pack")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    replicas: int
    resources: _tasks_pb2.Resources
    max_batch: int
    max_wait_ms: int
    priority: int
    pack: bool
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., replicas: _Optional[int] = ..., resources: _Optional[_Union[_tasks_pb2.Resources, _Mapping]] = ..., max_batch: _Optional[int] = ..., max_wait_ms: _Optional[int] = ..., priority: _Optional[int] = ..., pack: _Optional[bool] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("task_id", "node_id", "generation", "model", "state")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    node_id: str
    generation: int
    model: str
    state: ReplicaState
    def __init__(self, task_id: _Optional[str] = ..., node_id: _Optional[str] = ..., generation: _Optional[int] = ..., model: _Optional[str] = ..., state: _Optional[_Union[ReplicaState, str]] = ...) -> None: ...

class DeploymentStats(_message.Message):
    __slots__ = ("requests", "errors", "requests_per_s", "p50_ms", "p99_ms", "mean_batch_rows")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch_rows: float
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., requests_per_s: _Optional[float] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ..., mean_batch_rows: _Optional[float] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("spec", "generation", "owner", "created_at_ms", "updated_at_ms", "state", "replicas", "stats", "message")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    generation: int
    owner: str
    created_at_ms: int
    updated_at_ms: int
    state: str
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    stats: DeploymentStats
    message: str
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., generation: _Optional[int] = ..., owner: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., state: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., stats: _Optional[_Union[DeploymentStats, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class CreateDeploymentRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: DeploymentSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ScaleDeploymentRequest(_message.Message):
    __slots__ = ("name", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replicas: int
    def __init__(self, name: _Optional[str] = ..., replicas: _Optional[int] = ...) -> None: ...

class UpdateDeploymentRequest(_message.Message):
    __slots__ = ("name", "model")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class ReplicaReport(_message.Message):
    __slots__ = ("task_id", "deployment", "generation", "state", "outstanding")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTSTANDING_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    deployment: str
    generation: int
    state: ReplicaState
    outstanding: int
    def __init__(self, task_id: _Optional[str] = ..., deployment: _Optional[str] = ..., generation: _Optional[int] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., outstanding: _Optional[int] = ...) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("deployment", "requests", "errors", "bucket_le_ms", "bucket_counts", "batch_rows", "batches")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_LE_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    requests: int
    errors: int
    bucket_le_ms: _containers.RepeatedScalarFieldContainer[float]
    bucket_counts: _containers.RepeatedScalarFieldContainer[int]
    batch_rows: int
    batches: int
    def __init__(self, deployment: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., bucket_le_ms: _Optional[_Iterable[float]] = ..., bucket_counts: _Optional[_Iterable[int]] = ..., batch_rows: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class ReportReplicasRequest(_message.Message):
    __slots__ = ("node_id", "replicas", "stats", "started_at_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaReport]
    stats: _containers.RepeatedCompositeFieldContainer[RouterStats]
    started_at_ms: int
    def __init__(self, node_id: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaReport, _Mapping]]] = ..., stats: _Optional[_Iterable[_Union[RouterStats, _Mapping]]] = ..., started_at_ms: _Optional[int] = ...) -> None: ...

class ReportReplicasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("task_id", "node_id", "node_address", "generation")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    node_id: str
    node_address: str
    generation: int
    def __init__(self, task_id: _Optional[str] = ..., node_id: _Optional[str] = ..., node_address: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class EndpointSet(_message.Message):
    __slots__ = ("deployments", "version")
    class DeploymentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Endpoints
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Endpoints, _Mapping]] = ...) -> None: ...
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.MessageMap[str, Endpoints]
    version: int
    def __init__(self, deployments: _Optional[_Mapping[str, Endpoints]] = ..., version: _Optional[int] = ...) -> None: ...

class Endpoints(_message.Message):
    __slots__ = ("endpoints",)
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ...) -> None: ...

class WatchEndpointsRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("deployment", "inputs", "replica")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    inputs: Tensor
    replica: str
    def __init__(self, deployment: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., replica: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs", "replica", "model", "generation", "batch_rows")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    outputs: Tensor
    replica: str
    model: str
    generation: int
    batch_rows: int
    def __init__(self, outputs: _Optional[_Union[Tensor, _Mapping]] = ..., replica: _Optional[str] = ..., model: _Optional[str] = ..., generation: _Optional[int] = ..., batch_rows: _Optional[int] = ...) -> None: ...
