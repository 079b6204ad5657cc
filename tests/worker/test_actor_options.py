"""What a worker actor is given before JAX starts in it: its devices and
the platform JAX must use, whatever the coordinator's own environment says."""

import pytest

from worker.worker_config import WorkerSpec
from worker.worker_pool import actor_options, worker_resources


def env_of(options):
    return options["runtime_env"]["env_vars"]


def test_cpu_worker_gets_fake_host_devices_for_its_mesh():
    options = actor_options(WorkerSpec("default", mesh_shape=(2, 4)))
    env = env_of(options)
    assert env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    assert "num_gpus" not in options
    assert worker_resources(WorkerSpec("default", mesh_shape=(2, 4))) == {"CPU": 1}


def test_gpu_worker_gets_ray_gpus_and_must_run_on_them(monkeypatch):
    # A coordinator kept off the GPU must not pass that on to its GPU workers.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    spec = WorkerSpec("default", mesh_shape=(1, 4), use_gpus=True)
    options = actor_options(spec)
    env = env_of(options)
    assert options["num_gpus"] == 4
    assert env["JAX_PLATFORMS"] == "cuda"
    assert "XLA_FLAGS" not in env  # no fake devices next to real ones
    assert worker_resources(spec) == {"CPU": 1, "GPU": 4}


@pytest.mark.parametrize("use_gpus", [False, True])
def test_workers_log_as_the_coordinator_does(monkeypatch, use_gpus):
    from worker.log_format import LOG_LEVEL_ENV
    monkeypatch.setenv(LOG_LEVEL_ENV, "WARNING")
    env = env_of(actor_options(WorkerSpec("default", use_gpus=use_gpus)))
    assert env[LOG_LEVEL_ENV] == "WARNING"
    assert env["KERAS_BACKEND"] == "jax"
