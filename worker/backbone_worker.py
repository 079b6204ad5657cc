"""The Ray actor: one mesh slice, one sharded backbone, one batcher."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import os
import pickle
import time

import numpy as np
import ray

from gemma_core.errors import AdapterMismatch
from worker.adapter_slots import AdapterSlots
from worker.dynamic_batcher import DynamicBatcher
from worker.errors import AdapterNotResident, AdapterRejected, DeadlineExpired, WorkerError
from worker.forward_server import ForwardServer
from worker.forward_work import OUTPUT_DTYPES, AdapterRef, ForwardResult, ForwardWork
from worker.log_format import configure_logging
from worker.fine_tune_runner import FineTuneRunner, FineTuneWork
from worker.worker_config import XLA_CPU_THREADS_ENV, WorkerSpec

log = logging.getLogger("gemma_serve.worker")


async def _fetch(adapter: AdapterRef):
    """The adapter's tensors: a Ray ObjectRef is awaited, a plain value used
    as is."""
    payload = adapter.payload
    return await payload if isinstance(payload, ray.ObjectRef) else payload


def _pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    if pooling == "last_token":
        return hidden[-1]
    if pooling == "mean":
        return hidden.astype(np.float32).mean(axis=0)
    return hidden


def _sendable(outcome, logged: set):
    """A result or error as it can travel back to the coordinator: an error
    that would not unpickle there becomes a RuntimeError with its text. An
    unexpected error is logged here with its traceback, which does not
    travel; once, however many requests it failed (`logged`: ids seen)."""
    if not isinstance(outcome, BaseException) or isinstance(
            outcome, (WorkerError, asyncio.CancelledError)):
        return outcome
    if id(outcome) not in logged:
        logged.add(id(outcome))
        log.error("forward failed", exc_info=outcome)
    try:
        pickle.loads(pickle.dumps(outcome))
        return outcome
    except Exception:
        return RuntimeError(f"{type(outcome).__name__}: {outcome}")


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


class BackboneWorker:
    """Serves forward work for one worker id. Wrap with `ray.remote` (the
    pool does, with the devices and environment this spec needs).

    Its devices are fixed before JAX starts: the pool sets XLA_FLAGS (fake
    CPU devices) or Ray assigns GPUs, so the import of JAX happens here.
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
        self.model.compile_buckets(spec.batching.shapes())
        self.compile_seconds = time.time() - loaded_at
        self._xla_cpu_threads = _xla_cpu_threads(spec)  # as XLA saw the process start
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{worker_id}-device")
        # Slot writes run on their own thread, one at a time, so batches keep
        # running while an adapter loads.
        self._load_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"{worker_id}-adapter-load")
        self._batcher = DynamicBatcher(spec.batching, self.model.run, self._executor)
        self._slots = AdapterSlots(spec.max_adapters, self._write_slot)
        self._fine_tunes = FineTuneRunner(self.model, self._executor)
        self._by_ticket: dict[int, asyncio.Task] = {}  # requests of start_forward, running
        # Tickets cancelled before start_forward saw them (their call frame or
        # actor call came second); bounded, since
        # most are cancels of requests that had already finished.
        self._cancelled_early: set[int] = set()
        self._cancelled_order: collections.deque[int] = collections.deque(maxlen=4096)
        self.forward_calls = 0      # actor calls and channel frames that brought forward work
        self.forward_requests = 0   # the requests they brought
        self._forward_server = ForwardServer(self.start_forward, self.cancel_forward)
        log.info("%s loaded %s on %s in %.1fs, compiled %d bucket programs in %.1fs "
                 "(%d compiled, %d from the cache)", worker_id, spec.preset,
                 self.model.devices, loaded_at - started, len(spec.batching.shapes()),
                 self.compile_seconds, self._compiles.compiled, self._compiles.loaded)

    async def forward(self, work: ForwardWork) -> ForwardResult:
        started = time.time()
        self.forward_requests += 1
        if work.timeout_s is not None and work.timeout_s <= 0:
            self._batcher.stats.sequences_cancelled += len(work.sequences)
            raise DeadlineExpired("the deadline passed before the worker received the request")
        deadline = None if work.timeout_s is None else started + work.timeout_s
        slot = 0
        if work.adapter is not None:
            if work.adapter.payload is None and not self._slots.holds(work.adapter.key):
                raise AdapterNotResident(f"adapter {work.adapter.key} is not resident on "
                                         f"{self.worker_id} and came without its payload")
            slot = await self._slots.acquire(work.adapter.key,
                                             functools.partial(_fetch, work.adapter), deadline)
        try:
            per_sequence = await self._batcher.submit(work.sequences, work.layers, deadline,
                                                      slot)
        finally:
            if work.adapter is not None:
                self._slots.release(work.adapter.key)
        dtype = OUTPUT_DTYPES[work.dtype]
        tensors = [[_pool(hidden[layer], work.pooling).astype(dtype) for layer in work.layers]
                   for hidden in per_sequence]
        worker_ms = round(1e3 * (time.time() - started), 2)
        # DEBUG: the coordinator's INFO line for the request carries worker_ms.
        # A line per request here would cross Ray's log forwarding as well,
        # which costs more CPU than the request's own bookkeeping.
        log.debug("forward %s", work.request_id, extra={
            "request_id": work.request_id, "worker_id": self.worker_id,
            "sequences": len(work.sequences), "ms": worker_ms,
            "adapter_id": work.adapter.key if work.adapter is not None else ""})
        return ForwardResult(self.worker_id, tensors, worker_ms)

    def start_forward(self, tickets_and_works: list[tuple[int, ForwardWork]]
                      ) -> list[asyncio.Task]:
        """Starts several requests (one call, see CallCoalescer); per request
        a task whose result is what goes back: its ForwardResult or the
        error it raised, never raising itself. Cancelling a task, or
        `cancel_forward` with its ticket, drops that request's rows not yet
        run (a task cancelled before it started ends cancelled)."""
        self.forward_calls += 1
        logged: set = set()
        tasks = []
        for ticket, work in tickets_and_works:
            task = asyncio.ensure_future(self._outcome(work, logged))
            if ticket in self._cancelled_early:  # its cancel overtook it
                task.cancel()
            self._by_ticket[ticket] = task
            task.add_done_callback(functools.partial(self._forget_ticket, ticket))
            tasks.append(task)
        return tasks

    async def _outcome(self, work: ForwardWork, logged: set):
        try:
            return await self.forward(work)
        except (Exception, asyncio.CancelledError) as error:
            return _sendable(error, logged)

    def _forget_ticket(self, ticket: int, task: asyncio.Task) -> None:
        if self._by_ticket.get(ticket) is task:
            del self._by_ticket[ticket]

    async def forward_many(self, tickets_and_works: list[tuple[int, ForwardWork]]
                           ) -> list[ForwardResult | BaseException]:
        """`start_forward` as one actor call: every request's outcome, in
        order, once all are done (the forward channel sends each as it
        finishes instead)."""
        return list(await asyncio.gather(*self.start_forward(tickets_and_works),
                                         return_exceptions=True))

    async def forward_endpoint(self) -> tuple[str, int, bytes]:
        """(host, port, token) of this worker's forward channel, which it
        opens on the first call: forward work then skips Ray's per-call cost
        (see forward_server.py). The token goes to the caller over Ray only."""
        host, port = await self._forward_server.start(ray.util.get_node_ip_address())
        return host, port, self._forward_server.token

    async def until_stopped(self) -> None:
        """Never returns: the pool keeps one pending, so that Ray tells it
        when this actor (or its node) is gone even if no call is running."""
        await asyncio.Event().wait()

    async def cancel_forward(self, tickets: list[int]) -> None:
        for ticket in tickets:
            task = self._by_ticket.get(ticket)
            if task is not None:
                task.cancel()
            else:  # not here yet (Ray does not order an async actor's calls), or done
                if len(self._cancelled_order) == self._cancelled_order.maxlen:
                    self._cancelled_early.discard(self._cancelled_order[0])
                self._cancelled_order.append(ticket)
                self._cancelled_early.add(ticket)

    async def _write_slot(self, slot: int, adapter) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._load_executor, self.model.write_slot, slot, adapter)
        except (ValueError, AdapterMismatch) as error:
            raise AdapterRejected(str(error)) from None

    async def load_adapter(self, adapter: AdapterRef) -> float:
        """Makes `adapter` resident; returns how long that took (ms, 0 if it
        already was)."""
        started = time.perf_counter()
        loads = self._slots.stats.loads
        await self._slots.acquire(adapter.key, functools.partial(_fetch, adapter))
        self._slots.release(adapter.key)
        return 1e3 * (time.perf_counter() - started) if self._slots.stats.loads > loads else 0.0

    async def unload_adapters(self, keys: list[str]) -> list[str]:
        """Releases the slots of `keys` not in use right now and returns those;
        one in use is released when its last request ends."""
        return [key for key in keys if self._slots.unload(key)]

    async def resident_adapters(self) -> list[str]:
        return self._slots.resident()

    async def fine_tune(self, job: FineTuneWork):
        """Runs a fine-tune job between this worker's forward batches; yields
        progress dicts, the last one with the trained adapter (see
        FineTuneRunner). Call with `num_returns="streaming"`."""
        async for progress in self._fine_tunes.run(job):
            yield progress

    async def cancel_fine_tune(self, job_id: str) -> None:
        self._fine_tunes.cancel(job_id)

    async def info(self) -> dict:
        """Identity, mesh, devices and counters, as plain data."""
        stats = self._batcher.stats
        return {
            "worker_id": self.worker_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "mesh_shape": list(self.spec.mesh_shape),
            "cpus": self.spec.cpus or 0,
            "xla_cpu_threads": self._xla_cpu_threads,
            "devices": [str(d) for d in self.model.devices],
            "in_flight_sequences": self._batcher.in_flight(),
            "forward_calls": self.forward_calls,
            "forward_requests": self.forward_requests,
            "forward_channel_calls": self._forward_server.calls,
            "batches_run": stats.batches_run,
            "sequences_run": stats.sequences_run,
            "max_sequences_in_a_batch": stats.max_sequences_in_a_batch,
            "compiled_functions": self.model.compiled_functions(),
            "compiled_slot_writers": self.model.compiled_slot_writers(),
            "programs_compiled": self._compiles.compiled,
            "programs_from_cache": self._compiles.loaded,
            "compile_seconds": round(self.compile_seconds, 3),
            "sequences_cancelled": stats.sequences_cancelled,
            "base_fingerprint": self.model.fingerprint,
            "adapter_slots": self._slots.num_slots,
            "adapters_resident": len(self._slots.resident()),
            "adapter_keys": self._slots.resident(),
            "adapter_loads": self._slots.stats.loads,
            "adapter_evictions": self._slots.stats.evictions,
            "fine_tune_steps": self._fine_tunes.steps_run,
            "max_adapters_in_a_batch": stats.max_adapters_in_a_batch,
            "batch_shapes_seen": len(stats.batch_shapes),
            "batch_size_counts": {str(k): v for k, v in stats.batch_size_counts.items()},
        }

