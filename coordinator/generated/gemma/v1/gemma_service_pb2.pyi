from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POOLING_UNSPECIFIED: _ClassVar[Pooling]
    POOLING_NONE: _ClassVar[Pooling]
    POOLING_LAST_TOKEN: _ClassVar[Pooling]
    POOLING_MEAN: _ClassVar[Pooling]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_KEEP_START: _ClassVar[Truncation]
    TRUNCATION_KEEP_END: _ClassVar[Truncation]
POOLING_UNSPECIFIED: Pooling
POOLING_NONE: Pooling
POOLING_LAST_TOKEN: Pooling
POOLING_MEAN: Pooling
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_KEEP_START: Truncation
TRUNCATION_KEEP_END: Truncation

class ScoreRequest(_message.Message):
    __slots__ = ("texts", "sequences", "add_bos", "adapter_id", "truncation", "token_logprobs", "top_k", "top_k_positions", "candidate_ids", "candidates")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_K_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    add_bos: bool
    adapter_id: str
    truncation: Truncation
    token_logprobs: bool
    top_k: int
    top_k_positions: _containers.RepeatedScalarFieldContainer[int]
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., add_bos: _Optional[bool] = ..., adapter_id: _Optional[str] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., token_logprobs: _Optional[bool] = ..., top_k: _Optional[int] = ..., top_k_positions: _Optional[_Iterable[int]] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "model", "adapter_id", "worker_id", "candidate_ids", "sequences")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    adapter_id: str
    worker_id: str
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceScores]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., adapter_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., sequences: _Optional[_Iterable[_Union[SequenceScores, _Mapping]]] = ...) -> None: ...

class SequenceScores(_message.Message):
    __slots__ = ("token_ids", "truncated_tokens", "token_logprobs", "top_tokens", "candidate_logprobs", "candidate_probs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    truncated_tokens: int
    token_logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_tokens: _containers.RepeatedCompositeFieldContainer[TopTokens]
    candidate_logprobs: _containers.RepeatedScalarFieldContainer[float]
    candidate_probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., truncated_tokens: _Optional[int] = ..., token_logprobs: _Optional[_Iterable[float]] = ..., top_tokens: _Optional[_Iterable[_Union[TopTokens, _Mapping]]] = ..., candidate_logprobs: _Optional[_Iterable[float]] = ..., candidate_probs: _Optional[_Iterable[float]] = ...) -> None: ...

class TopTokens(_message.Message):
    __slots__ = ("position", "ids", "logprobs")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    position: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, position: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("texts", "add_bos", "sequences")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    add_bos: bool
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., add_bos: _Optional[bool] = ..., sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("sequences", "texts")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., texts: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("texts", "sequences", "add_bos", "adapter_id", "layers", "pooling", "dtype", "truncation", "dimensions", "normalize")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    sequences: _containers.RepeatedCompositeFieldContainer[TokenSequence]
    add_bos: bool
    adapter_id: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    pooling: Pooling
    dtype: DType
    truncation: Truncation
    dimensions: int
    normalize: bool
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., sequences: _Optional[_Iterable[_Union[TokenSequence, _Mapping]]] = ..., add_bos: _Optional[bool] = ..., adapter_id: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., dimensions: _Optional[int] = ..., normalize: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ForwardHeader
    chunk: TensorChunk
    def __init__(self, header: _Optional[_Union[ForwardHeader, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class ForwardHeader(_message.Message):
    __slots__ = ("request_id", "model", "layers", "pooling", "dtype", "hidden_dim", "sequences", "total_bytes", "adapter_id", "worker_id", "dimensions", "normalized")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    pooling: Pooling
    dtype: DType
    hidden_dim: int
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceInfo]
    total_bytes: int
    adapter_id: str
    worker_id: str
    dimensions: int
    normalized: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., pooling: _Optional[_Union[Pooling, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., hidden_dim: _Optional[int] = ..., sequences: _Optional[_Iterable[_Union[SequenceInfo, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., adapter_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., dimensions: _Optional[int] = ..., normalized: _Optional[bool] = ...) -> None: ...

class SequenceInfo(_message.Message):
    __slots__ = ("token_ids", "shape", "truncated_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    truncated_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., shape: _Optional[_Iterable[int]] = ..., truncated_tokens: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("sequence_index", "layer", "token_offset", "shape", "dtype", "data")
    SEQUENCE_INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sequence_index: int
    layer: int
    token_offset: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, sequence_index: _Optional[int] = ..., layer: _Optional[int] = ..., token_offset: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("preset", "model_class", "config_json", "dtype", "random_weights", "parameter_count", "workers", "limits", "base_fingerprint", "auth_enabled", "tenant", "usage", "compute")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    MODEL_CLASS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    AUTH_ENABLED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    preset: str
    model_class: str
    config_json: str
    dtype: str
    random_weights: bool
    parameter_count: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    limits: Limits
    base_fingerprint: str
    auth_enabled: bool
    tenant: str
    usage: TenantUsage
    compute: str
    def __init__(self, preset: _Optional[str] = ..., model_class: _Optional[str] = ..., config_json: _Optional[str] = ..., dtype: _Optional[str] = ..., random_weights: _Optional[bool] = ..., parameter_count: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., base_fingerprint: _Optional[str] = ..., auth_enabled: _Optional[bool] = ..., tenant: _Optional[str] = ..., usage: _Optional[_Union[TenantUsage, _Mapping]] = ..., compute: _Optional[str] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("requests_in_flight", "tokens_in_flight", "adapter_versions", "adapter_bytes", "fine_tunes_active")
    REQUESTS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNES_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    requests_in_flight: int
    tokens_in_flight: int
    adapter_versions: int
    adapter_bytes: int
    fine_tunes_active: int
    def __init__(self, requests_in_flight: _Optional[int] = ..., tokens_in_flight: _Optional[int] = ..., adapter_versions: _Optional[int] = ..., adapter_bytes: _Optional[int] = ..., fine_tunes_active: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "node_id", "mesh_shape", "mesh_axes", "devices", "ready", "in_flight_sequences", "batches_run", "sequences_run", "max_sequences_in_a_batch", "compiled_functions", "sequences_cancelled", "adapter_slots", "adapters_resident", "adapter_loads", "adapter_evictions", "fine_tune_steps", "max_adapters_in_a_batch", "batch_shapes_seen", "compiled_slot_writers", "pid", "state", "forward_requests", "cpus", "xla_cpu_threads", "programs_compiled", "programs_from_cache", "compile_seconds")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MESH_SHAPE_FIELD_NUMBER: _ClassVar[int]
    MESH_AXES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BATCHES_RUN_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_RUN_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_IN_A_BATCH_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_RESIDENT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_LOADS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    FINE_TUNE_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTERS_IN_A_BATCH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SHAPES_SEEN_FIELD_NUMBER: _ClassVar[int]
    COMPILED_SLOT_WRITERS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    XLA_CPU_THREADS_FIELD_NUMBER: _ClassVar[int]
    PROGRAMS_COMPILED_FIELD_NUMBER: _ClassVar[int]
    PROGRAMS_FROM_CACHE_FIELD_NUMBER: _ClassVar[int]
    COMPILE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    node_id: str
    mesh_shape: _containers.RepeatedScalarFieldContainer[int]
    mesh_axes: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedScalarFieldContainer[str]
    ready: bool
    in_flight_sequences: int
    batches_run: int
    sequences_run: int
    max_sequences_in_a_batch: int
    compiled_functions: int
    sequences_cancelled: int
    adapter_slots: int
    adapters_resident: int
    adapter_loads: int
    adapter_evictions: int
    fine_tune_steps: int
    max_adapters_in_a_batch: int
    batch_shapes_seen: int
    compiled_slot_writers: int
    pid: int
    state: str
    forward_requests: int
    cpus: int
    xla_cpu_threads: int
    programs_compiled: int
    programs_from_cache: int
    compile_seconds: float
    def __init__(self, worker_id: _Optional[str] = ..., node_id: _Optional[str] = ..., mesh_shape: _Optional[_Iterable[int]] = ..., mesh_axes: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[str]] = ..., ready: _Optional[bool] = ..., in_flight_sequences: _Optional[int] = ..., batches_run: _Optional[int] = ..., sequences_run: _Optional[int] = ..., max_sequences_in_a_batch: _Optional[int] = ..., compiled_functions: _Optional[int] = ..., sequences_cancelled: _Optional[int] = ..., adapter_slots: _Optional[int] = ..., adapters_resident: _Optional[int] = ..., adapter_loads: _Optional[int] = ..., adapter_evictions: _Optional[int] = ..., fine_tune_steps: _Optional[int] = ..., max_adapters_in_a_batch: _Optional[int] = ..., batch_shapes_seen: _Optional[int] = ..., compiled_slot_writers: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., forward_requests: _Optional[int] = ..., cpus: _Optional[int] = ..., xla_cpu_threads: _Optional[int] = ..., programs_compiled: _Optional[int] = ..., programs_from_cache: _Optional[int] = ..., compile_seconds: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("vocabulary_size", "num_layers", "hidden_dim", "max_sequence_length", "max_sequences_per_request", "max_layers_per_request", "max_text_bytes", "max_batch_tokens", "length_buckets", "batch_buckets", "bucket_count", "max_response_chunk_bytes", "max_adapter_rank", "max_upload_bytes", "max_score_top_k", "max_score_positions", "max_score_candidates", "max_score_response_bytes")
    VOCABULARY_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_LAYERS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BATCH_BUCKETS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_RESPONSE_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MAX_SCORE_RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    max_sequence_length: int
    max_sequences_per_request: int
    max_layers_per_request: int
    max_text_bytes: int
    max_batch_tokens: int
    length_buckets: _containers.RepeatedScalarFieldContainer[int]
    batch_buckets: _containers.RepeatedScalarFieldContainer[int]
    bucket_count: int
    max_response_chunk_bytes: int
    max_adapter_rank: int
    max_upload_bytes: int
    max_score_top_k: int
    max_score_positions: int
    max_score_candidates: int
    max_score_response_bytes: int
    def __init__(self, vocabulary_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_dim: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., max_sequences_per_request: _Optional[int] = ..., max_layers_per_request: _Optional[int] = ..., max_text_bytes: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., length_buckets: _Optional[_Iterable[int]] = ..., batch_buckets: _Optional[_Iterable[int]] = ..., bucket_count: _Optional[int] = ..., max_response_chunk_bytes: _Optional[int] = ..., max_adapter_rank: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ..., max_score_top_k: _Optional[int] = ..., max_score_positions: _Optional[int] = ..., max_score_candidates: _Optional[int] = ..., max_score_response_bytes: _Optional[int] = ...) -> None: ...
