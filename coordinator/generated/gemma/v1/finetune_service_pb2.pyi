from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FineTuneState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINE_TUNE_STATE_UNSPECIFIED: _ClassVar[FineTuneState]
    FINE_TUNE_STATE_QUEUED: _ClassVar[FineTuneState]
    FINE_TUNE_STATE_RUNNING: _ClassVar[FineTuneState]
    FINE_TUNE_STATE_SUCCEEDED: _ClassVar[FineTuneState]
    FINE_TUNE_STATE_FAILED: _ClassVar[FineTuneState]
    FINE_TUNE_STATE_CANCELLED: _ClassVar[FineTuneState]
    FINE_TUNE_STATE_INTERRUPTED: _ClassVar[FineTuneState]
FINE_TUNE_STATE_UNSPECIFIED: FineTuneState
FINE_TUNE_STATE_QUEUED: FineTuneState
FINE_TUNE_STATE_RUNNING: FineTuneState
FINE_TUNE_STATE_SUCCEEDED: FineTuneState
FINE_TUNE_STATE_FAILED: FineTuneState
FINE_TUNE_STATE_CANCELLED: FineTuneState
FINE_TUNE_STATE_INTERRUPTED: FineTuneState

class UploadDatasetRequest(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class TrainingSequence(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("dataset_id", "num_examples", "num_tokens")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    num_examples: int
    num_tokens: int
    def __init__(self, dataset_id: _Optional[str] = ..., num_examples: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DeleteDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class StartFineTuneRequest(_message.Message):
    __slots__ = ("adapter_name", "initial_adapter_id", "texts", "sequences", "dataset_id", "rank", "alpha", "learning_rate", "steps", "epochs", "batch_size", "sequence_length", "seed", "targets")
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    initial_adapter_id: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    sequences: _containers.RepeatedCompositeFieldContainer[TrainingSequence]
    dataset_id: str
    rank: int
    alpha: float
    learning_rate: float
    steps: int
    epochs: int
    batch_size: int
    sequence_length: int
    seed: int
    targets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_name: _Optional[str] = ..., initial_adapter_id: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., sequences: _Optional[_Iterable[_Union[TrainingSequence, _Mapping]]] = ..., dataset_id: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., learning_rate: _Optional[float] = ..., steps: _Optional[int] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., sequence_length: _Optional[int] = ..., seed: _Optional[int] = ..., targets: _Optional[_Iterable[str]] = ...) -> None: ...

class FineTuneJob(_message.Message):
    __slots__ = ("job_id", "state", "adapter_name", "adapter_id", "step", "total_steps", "loss", "first_loss", "tokens_per_second", "eta_seconds", "error", "worker_id", "created")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: FineTuneState
    adapter_name: str
    adapter_id: str
    step: int
    total_steps: int
    loss: float
    first_loss: float
    tokens_per_second: float
    eta_seconds: float
    error: str
    worker_id: str
    created: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[FineTuneState, str]] = ..., adapter_name: _Optional[str] = ..., adapter_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., first_loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., error: _Optional[str] = ..., worker_id: _Optional[str] = ..., created: _Optional[str] = ...) -> None: ...

class WatchFineTuneRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelFineTuneRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListFineTunesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFineTunesResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[FineTuneJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[FineTuneJob, _Mapping]]] = ...) -> None: ...
