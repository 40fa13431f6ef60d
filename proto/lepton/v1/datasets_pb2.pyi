from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DatasetKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATASET_KIND_DATA: _ClassVar[DatasetKind]
    DATASET_KIND_MODEL: _ClassVar[DatasetKind]
    DATASET_KIND_CHECKPOINT: _ClassVar[DatasetKind]
DATASET_KIND_DATA: DatasetKind
DATASET_KIND_MODEL: DatasetKind
DATASET_KIND_CHECKPOINT: DatasetKind

class Shard(_message.Message):
    __slots__ = ("id", "size", "rows", "dtype", "shape", "label_dtype", "replicas")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LABEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    id: str
    size: int
    rows: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    label_dtype: str
    replicas: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., size: _Optional[int] = ..., rows: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., label_dtype: _Optional[str] = ..., replicas: _Optional[_Iterable[str]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("name", "version", "replication", "shards", "created_at_ms", "rows", "size", "source", "owner", "schema", "kind", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    replication: int
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    created_at_ms: int
    rows: int
    size: int
    source: str
    owner: str
    schema: str
    kind: DatasetKind
    labels: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., replication: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., created_at_ms: _Optional[int] = ..., rows: _Optional[int] = ..., size: _Optional[int] = ..., source: _Optional[str] = ..., owner: _Optional[str] = ..., schema: _Optional[str] = ..., kind: _Optional[_Union[DatasetKind, str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShardPlacement(_message.Message):
    __slots__ = ("shard_id", "node_ids", "addresses")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[str] = ..., node_ids: _Optional[_Iterable[str]] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class PlanPutRequest(_message.Message):
    __slots__ = ("name", "replication", "shards")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    replication: int
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    def __init__(self, name: _Optional[str] = ..., replication: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ...) -> None: ...

class PlanPutResponse(_message.Message):
    __slots__ = ("placements", "replication")
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[ShardPlacement]
    replication: int
    def __init__(self, placements: _Optional[_Iterable[_Union[ShardPlacement, _Mapping]]] = ..., replication: _Optional[int] = ...) -> None: ...

class CommitDatasetRequest(_message.Message):
    __slots__ = ("dataset",)
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ...) -> None: ...

class GetDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DatasetView(_message.Message):
    __slots__ = ("dataset", "addresses", "under_replicated")
    class AddressesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    UNDER_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    dataset: Dataset
    addresses: _containers.ScalarMap[str, str]
    under_replicated: int
    def __init__(self, dataset: _Optional[_Union[Dataset, _Mapping]] = ..., addresses: _Optional[_Mapping[str, str]] = ..., under_replicated: _Optional[int] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReleaseShardsRequest(_message.Message):
    __slots__ = ("shard_ids", "node_ids")
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    shard_ids: _containers.RepeatedScalarFieldContainer[str]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_ids: _Optional[_Iterable[str]] = ..., node_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseShardsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class DropReplicaRequest(_message.Message):
    __slots__ = ("shard_id", "node_id", "reason")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    node_id: str
    reason: str
    def __init__(self, shard_id: _Optional[str] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DropReplicaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardEntry(_message.Message):
    __slots__ = ("id", "size")
    ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    size: int
    def __init__(self, id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ReportInventoryRequest(_message.Message):
    __slots__ = ("node_id", "digest", "count", "shards", "first", "last", "grace_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    GRACE_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    digest: str
    count: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardEntry]
    first: bool
    last: bool
    grace_ms: int
    def __init__(self, node_id: _Optional[str] = ..., digest: _Optional[str] = ..., count: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardEntry, _Mapping]]] = ..., first: _Optional[bool] = ..., last: _Optional[bool] = ..., grace_ms: _Optional[int] = ...) -> None: ...

class ReportInventoryResponse(_message.Message):
    __slots__ = ("send_listing", "orphans", "term", "held", "orphans_withheld")
    SEND_LISTING_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    ORPHANS_WITHHELD_FIELD_NUMBER: _ClassVar[int]
    send_listing: bool
    orphans: _containers.RepeatedScalarFieldContainer[str]
    term: int
    held: int
    orphans_withheld: bool
    def __init__(self, send_listing: _Optional[bool] = ..., orphans: _Optional[_Iterable[str]] = ..., term: _Optional[int] = ..., held: _Optional[int] = ..., orphans_withheld: _Optional[bool] = ...) -> None: ...

class WriteShardRequest(_message.Message):
    __slots__ = ("shard_id", "size", "data")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    size: int
    data: bytes
    def __init__(self, shard_id: _Optional[str] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class WriteShardResponse(_message.Message):
    __slots__ = ("shard_id", "size")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    size: int
    def __init__(self, shard_id: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class ReadShardRequest(_message.Message):
    __slots__ = ("shard_id", "offset")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    offset: int
    def __init__(self, shard_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("offset", "data", "digest")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    digest: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., digest: _Optional[bytes] = ...) -> None: ...

class OpenTransferRequest(_message.Message):
    __slots__ = ("shard_id", "offset", "sealed_key_id")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SEALED_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    offset: int
    sealed_key_id: str
    def __init__(self, shard_id: _Optional[str] = ..., offset: _Optional[int] = ..., sealed_key_id: _Optional[str] = ...) -> None: ...

class TransferTicket(_message.Message):
    __slots__ = ("port", "token", "size", "chunk_size", "sealed_header")
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEALED_HEADER_FIELD_NUMBER: _ClassVar[int]
    port: int
    token: bytes
    size: int
    chunk_size: int
    sealed_header: bytes
    def __init__(self, port: _Optional[int] = ..., token: _Optional[bytes] = ..., size: _Optional[int] = ..., chunk_size: _Optional[int] = ..., sealed_header: _Optional[bytes] = ...) -> None: ...

class ShardSource(_message.Message):
    __slots__ = ("shard_id", "size", "source_nodes")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NODES_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    size: int
    source_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_id: _Optional[str] = ..., size: _Optional[int] = ..., source_nodes: _Optional[_Iterable[str]] = ...) -> None: ...

class PullShardsRequest(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[ShardSource]
    def __init__(self, shards: _Optional[_Iterable[_Union[ShardSource, _Mapping]]] = ...) -> None: ...

class PullShardsResponse(_message.Message):
    __slots__ = ("pulled", "failed", "bytes")
    class FailedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PULLED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    pulled: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.ScalarMap[str, str]
    bytes: int
    def __init__(self, pulled: _Optional[_Iterable[str]] = ..., failed: _Optional[_Mapping[str, str]] = ..., bytes: _Optional[int] = ...) -> None: ...

class StatShardsRequest(_message.Message):
    __slots__ = ("shard_ids", "verify")
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    shard_ids: _containers.RepeatedScalarFieldContainer[str]
    verify: bool
    def __init__(self, shard_ids: _Optional[_Iterable[str]] = ..., verify: _Optional[bool] = ...) -> None: ...

class StatShardsResponse(_message.Message):
    __slots__ = ("present", "used_bytes", "quota_bytes")
    class PresentEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    present: _containers.ScalarMap[str, int]
    used_bytes: int
    quota_bytes: int
    def __init__(self, present: _Optional[_Mapping[str, int]] = ..., used_bytes: _Optional[int] = ..., quota_bytes: _Optional[int] = ...) -> None: ...

class DeleteShardsRequest(_message.Message):
    __slots__ = ("shard_ids",)
    SHARD_IDS_FIELD_NUMBER: _ClassVar[int]
    shard_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, shard_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteShardsResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ShardStatsRequest(_message.Message):
    __slots__ = ("shard_id", "spec")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    spec: str
    def __init__(self, shard_id: _Optional[str] = ..., spec: _Optional[str] = ...) -> None: ...

class ShardStatsResponse(_message.Message):
    __slots__ = ("stats",)
    STATS_FIELD_NUMBER: _ClassVar[int]
    stats: str
    def __init__(self, stats: _Optional[str] = ...) -> None: ...

class TransformShardRequest(_message.Message):
    __slots__ = ("shard_id", "spec", "seed")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    shard_id: str
    spec: str
    seed: int
    def __init__(self, shard_id: _Optional[str] = ..., spec: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class TransformShardResponse(_message.Message):
    __slots__ = ("shard", "report")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    shard: Shard
    report: str
    def __init__(self, shard: _Optional[_Union[Shard, _Mapping]] = ..., report: _Optional[str] = ...) -> None: ...
