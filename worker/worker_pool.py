"""Starts the worker actors on Ray and sends each request to one of them."""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from worker.backbone_worker import BackboneWorker
from worker.errors import WorkerError, WorkerUnavailable
from worker.forward_work import ForwardResult, ForwardWork
from worker.worker_config import WorkerSpec

log = logging.getLogger("gemma_serve.worker_pool")


def worker_resources(spec: WorkerSpec) -> dict:
    """What one worker reserves: a CPU, and its GPUs when it uses them."""
    return {"CPU": 1, "GPU": spec.num_devices} if spec.use_gpus else {"CPU": 1}


def actor_options(spec: WorkerSpec) -> dict:
    """Ray options giving an actor its devices before JAX starts in it."""
    env = {"KERAS_BACKEND": "jax"}
    if spec.use_gpus:
        return {"num_gpus": spec.num_devices, "num_cpus": 1,
                "runtime_env": {"env_vars": env}}
    # A dedicated process with N fake host devices: sharding is real on CPU.
    env.update(JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={spec.num_devices}")
    return {"num_cpus": 1, "runtime_env": {"env_vars": env}}


PLACEMENT_TIMEOUT_S = 120


class WorkerPool:
    """N actors of one spec, spread over the cluster's nodes.

    Requests go to the worker with the fewest sequences in flight, as counted
    here (the coordinator is the only sender), ties taken in turn.
    """

    def __init__(self, spec: WorkerSpec, num_workers: int):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}.")
        self.spec = spec
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
                scheduling_strategy=strategy, max_concurrency=1000,
                **actor_options(spec)).remote(worker_id, spec)
        self._in_flight = dict.fromkeys(self._actors, 0)
        self._turn = 0
        self._dead: set[str] = set()  # restarts come with the reliability work

    async def wait_ready(self) -> list[dict]:
        """Waits for every actor to have loaded its model; returns their info."""
        try:
            await asyncio.wait_for(self._placement.ready(), PLACEMENT_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise WorkerUnavailable(
                f"the cluster cannot place {len(self._actors)} workers of "
                f"{worker_resources(self.spec)} each within {PLACEMENT_TIMEOUT_S}s; add "
                "nodes or lower --workers / --mesh.") from None
        try:
            return list(await asyncio.gather(*(a.info.remote() for a in self._actors.values())))
        except RayActorError as error:
            raise WorkerUnavailable(f"a worker failed to start: {error}") from error

    async def infos(self) -> list[dict]:
        """Every worker's info; a worker that does not answer is `ready: False`."""
        answers = await asyncio.gather(*(a.info.remote() for a in self._actors.values()),
                                       return_exceptions=True)
        return [answer if isinstance(answer, dict) else
                {"worker_id": worker_id, "ready": False, "error": str(answer)}
                for worker_id, answer in zip(self._actors, answers)]

    def _least_loaded(self) -> str:
        # Ties go round-robin, so an idle pool still uses every worker.
        self._turn += 1
        ids = [i for i in self._in_flight if i not in self._dead]
        if not ids:
            raise WorkerUnavailable("no worker is alive")
        order = ids[self._turn % len(ids):] + ids[: self._turn % len(ids)]
        return min(order, key=self._in_flight.get)

    async def forward(self, work: ForwardWork) -> ForwardResult:
        worker_id = self._least_loaded()
        weight = len(work.sequences)
        self._in_flight[worker_id] += weight
        ref = self._actors[worker_id].forward.remote(work)
        try:
            return await ref
        except asyncio.CancelledError:
            ray.cancel(ref)  # the actor drops the rows that have not run
            raise
        except RayTaskError as error:
            cause = error.cause
            if isinstance(cause, WorkerError):
                raise cause from None
            raise
        except RayActorError as error:
            self._dead.add(worker_id)  # never route to it again
            raise WorkerUnavailable(f"{worker_id} died while serving the request: "
                                    f"{error}") from error
        finally:
            self._in_flight[worker_id] -= weight

    def shutdown(self) -> None:
        for actor in self._actors.values():
            ray.kill(actor)
        self._actors.clear()
        remove_placement_group(self._placement)
