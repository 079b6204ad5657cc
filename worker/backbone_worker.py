"""The Ray actor: one mesh slice, one sharded backbone; runs what it is sent.

It makes no scheduling decisions: the coordinator's scheduler for this
worker forms the batches, chooses the adapter slots and interleaves the
fine-tune steps. A threaded actor: forward batches and training steps run
one at a time in its "device" concurrency group, in the order they arrive;
slot writes in a group of their own, so a load never holds up a batch.
Plain methods on Ray's threads, not coroutines: that saves an event-loop
and thread hop per call (benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import threading
import logging
import os
import time

import ray

from gemma_core.errors import AdapterMismatch
from worker.batch import Batch, BatchResult, row_results
from worker.score_picks import ScorePicks, row_scores
from worker.errors import AdapterRejected, FineTuneFailed, SlotsNotWritten
from worker.fine_tune_session import FineTuneSession, FineTuneWork, StepReport
from worker.log_format import configure_logging
from worker.worker_config import XLA_CPU_THREADS_ENV, WorkerSpec

log = logging.getLogger("gemma_serve.worker")


@dataclasses.dataclass(frozen=True)
class ExecutorInfo:
    """What a worker knows about itself: identity, devices, programs."""

    worker_id: str
    node_id: str
    pid: int
    mesh_shape: tuple[int, int]
    devices: tuple[str, ...]
    cpus: int
    xla_cpu_threads: int
    base_fingerprint: str
    compiled_functions: int
    compiled_slot_writers: int
    programs_compiled: int
    programs_from_cache: int
    compile_seconds: float
    fine_tune_steps: int


def _xla_cpu_threads(spec: WorkerSpec) -> int:
    """How many compute threads XLA's CPU runtime started here, read as it
    reads them: the first of PJRT_NPROC and NPROC that is an integer, else
    one per core this process may use; at least one per CPU device. 0 for a
    GPU worker, which runs no CPU backend."""
    if spec.use_gpus:
        return 0
    threads = len(os.sched_getaffinity(0))
    for name in (XLA_CPU_THREADS_ENV, "NPROC"):
        try:
            threads = max(0, int(os.environ.get(name, "")))
            break
        except ValueError:
            continue
    return max(threads, spec.num_devices)


def _undo_ray_niceness() -> None:
    """Ray starts worker processes at niceness 15, so on a shared host the
    device-feeding worker would yield to every client and the coordinator.
    Restore normal priority where the process may (root, CAP_SYS_NICE)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        log.info("worker keeps Ray's niceness %d (no permission to lower it)", os.nice(0))


# Ray's concurrency groups of the actor (`ray.remote(concurrency_groups=...)`,
# see worker/actor_options.py): one thread runs the device's work in order,
# one writes adapter slots beside it; the rest (info, until_stopped) run on
# the default group.
CONCURRENCY_GROUPS = {"device": 1, "slot_writer": 1}


class BackboneWorker:
    """Executes batches, slot writes and training steps for one worker id.
    Wrap with `ray.remote(concurrency_groups=CONCURRENCY_GROUPS)` (the
    coordinator's placement does, with worker/actor_options.py's options).

    Its devices are fixed before JAX starts: XLA_FLAGS (fake CPU devices) or
    Ray's GPU assignment, so JAX is imported here, not at module level.
    """

    def __init__(self, worker_id: str, spec: WorkerSpec):
        from worker.compile_cache import use_compilation_cache  # JAX starts here
        from worker.sharded_backbone import ShardedBackbone

        started = time.time()
        configure_logging()
        _undo_ray_niceness()
        self.worker_id = worker_id
        self.spec = spec
        self._compiles = use_compilation_cache(spec.compilation_cache_dir)
        self.model = ShardedBackbone(spec)
        loaded_at = time.time()
        # Every bucket before ready (a restarted actor too): no request waits
        # for a compilation. With the cache, a restart loads them instead.
        score_seconds = self.model.compile_buckets(spec.batching.shapes())
        self.compile_seconds = time.time() - loaded_at
        self._xla_cpu_threads = _xla_cpu_threads(spec)  # as XLA saw the process start
        self._written_slots: set[int] = set()  # slots written since this process started
        self._fine_tunes: dict[str, FineTuneSession] = {}
        self._fine_tune_steps = 0
        log.info("%s loaded %s on %s in %.1fs, compiled the programs of %d buckets in %.1fs "
                 "(score programs %.1fs; %d compiled, %d from the cache)", worker_id,
                 spec.preset, self.model.devices, loaded_at - started,
                 len(spec.batching.shapes()), self.compile_seconds, score_seconds,
                 self._compiles.compiled, self._compiles.loaded)

    @ray.method(concurrency_group="device")
    def run_batch(self, batch: Batch) -> BatchResult:
        """Runs one padded batch; each row's tensors, pooled and cast here so
        that only what the caller asked for travels back.

        Raises:
            SlotsNotWritten: a row reads a slot not written in this process
                (it restarted since): the batch is refused, not run with
                empty adapters; the coordinator retries it elsewhere.
        """
        unwritten = {int(s) for s in batch.slot_ids} - self._written_slots - {0}
        if unwritten:
            raise SlotsNotWritten(f"{self.worker_id} restarted: adapter slots "
                                  f"{sorted(unwritten)} are not written in it yet")
        try:
            started = time.perf_counter()
            picks = ScorePicks.of(batch)
            if picks is None:
                hidden = self.model.run(batch.token_ids, batch.padding_mask, batch.layer_ids,
                                        batch.slot_ids)
                scores = None
            else:
                hidden, outputs = self.model.run_scored(
                    batch.token_ids, batch.padding_mask, batch.layer_ids, batch.slot_ids, picks,
                    hidden_wanted=any(row.score is None for row in batch.rows))
                scores = row_scores(outputs, picks, batch.rows)
            seconds = time.perf_counter() - started
            return BatchResult(row_results(hidden, batch.rows, scores), seconds)
        except Exception:
            log.exception("%s: a batch of shape %s failed", self.worker_id, batch.shape)
            raise

    @ray.method(concurrency_group="slot_writer")
    def write_slot(self, slot: int, adapter) -> None:
        """Puts `adapter` (a `LoraAdapter`, resolved by Ray from the object
        reference the scheduler passed; None: zeros) in `slot`.

        Raises:
            AdapterRejected: it does not fit this model or the slots' rank.
        """
        self._written_slots.discard(slot)
        try:
            self.model.write_slot(slot, adapter)
        except (ValueError, AdapterMismatch) as error:
            raise AdapterRejected(str(error)) from None
        if adapter is not None:
            self._written_slots.add(slot)

    @ray.method(concurrency_group="device")
    def start_fine_tune(self, work: FineTuneWork) -> None:
        """Prepares `work`; its steps run on `fine_tune_step`."""
        try:
            initial = work.initial
            if isinstance(initial, ray.ObjectRef):
                initial = ray.get(initial)
            self._fine_tunes[work.job_id] = FineTuneSession(self.model.backbone, work, initial)
        except Exception as error:  # noqa: BLE001 - reported to the job's owner
            log.warning("fine-tune %s could not start", work.job_id, exc_info=True)
            raise FineTuneFailed(f"{type(error).__name__}: {error}") from None

    @ray.method(concurrency_group="device")
    def fine_tune_step(self, job_id: str) -> StepReport | None:
        """Runs the job's next step; None when it has run them all."""
        session = self._session(job_id)
        try:
            report = session.step()
        except StopIteration:
            return None
        except Exception as error:  # noqa: BLE001
            log.warning("fine-tune %s failed", job_id, exc_info=True)
            raise FineTuneFailed(f"{type(error).__name__}: {error}") from None
        self._fine_tune_steps += 1
        return report

    @ray.method(concurrency_group="device")
    def finish_fine_tune(self, job_id: str):
        """The trained `LoraAdapter`; the job's state is dropped."""
        session = self._session(job_id)
        del self._fine_tunes[job_id]
        try:
            return session.adapter()
        except Exception as error:  # noqa: BLE001 - reported to the job's owner
            log.warning("fine-tune %s failed at its end", job_id, exc_info=True)
            raise FineTuneFailed(f"{type(error).__name__}: {error}") from None

    def _session(self, job_id: str) -> FineTuneSession:
        session = self._fine_tunes.get(job_id)
        if session is None:
            raise FineTuneFailed(f"fine-tune {job_id} is not running on {self.worker_id} "
                                 "(the worker restarted since it started).")
        return session

    def drop_fine_tune(self, job_id: str) -> None:
        self._fine_tunes.pop(job_id, None)

    def until_stopped(self) -> None:
        """Never returns: the coordinator keeps one pending, so that Ray
        tells it when this actor (or its node) is gone, even when idle."""
        threading.Event().wait()

    def info(self) -> ExecutorInfo:
        return ExecutorInfo(
            worker_id=self.worker_id, node_id=ray.get_runtime_context().get_node_id(),
            pid=os.getpid(), mesh_shape=tuple(self.spec.mesh_shape),
            devices=tuple(str(d) for d in self.model.devices), cpus=self.spec.cpus or 0,
            xla_cpu_threads=self._xla_cpu_threads, base_fingerprint=self.model.fingerprint,
            compiled_functions=self.model.compiled_functions(),
            compiled_slot_writers=self.model.compiled_slot_writers(),
            programs_compiled=self._compiles.compiled,
            programs_from_cache=self._compiles.loaded,
            compile_seconds=round(self.compile_seconds, 3),
            fine_tune_steps=self._fine_tune_steps)
