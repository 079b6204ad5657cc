"""A worker's identity and counters as one typed record, mapped once to the
GetModelInfo proto (and read by name by the metrics collector)."""

from __future__ import annotations

import dataclasses

from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from gemma_core import MESH_AXES


@dataclasses.dataclass(frozen=True)
class WorkerStats:
    """What the executor reports of itself, joined with what its scheduler
    counted. A worker that does not answer has `ready` False and `state`
    saying why; its executor fields are then zero."""

    worker_id: str
    ready: bool = True
    state: str = ""                # "", "restarting", "dead" or an error
    node_id: str = ""
    pid: int = 0
    mesh_shape: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()
    cpus: int = 0
    xla_cpu_threads: int = 0
    base_fingerprint: str = ""
    compiled_functions: int = 0
    compiled_slot_writers: int = 0
    programs_compiled: int = 0
    programs_from_cache: int = 0
    compile_seconds: float = 0.0
    fine_tune_steps: int = 0
    # The scheduler's.
    in_flight_sequences: int = 0
    forward_requests: int = 0
    batches_run: int = 0
    sequences_run: int = 0
    max_sequences_in_a_batch: int = 0
    sequences_cancelled: int = 0
    max_adapters_in_a_batch: int = 0
    batch_shapes_seen: int = 0
    adapter_slots: int = 0
    adapters_resident: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    adapter_keys: tuple[str, ...] = ()
    batch_size_counts: dict = dataclasses.field(default_factory=dict)  # rows -> batches

    @classmethod
    def of(cls, worker_id: str, info, scheduler, state: str = "") -> "WorkerStats":
        """From an `ExecutorInfo` (None: the worker did not answer) and the
        worker's scheduler."""
        stats, slots = scheduler.stats, scheduler.slots
        resident = tuple(slots.resident())
        executor = {} if info is None else {
            f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
        executor.pop("worker_id", None)
        return cls(
            worker_id=worker_id, ready=info is not None and not state, state=state,
            **executor,
            in_flight_sequences=scheduler.in_flight(), forward_requests=stats.forward_requests,
            batches_run=stats.batches_run, sequences_run=stats.sequences_run,
            max_sequences_in_a_batch=stats.max_sequences_in_a_batch,
            sequences_cancelled=stats.sequences_cancelled,
            max_adapters_in_a_batch=stats.max_adapters_in_a_batch,
            batch_shapes_seen=len(stats.batch_shapes), adapter_slots=slots.num_slots,
            adapters_resident=len(resident), adapter_loads=slots.loads,
            adapter_evictions=slots.evictions, adapter_keys=resident,
            batch_size_counts=dict(stats.batch_size_counts))

    def seen_by(self, tenant: str, tenant_of_key) -> "WorkerStats":
        """As `tenant` may see it with auth on: its own adapters resident,
        and 0 for what would show other tenants' adapters and training (the
        operator's /metrics has them)."""
        own = tuple(k for k in self.adapter_keys if tenant_of_key(k) == tenant)
        return dataclasses.replace(self, adapters_resident=len(own), adapter_keys=own,
                                   adapter_loads=0, adapter_evictions=0, fine_tune_steps=0,
                                   max_adapters_in_a_batch=0)

    def to_proto(self) -> pb.WorkerInfo:
        fields = {f.name for f in pb.WorkerInfo.DESCRIPTOR.fields}
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name in fields}
        return pb.WorkerInfo(mesh_axes=list(MESH_AXES), **values)
