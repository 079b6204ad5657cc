"""How a worker actor is started: what it reserves, and the environment JAX
starts with in its process."""

from __future__ import annotations

import os

from worker.log_format import LOG_FORMAT_ENV, LOG_LEVEL_ENV
from worker.worker_config import XLA_CPU_THREADS_ENV, WorkerSpec


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
