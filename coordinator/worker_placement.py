"""The worker actors on Ray: placed, watched, restarted, each with its
scheduler.

A worker whose process (or node) dies is restarted by Ray and reloads its
model; meanwhile its scheduler takes nothing and fails what it had queued
(the router retries that elsewhere). Once the actor answers again, its
scheduler writes back every adapter its slot table held, then it serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from coordinator.ray_executor import RayExecutor
from coordinator.worker_scheduler import WorkerScheduler
from coordinator.worker_stats import WorkerStats
from worker.actor_options import actor_options, worker_resources
from worker.backbone_worker import CONCURRENCY_GROUPS, BackboneWorker, ExecutorInfo
from worker.errors import WorkerUnavailable
from worker.worker_config import WorkerSpec

log = logging.getLogger("gemma_serve.workers")

PLACEMENT_TIMEOUT_S = 120
# A restarted worker reloads its model; give up on it after this long.
RESTART_TIMEOUT_S = 600
# GetModelInfo must answer even when a worker is wedged.
INFO_TIMEOUT_S = 10


class WorkerPlacement:
    """`num_workers` actors of `spec`, spread over the cluster's nodes.

    `on_serving_change(bool)` is told when the workers go from none able to
    serve to some, and back.
    """

    def __init__(self, spec: WorkerSpec, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.spec = spec
        # One bundle per worker, spread over distinct nodes where resources
        # allow: a node's loss then takes out as few workers as possible.
        self._placement = placement_group([worker_resources(spec)] * num_workers,
                                          strategy="SPREAD")
        remote_class = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(BackboneWorker)
        self._actors, self.schedulers = {}, {}
        for i in range(num_workers):
            worker_id = f"worker-{i}"
            strategy = PlacementGroupSchedulingStrategy(self._placement,
                                                        placement_group_bundle_index=i)
            actor = remote_class.options(
                # The default group: info, until_stopped (always one), drops.
                scheduling_strategy=strategy, max_concurrency=8, max_restarts=-1,
                **actor_options(spec)).remote(worker_id, spec)
            self._actors[worker_id] = actor
            self.schedulers[worker_id] = WorkerScheduler(
                worker_id, RayExecutor(worker_id, actor, self.worker_died), spec.batching,
                spec.max_adapters)
        self._down: set[str] = set()   # restarting: no requests until it answers
        self._dead: set[str] = set()   # did not come back within RESTART_TIMEOUT_S
        self._watchers: dict[str, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()  # strong refs: the loop keeps weak ones
        self._stopping = False
        self.on_serving_change: Callable[[bool], None] | None = None

    async def wait_ready(self) -> list[ExecutorInfo]:
        """Waits for every actor to have loaded its model; returns their info."""
        try:
            await asyncio.wait_for(self._placement.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerUnavailable(
                f"the cluster cannot place {len(self._actors)} workers of "
                f"{worker_resources(self.spec)} each within {PLACEMENT_TIMEOUT_S}s; add "
                "nodes or lower --workers / --mesh / --cpus-per-worker.") from None
        try:
            infos = await asyncio.gather(*(a.info.remote() for a in self._actors.values()))
        except ray.exceptions.RayActorError as error:
            raise WorkerUnavailable(f"a worker failed to start: {error}") from error
        for worker_id in self._actors:
            self._watch(worker_id)
        return list(infos)

    def _watch(self, worker_id: str) -> None:
        """Ray's view of the worker's life, so that a death is noticed even
        while no call is running: `until_stopped` never completes while the
        actor lives, and fails when Ray finds it (or its node) dead."""
        async def watch(ref):
            try:
                await ref
            except asyncio.CancelledError:
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001 - the actor is gone already
                    pass
                raise
            except Exception:  # noqa: BLE001 - RayActorError or its relatives: gone
                self.worker_died(worker_id, "Ray reports it dead")
        old = self._watchers.get(worker_id)
        if old is not None and not old.done():
            old.cancel()  # one per incarnation of the actor
        self._watchers[worker_id] = self._in_background(
            watch(self._actors[worker_id].until_stopped.remote()))

    def _in_background(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def live(self, exclude=()) -> list[str]:
        """The workers that can take requests now, `exclude` left out.

        Raises:
            WorkerUnavailable: none.
        """
        ids = [i for i in self._actors
               if i not in self._dead and i not in self._down and i not in exclude]
        if not ids:
            restarting = len(self._down)
            raise WorkerUnavailable(
                f"no worker can take the request ({restarting} restarting)"
                if restarting else "no worker is alive")
        return ids

    def dead(self) -> set[str]:
        """Workers given up on: they did not come back after a restart."""
        return set(self._dead)

    def serving(self) -> bool:
        return any(i not in self._down and i not in self._dead for i in self._actors)

    def worker_died(self, worker_id: str, why: str = "it died") -> None:
        """Takes a worker out of routing until it answers again (Ray
        restarts a dead one); what its scheduler had queued fails over."""
        if worker_id in self._down or worker_id in self._dead or self._stopping:
            return
        was_serving = self.serving()
        self._down.add(worker_id)
        self.schedulers[worker_id].worker_down(WorkerUnavailable(f"{worker_id} died: {why}"))
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
                if time.monotonic() > give_up or self._stopping:
                    log.error("%s did not come back within %ds", worker_id, RESTART_TIMEOUT_S)
                    self._down.discard(worker_id)
                    self._dead.add(worker_id)
                    return
                await asyncio.sleep(0.5)
        scheduler = self.schedulers[worker_id]
        failed = await scheduler.rewrite_slots()  # what it held, so its traffic finds them
        for key in failed:
            log.warning("%s could not reload adapter %s", worker_id, key)
        self._watch(worker_id)
        was_serving = self.serving()
        scheduler.worker_up()
        self._down.discard(worker_id)
        log.warning("%s is back with %d adapters", worker_id,
                    len(scheduler.slots.resident()))
        if not was_serving and self.on_serving_change:
            self.on_serving_change(True)

    async def stats(self) -> list[WorkerStats]:
        """Every worker's record; one restarting or not answering is not ready."""
        async def ask(worker_id):
            scheduler = self.schedulers[worker_id]
            if worker_id in self._down or worker_id in self._dead:
                state = "dead" if worker_id in self._dead else "restarting"
                return WorkerStats.of(worker_id, None, scheduler, state)
            try:
                info = await asyncio.wait_for(scheduler.executor.info(), INFO_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                return WorkerStats.of(worker_id, None, scheduler, str(error) or "no answer")
            return WorkerStats.of(worker_id, info, scheduler)
        return list(await asyncio.gather(*(ask(i) for i in self._actors)))

    def shutdown(self) -> None:
        self._stopping = True  # what breaks from here on restarts nothing
        for task in list(self._background):
            task.cancel()
        for scheduler in self.schedulers.values():
            scheduler.close()
        for actor in self._actors.values():
            ray.kill(actor)
        self._actors.clear()
        remove_placement_group(self._placement)
