"""Starts the worker actors on Ray and sends each request to one of them."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from typing import Any, Callable

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from worker.backbone_worker import BackboneWorker
from worker.call_coalescer import CallCoalescer
from worker.errors import (AdapterNotResident, ChannelBroken, DeadlineExpired, PoolSaturated,
                           WorkerError, WorkerUnavailable)
from worker.fine_tune_runner import FineTuneWork
from worker.forward_channel import ForwardChannel
from worker.forward_work import OUTPUT_DTYPES, AdapterRef, ForwardResult, ForwardWork
from worker.log_format import LOG_FORMAT_ENV, LOG_LEVEL_ENV
from worker.worker_config import TRANSPORTS, XLA_CPU_THREADS_ENV, WorkerSpec

log = logging.getLogger("gemma_serve.worker_pool")


def worker_resources(spec: WorkerSpec) -> dict:
    """What one worker reserves: its CPUs (one unless the spec says), and
    its GPUs when it uses them."""
    cpus = {"CPU": spec.cpus or 1}
    return {**cpus, "GPU": spec.num_devices} if spec.use_gpus else cpus


def actor_options(spec: WorkerSpec) -> dict:
    """Ray options giving an actor its devices before JAX starts in it: what
    `worker_resources` reserves, and the environment JAX starts with."""
    resources = worker_resources(spec)
    env = {"KERAS_BACKEND": "jax"}
    if spec.cpus is not None:
        env[XLA_CPU_THREADS_ENV] = str(spec.cpus)
    for name in (LOG_FORMAT_ENV, LOG_LEVEL_ENV):  # workers log as the coordinator does
        if os.environ.get(name):
            env[name] = os.environ[name]
    if spec.use_gpus:
        # Named, not inherited: a coordinator kept off the GPU with
        # JAX_PLATFORMS=cpu would otherwise put its GPU workers on the CPU,
        # and a worker that finds no GPU should fail, not run slowly.
        env["JAX_PLATFORMS"] = "cuda"
        return {"num_gpus": resources["GPU"], "num_cpus": resources["CPU"],
                "runtime_env": {"env_vars": env}}
    # A dedicated process with N fake host devices: sharding is real on CPU.
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={spec.num_devices}")
    return {"num_cpus": resources["CPU"], "runtime_env": {"env_vars": env}}


# Results bigger than this go over Ray calls (the object store) rather than
# one frame on the channel, which would hold up the frames behind it.
MAX_CHANNEL_RESULT_BYTES = 4 << 20
# A channel that breaks this often within CHANNEL_BREAK_WINDOW_S while its
# worker lives (a middlebox cutting connections, say) is given up on.
MAX_CHANNEL_BREAKS = 3
CHANNEL_BREAK_WINDOW_S = 60.0
# A worker left without a channel (it could not connect, or it broke too
# often) tries again after this long, twice as long after each failure, up
# to CHANNEL_RETRY_MAX_S; a restart starts it over.
CHANNEL_RETRY_S = 30.0
CHANNEL_RETRY_MAX_S = 600.0
PLACEMENT_TIMEOUT_S = 120
# A restarted worker reloads its model; give up on it after this long.
RESTART_TIMEOUT_S = 600
# GetModelInfo must answer even when a worker is wedged.
INFO_TIMEOUT_S = 10


class WorkerPool:
    """N actors of one spec, spread over the cluster's nodes.

    Requests go to the worker with the fewest sequences in flight, as counted
    here (the coordinator is the only sender), ties taken in turn; a worker
    that already holds the request's adapter counts as less loaded by
    `RESIDENT_BONUS` sequences, so adapters are not loaded everywhere.

    A worker whose process dies is restarted by Ray (it reloads its model);
    meanwhile it gets no requests, the requests it held are retried on the
    others, and once it answers again the adapters it held are loaded back.
    `on_serving_change(bool)` is told when the pool goes from no worker able
    to serve to some, and back.
    """

    RESIDENT_BONUS = 2

    def __init__(self, spec: WorkerSpec, num_workers: int,
                 max_queued_sequences: int = 512, transport: str = "direct",
                 hidden_dim: int | None = None,
                 max_channel_result_bytes: int = MAX_CHANNEL_RESULT_BYTES,
                 channel_retry_s: float = CHANNEL_RETRY_S):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}.")
        self.spec = spec
        self.transport = transport
        self.hidden_dim = hidden_dim  # to size results; None: every result fits a frame
        self.max_channel_result_bytes = max_channel_result_bytes
        self.channel_retry_s = channel_retry_s
        self._channel_retry_delay: dict[str, float] = {}
        self._channel_retries: dict[str, asyncio.Task] = {}
        self.max_queued_sequences = max_queued_sequences
        # One bundle per worker, spread over distinct nodes where resources
        # allow: a node's loss then takes out as few workers as possible.
        self._placement = placement_group([worker_resources(spec)] * num_workers,
                                          strategy="SPREAD")
        remote_class = ray.remote(BackboneWorker)
        self._actors = {}
        for i in range(num_workers):
            worker_id = f"worker-{i}"
            strategy = PlacementGroupSchedulingStrategy(self._placement,
                                                        placement_group_bundle_index=i)
            self._actors[worker_id] = remote_class.options(
                scheduling_strategy=strategy, max_concurrency=1000, max_restarts=-1,
                **actor_options(spec)).remote(worker_id, spec)
        self._in_flight = dict.fromkeys(self._actors, 0)
        # Each tenant's share of each worker's queue (see _least_loaded).
        self._tenant_in_flight = {i: collections.Counter() for i in self._actors}
        self._training = dict.fromkeys(self._actors, 0)  # fine-tune jobs per worker
        self._coalescers = {worker_id: self._coalescer(worker_id) for worker_id in self._actors}
        # Forward work goes over these where they are open (see
        # forward_server.py); None: over Ray actor calls.
        self._channels: dict[str, ForwardChannel | None] = dict.fromkeys(self._actors)
        self._watchers: dict[str, asyncio.Task] = {}
        self._channel_breaks: dict[str, list[float]] = {i: [] for i in self._actors}
        self._stopping = False
        self._background: set[asyncio.Task] = set()  # strong refs: the loop keeps weak ones
        # A routing hint only: workers evict on their own, so this may hold
        # keys a worker has dropped (it then reloads on demand). The refs let
        # a restarted worker get its adapters back.
        self._resident: dict[str, dict[str, AdapterRef]] = {i: {} for i in self._actors}
        self._turn = 0
        self._down: set[str] = set()    # restarting: no requests until it answers
        self._dead: set[str] = set()    # did not come back within RESTART_TIMEOUT_S
        self.restarts = 0
        self.on_serving_change: Callable[[bool], None] | None = None

    def _coalescer(self, worker_id: str) -> CallCoalescer:
        async def send(group, deliver):
            # Requests held while the worker's last call failed would wait out
            # its restart; instead each fails over to another worker.
            if worker_id in self._down or worker_id in self._dead:
                raise WorkerUnavailable(f"{worker_id} is restarting")
            channel = self._channels[worker_id]
            if channel is not None and channel.usable and self._fits_a_frame(group):
                light = self._without_payloads(worker_id, group)
                if light is not None:
                    return await channel.call(light, deliver)
            return await self._call(worker_id,
                                    self._actors[worker_id].forward_many.remote(group))

        def cancel(tickets):
            if worker_id in self._down or worker_id in self._dead:
                return
            channel = self._channels[worker_id]
            if channel is not None and channel.usable:
                channel.cancel(tickets)
                return
            try:  # fire and forget: the request has stopped waiting either way
                self._actors[worker_id].cancel_forward.remote(tickets)
            except Exception as error:  # noqa: BLE001 - e.g. the pool shut down
                log.debug("could not cancel %s on %s: %s", tickets, worker_id, error)
        return CallCoalescer(send, cancel, max_rows=self.spec.batching.batch_buckets[-1],
                             hold_s=self.spec.batching.coalesce_ms / 1000)

    def _without_payloads(self, worker_id: str, group: list) -> list | None:
        """`group` with adapter payloads (Ray object refs) left out, which
        the channel cannot carry; None if a work needs its payload because
        its adapter is not known to be on the worker. If the worker evicted
        one meanwhile, that work fails with AdapterNotResident and is resent
        with it (see `forward`)."""
        light = []
        for ticket, work in group:
            if work.adapter is not None:
                if work.adapter.key not in self._resident[worker_id]:
                    return None
                work = dataclasses.replace(work, adapter=AdapterRef(work.adapter.key, None))
            light.append((ticket, work))
        return light

    def _fits_a_frame(self, group: list) -> bool:
        """Whether the group's results are small enough for one frame."""
        if self.hidden_dim is None:
            return True
        total = 0
        for _, work in group:
            rows = (sum(len(s) for s in work.sequences) if work.pooling == "none"
                    else len(work.sequences))
            total += (rows * len(work.layers) * self.hidden_dim
                      * OUTPUT_DTYPES[work.dtype].itemsize)
        return total <= self.max_channel_result_bytes

    async def _open_channel(self, worker_id: str) -> None:
        """Connects to the worker's forward channel; on failure (a network
        that only lets Ray's ports through, say) its work goes over Ray calls
        until a later try (`_retry_channel_later`) connects."""
        old, self._channels[worker_id] = self._channels[worker_id], None
        if old is not None:
            old.close()
        if self.transport != "direct" or self._stopping:
            return
        actor = self._actors[worker_id]
        try:
            host, port, token = await actor.forward_endpoint.remote()
            channel = await ForwardChannel.open(worker_id, host, port, token,
                                                on_lost=lambda: self._channel_lost(worker_id))
        except Exception as error:  # noqa: BLE001 - Ray calls still work
            log.warning("%s: no forward channel (%s: %s); its requests go over Ray calls",
                        worker_id, type(error).__name__, error)
            self._retry_channel_later(worker_id)
            return
        self._channels[worker_id] = channel
        watcher = self._watchers.get(worker_id)
        if watcher is None or watcher.done():  # one per incarnation of the actor
            self._watchers[worker_id] = asyncio.get_running_loop().create_task(
                self._watch(worker_id, actor.until_stopped.remote()))

    async def _watch(self, worker_id: str, ref) -> None:
        """Ray's view of the worker's life, for a socket that cannot tell a
        lost node from a quiet one: `ref` never completes while the actor
        lives, and fails when Ray finds it (or its node) dead."""
        try:
            await ref
        except asyncio.CancelledError:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - the actor is gone already
                pass
            raise
        except Exception:  # noqa: BLE001 - RayActorError or its relatives: it is gone
            if self._stopping:
                return
            channel = self._channels[worker_id]
            if channel is not None:
                channel.close()  # its waiting calls fail over now
            self._worker_died(worker_id, "Ray reports it dead")

    def _channel_lost(self, worker_id: str) -> None:
        """The channel broke: the worker's work goes over Ray calls while we
        find out whether it lives (then reconnect) or not (then it is out of
        routing until Ray restarts it)."""
        if self._stopping:
            return
        now = time.monotonic()
        breaks = [t for t in self._channel_breaks[worker_id] if now - t < CHANNEL_BREAK_WINDOW_S]
        self._channel_breaks[worker_id] = breaks + [now]
        if len(breaks) + 1 >= MAX_CHANNEL_BREAKS:
            log.warning("%s: its forward channel broke %d times in %ds; its requests go over "
                        "Ray calls for now", worker_id, len(breaks) + 1, CHANNEL_BREAK_WINDOW_S)
            self._retry_channel_later(worker_id)
            return
        self._in_background(self._reconnect(worker_id))

    def _retry_channel_later(self, worker_id: str) -> None:
        """One more try at the worker's channel after a delay that doubles
        with each failure: a network blip must not leave a worker on Ray
        calls for the rest of its life, nor a flapping one reconnect often."""
        if self._stopping or self.transport != "direct":
            return
        pending = self._channel_retries.get(worker_id)
        if pending is not None and not pending.done():
            return
        delay = self._channel_retry_delay.get(worker_id, self.channel_retry_s)
        self._channel_retry_delay[worker_id] = min(2 * delay, CHANNEL_RETRY_MAX_S)
        log.info("%s: next try at its forward channel in %.0fs", worker_id, delay)

        async def retry():
            await asyncio.sleep(delay)
            channel = self._channels.get(worker_id)
            if (self._stopping or (channel is not None and channel.usable)
                    or worker_id in self._down or worker_id in self._dead):
                return
            await self._open_channel(worker_id)

        self._channel_retries[worker_id] = self._in_background(retry())

    def _in_background(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _reconnect(self, worker_id: str) -> None:
        try:
            await asyncio.wait_for(self._actors[worker_id].info.remote(), INFO_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - dead or wedged
            self._worker_died(worker_id, "its forward channel broke and it does not answer")
            return
        if worker_id not in self._down and worker_id not in self._dead:
            await self._open_channel(worker_id)

    async def wait_ready(self) -> list[dict]:
        """Waits for every actor to have loaded its model; returns their info."""
        try:
            await asyncio.wait_for(self._placement.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerUnavailable(
                f"the cluster cannot place {len(self._actors)} workers of "
                f"{worker_resources(self.spec)} each within {PLACEMENT_TIMEOUT_S}s; add "
                "nodes or lower --workers / --mesh / --cpus-per-worker.") from None
        try:
            infos = list(await asyncio.gather(*(a.info.remote() for a in self._actors.values())))
        except RayActorError as error:
            raise WorkerUnavailable(f"a worker failed to start: {error}") from error
        await asyncio.gather(*(self._open_channel(i) for i in self._actors))
        return infos

    async def infos(self) -> list[dict]:
        """Every worker's info; one restarting or not answering is `ready: False`."""
        async def ask(worker_id):
            if worker_id in self._down or worker_id in self._dead:
                state = "restarting" if worker_id not in self._dead else "dead"
                return {"worker_id": worker_id, "ready": False, "error": state}
            try:
                info = await asyncio.wait_for(self._actors[worker_id].info.remote(),
                                              INFO_TIMEOUT_S)
                channel = self._channels[worker_id]
                info["forward_transport"] = ("direct" if channel is not None and channel.usable
                                             else "ray")
                return info
            except Exception as error:  # noqa: BLE001 - reported, not raised
                return {"worker_id": worker_id, "ready": False, "error": str(error)}
        return list(await asyncio.gather(*(ask(i) for i in self._actors)))

    def serving(self) -> bool:
        return any(i not in self._down and i not in self._dead for i in self._actors)

    def _alive(self, exclude=()) -> list[str]:
        ids = [i for i in self._actors
               if i not in self._dead and i not in self._down and i not in exclude]
        if not ids:
            restarting = len(self._down)
            raise WorkerUnavailable(
                f"no worker can take the request ({restarting} restarting)"
                if restarting else "no worker is alive")
        return ids

    def _worker_died(self, worker_id: str, why: str = "it died") -> None:
        """Takes a worker out of routing until it answers again (Ray
        restarts a dead one)."""
        if worker_id in self._down or worker_id in self._dead or self._stopping:
            return
        was_serving = self.serving()
        self._down.add(worker_id)
        log.warning("%s is out of routing until it answers again: %s", worker_id, why)
        self._in_background(self._await_restart(worker_id))
        if was_serving and not self.serving() and self.on_serving_change:
            self.on_serving_change(False)

    async def _await_restart(self, worker_id: str) -> None:
        actor, give_up = self._actors[worker_id], time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                # Calls to a restarting actor wait for its new process.
                await asyncio.wait_for(actor.info.remote(), 60)
                break
            except Exception:  # noqa: BLE001 - still restarting
                if time.monotonic() > give_up:
                    log.error("%s did not come back within %ds", worker_id, RESTART_TIMEOUT_S)
                    self._down.discard(worker_id)
                    self._dead.add(worker_id)
                    return
                await asyncio.sleep(0.5)
        self._channel_retry_delay.pop(worker_id, None)  # a new process: a fresh start
        await self._open_channel(worker_id)
        adapters = list(self._resident[worker_id].values())
        self._resident[worker_id] = {}
        for adapter in adapters:  # what it held before, so its traffic finds them
            try:
                await actor.load_adapter.remote(adapter)
                self._resident[worker_id][adapter.key] = adapter
            except Exception as error:  # noqa: BLE001 - loads on demand later
                log.warning("%s could not reload adapter %s: %s", worker_id, adapter.key,
                            error)
        was_serving = self.serving()
        self._down.discard(worker_id)
        self.restarts += 1
        log.warning("%s is back with %d adapters", worker_id, len(self._resident[worker_id]))
        if not was_serving and self.on_serving_change:
            self.on_serving_change(True)

    def _least_loaded(self, adapter_key: str | None = None, exclude=(), weight: int = 0,
                      tenant: str = "") -> str:
        """The worker to send `weight` sequences of `tenant` to.

        The queue bound is per tenant: a worker holds at most
        `max_queued_sequences` of each tenant's sequences, so one tenant
        filling its share never makes another's calls fail; the sum stays
        bounded because each tenant's tokens in flight are (admission).
        """
        # Ties go round-robin, so an idle pool still uses every worker.
        self._turn += 1
        ids = self._alive(exclude)
        roomy = [i for i in ids
                 if self._tenant_in_flight[i][tenant] + weight <= self.max_queued_sequences]
        if weight and not roomy:
            raise PoolSaturated(
                f"this tenant already has up to {self.max_queued_sequences} sequences queued "
                f"or running on every worker (its share of each worker's queue); retry after "
                f"{PoolSaturated.retry_after_ms} ms.")
        ids = roomy or ids
        order = ids[self._turn % len(ids):] + ids[: self._turn % len(ids)]

        def load(worker_id):
            bonus = self.RESIDENT_BONUS if adapter_key in self._resident[worker_id] else 0
            return self._in_flight[worker_id] - bonus
        return min(order, key=load)

    async def _call(self, worker_id: str, ref):
        """Awaits an actor call (or a step of a streaming one), turning Ray's
        wrappers into our errors."""
        try:
            return await ref
        except asyncio.CancelledError:
            if isinstance(ref, ray.ObjectRef):
                ray.cancel(ref)  # the actor drops the rows that have not run
            raise
        except RayTaskError as error:
            cause = error.cause
            if isinstance(cause, WorkerError):
                raise cause from None
            raise
        except RayActorError as error:
            self._worker_died(worker_id)
            raise WorkerUnavailable(f"{worker_id} died while serving the request: "
                                    f"{error}") from error

    async def forward(self, work: ForwardWork, tenant: str = "") -> ForwardResult:
        """Runs `work` of `tenant` on one worker; if that worker dies first, on
        another (nothing has been streamed yet: results arrive whole)."""
        key = work.adapter.key if work.adapter is not None else None
        tried, sent, retry = [], time.monotonic(), False
        broken = None  # a live worker whose channel broke under this request
        while True:
            if retry and work.timeout_s is not None:  # a retry gets what is left
                left = work.timeout_s - (time.monotonic() - sent)
                if left <= 0:
                    raise DeadlineExpired("the deadline passed while the request was retried" + (
                        f" after {', '.join(tried)} failed" if tried else ""))
                work, sent = dataclasses.replace(work, timeout_s=left), time.monotonic()
            weight = len(work.sequences)
            try:
                worker_id = self._least_loaded(key, exclude=tried, weight=weight,
                                               tenant=tenant)
            except WorkerUnavailable:
                if broken is None or broken in self._down | self._dead:
                    if tried:
                        raise WorkerUnavailable(
                            f"{', '.join(tried)} failed while serving the request and no "
                            "other worker can take it") from None
                    raise
                worker_id, broken = broken, None  # no one else: the same one, over Ray
            self._in_flight[worker_id] += weight
            self._tenant_in_flight[worker_id][tenant] += weight
            # A worker that may have to load the adapter first gets the
            # request on its own, so the load delays no other request.
            alone = key is not None and key not in self._resident[worker_id]
            try:
                result = await self._coalescers[worker_id].submit(work, alone=alone)
            except ChannelBroken:  # another worker if there is one, else this one over Ray
                tried.append(worker_id)
                broken, retry = worker_id, True
                continue
            except WorkerUnavailable:
                tried.append(worker_id)
                retry = True
                continue
            except AdapterNotResident:  # evicted since: resend, payload and all
                self._resident[worker_id].pop(key, None)
                retry = True
                continue
            finally:
                self._in_flight[worker_id] -= weight
                shares = self._tenant_in_flight[worker_id]
                shares[tenant] -= weight
                if not shares[tenant]:  # as small as the tenants active
                    del shares[tenant]
            if key is not None:
                self._remember(worker_id, work.adapter)
            return result

    async def load_adapter(self, adapter: AdapterRef) -> tuple[list[str], float]:
        """Makes `adapter` resident on every live worker; returns the workers
        and the slowest load time (ms)."""
        ids = self._alive()
        times = await asyncio.gather(*(self._call(i, self._actors[i].load_adapter.remote(adapter))
                                       for i in ids))
        for worker_id in ids:
            self._remember(worker_id, adapter)
        return ids, max(times)

    def _remember(self, worker_id: str, adapter: AdapterRef) -> None:
        """Notes `adapter` as resident on the worker, most recent last, as
        many as it has slots (older ones it has evicted by now)."""
        resident = self._resident[worker_id]
        resident.pop(adapter.key, None)
        resident[adapter.key] = adapter
        while len(resident) > self.spec.max_adapters:
            resident.pop(next(iter(resident)))

    async def unload_adapters(self, keys: list[str]) -> list[str]:
        """Releases `keys` on every live worker; returns the workers that held
        one and let it go (a slot in use is released when its requests end)."""
        ids = self._alive()
        freed = await asyncio.gather(*(
            self._call(i, self._actors[i].unload_adapters.remote(keys)) for i in ids))
        for worker_id in ids:
            for key in keys:
                self._resident[worker_id].pop(key, None)
        return [worker_id for worker_id, keys_freed in zip(ids, freed) if keys_freed]

    async def resident_adapters(self) -> dict[str, list[str]]:
        """worker id -> adapter keys resident now (asks the live workers; one
        that does not answer in time is left out)."""
        ids = [i for i in self._actors if i not in self._down and i not in self._dead]
        answers = await asyncio.gather(*(
            asyncio.wait_for(self._call(i, self._actors[i].resident_adapters.remote()),
                             INFO_TIMEOUT_S) for i in ids), return_exceptions=True)
        resident = {i: keys for i, keys in zip(ids, answers) if isinstance(keys, list)}
        for worker_id, keys in resident.items():
            known = self._resident[worker_id]
            self._resident[worker_id] = {k: known[k] for k in keys if k in known}
        return resident

    def fine_tune(self, job: FineTuneWork) -> tuple[str, Any]:
        """Starts `job` on a worker training the fewest jobs (a job slows its
        worker's serving; two on one worker take turns), the least loaded of
        those; returns (worker id, a Ray streaming generator of progress
        dicts). Call `fine_tune_ended(worker id)` once the stream is done."""
        fewest = min(self._training[i] for i in self._alive())
        worker_id = self._least_loaded(
            exclude=[i for i, jobs in self._training.items() if jobs > fewest])
        stream = self._actors[worker_id].fine_tune.options(num_returns="streaming").remote(job)
        self._training[worker_id] += 1
        return worker_id, stream

    def fine_tune_ended(self, worker_id: str) -> None:
        self._training[worker_id] = max(0, self._training[worker_id] - 1)

    async def next_progress(self, worker_id: str, stream) -> dict | None:
        """The next progress dict of a fine-tune stream, None at its end."""
        try:
            ref = await self._call(worker_id, stream.__anext__())
        except StopAsyncIteration:
            return None
        return await self._call(worker_id, ref)

    async def cancel_fine_tune(self, worker_id: str, job_id: str) -> None:
        await self._call(worker_id, self._actors[worker_id].cancel_fine_tune.remote(job_id))

    def shutdown(self) -> None:
        self._stopping = True  # what breaks from here on restarts nothing
        for task in [*self._watchers.values(), *self._channel_retries.values()]:
            task.cancel()
        for channel in self._channels.values():
            if channel is not None:
                channel.close()
        for actor in self._actors.values():
            ray.kill(actor)
        self._actors.clear()
        remove_placement_group(self._placement)
