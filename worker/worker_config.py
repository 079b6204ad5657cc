"""What a worker is asked to be: its model, mesh and batching limits."""

from __future__ import annotations

import dataclasses
import math


# Read by XLA's CPU runtime when it starts: how many compute threads it runs
# (its default is one per core the process may use; at least one per device).
XLA_CPU_THREADS_ENV = "PJRT_NPROC"


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """How concurrent requests are grouped into padded batches.

    A batch is padded to (batch bucket, length bucket), so the number of
    compiled functions is at most `bucket_count` whatever the traffic.

    Attributes:
        length_buckets: padded sequence lengths, ascending; the last is the
            longest sequence the service accepts.
        batch_buckets: padded row counts, ascending; the last is the most
            rows in one batch.
        max_batch_tokens: rows x padded length never exceeds this.
        max_wait_ms: with the device idle, how long a batch smaller than
            the previous one waits for more rows, at least (the policy is
            coordinator/batch_policy.py's: the measured batch times decide,
            up to 200 ms, and not at all after an idle spell). With a batch
            in flight, the next is sent as the device is expected to finish.
        layer_slots: how many distinct layers one batch can return.
    """

    # Up to 8192 tokens, the presets' context. Every (rows, length) within
    # max_batch_tokens is compiled before a worker says ready (19 programs
    # here; their compile times at real size are in benchmarks/README.md);
    # rows in steps of 4 keep that count down, and the scheduler runs a
    # smaller bucket full rather than pad a larger one when that is cheaper.
    length_buckets: tuple[int, ...] = (32, 128, 512, 1024, 2048, 4096, 8192)
    batch_buckets: tuple[int, ...] = (1, 4, 16, 64)
    max_batch_tokens: int = 16384
    max_wait_ms: float = 5.0
    layer_slots: int = 4

    def __post_init__(self) -> None:
        for name in ("length_buckets", "batch_buckets"):
            buckets = getattr(self, name)
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
                raise ValueError(f"{name} must be distinct positive integers in ascending "
                                 f"order, got {buckets}.")
        if self.max_batch_tokens < self.batch_buckets[0] * self.length_buckets[-1]:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must hold the smallest batch "
                f"({self.batch_buckets[0]} rows) of the longest bucket "
                f"({self.length_buckets[-1]} tokens).")
        if self.max_wait_ms < 0 or self.layer_slots < 1:
            raise ValueError("max_wait_ms must be >= 0 and layer_slots >= 1.")

    @property
    def max_sequence_length(self) -> int:
        return self.length_buckets[-1]

    @property
    def bucket_count(self) -> int:
        return len(self.length_buckets) * len(self.batch_buckets)

    def length_bucket(self, length: int) -> int:
        return next(b for b in self.length_buckets if b >= length)

    def batch_bucket(self, rows: int) -> int:
        return next(b for b in self.batch_buckets if b >= rows)

    def shapes(self) -> list[tuple[int, int]]:
        """Every padded (rows, length) a batch can take: what a worker
        compiles before it says ready."""
        return [(rows, length) for length in self.length_buckets for rows in self.batch_buckets
                if rows * length <= self.max_batch_tokens]

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` rows, the longest `longest` tokens, make one batch."""
        if rows > self.batch_buckets[-1]:
            return False
        return self.batch_bucket(rows) * self.length_bucket(longest) <= self.max_batch_tokens


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """One worker: a preset sharded over a (data, model) mesh of its devices.

    Attributes:
        preset: anything `Backbone.from_preset` accepts.
        mesh_shape: (data, model) sizes; the worker owns their product of
            devices (GPUs assigned by Ray, or fake CPU devices).
        dtype: dtype policy override, or None for the preset's.
        use_gpus: ask Ray for GPUs instead of faking CPU devices.
        batching: buckets and batching limits (the worker compiles every
            bucket; its scheduler in the coordinator forms the batches).
        max_adapters: LoRA adapter slots per worker (besides the base model).
        max_adapter_rank: the largest LoRA rank a slot holds; smaller ranks
            are zero-padded. Slots cost max_adapters x max_adapter_rank x
            (query + value heads) x hidden_dim floats per block.
        compilation_cache_dir: JAX's persistent compilation cache (a
            directory on the worker's node): compiled bucket programs are
            kept there, so a restart loads them instead of compiling. None:
            the node's own cache directory (see worker/compile_cache.py).
        cpus: CPUs per worker: Ray counts them against the node (a count for
            placement, not pinned cores) and the worker's XLA CPU runtime
            runs that many compute threads. XLA's threads spin while they
            wait for each other, so more of them than cores fight for the
            cores (benchmarks/README.md has a measurement); XLA keeps at least
            one per device, so a CPU mesh of N fake devices runs N at least. None:
            Ray reserves one and XLA starts a thread per core it may run on,
            right for one worker per host, not for several CPU workers
            sharing one.
    """

    preset: str
    mesh_shape: tuple[int, int] = (1, 1)
    dtype: str | None = None
    use_gpus: bool = False
    batching: BatchingConfig = BatchingConfig()
    max_adapters: int = 8
    max_adapter_rank: int = 16
    cpus: int | None = None
    compilation_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if len(self.mesh_shape) != 2 or min(self.mesh_shape) < 1:
            raise ValueError(f"mesh_shape must be (data, model) with sizes >= 1, "
                             f"got {self.mesh_shape}.")
        if self.max_adapters < 1 or self.max_adapter_rank < 1:
            raise ValueError(f"max_adapters and max_adapter_rank must be >= 1, got "
                             f"{self.max_adapters} and {self.max_adapter_rank}.")
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"cpus must be >= 1 (or None), got {self.cpus}.")

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape)
