"""What a worker actor is given before JAX starts in it: its devices and
the platform JAX must use, whatever the coordinator's own environment says."""

import os
import subprocess
import sys

import pytest

from worker.worker_config import XLA_CPU_THREADS_ENV, WorkerSpec
from worker.actor_options import actor_options, worker_resources


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


def test_cpus_per_worker_are_reserved_and_size_xlas_thread_pool():
    from coordinator.serve_cli import parse_args
    spec = parse_args(["--workers", "2", "--mesh", "1x2", "--cpus-per-worker", "3"]).worker
    options = actor_options(spec)
    assert options["num_cpus"] == 3 and worker_resources(spec) == {"CPU": 3}
    assert env_of(options)[XLA_CPU_THREADS_ENV] == "3"
    gpu = WorkerSpec("default", use_gpus=True, cpus=2)
    assert actor_options(gpu)["num_cpus"] == 2 and worker_resources(gpu) == {"CPU": 2, "GPU": 1}


def test_without_cpus_a_worker_reserves_one_and_xla_keeps_its_default():
    options = actor_options(WorkerSpec("default"))
    assert options["num_cpus"] == 1
    assert XLA_CPU_THREADS_ENV not in env_of(options)
    with pytest.raises(ValueError, match="cpus must be >= 1"):
        WorkerSpec("default", cpus=0)


_COUNT_XLA_THREADS = """
import os
import jax, jax.numpy as jnp
jax.jit(lambda x: x @ x)(jnp.ones((256, 256))).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(names.count("tf_XLAEigen"))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_the_installed_xla_sizes_its_cpu_threads_by_the_variable_workers_get():
    # The variable is XLA's, not ours: this fails if a JAX upgrade stops
    # reading it, which would leave every worker with a thread per core.
    def xla_threads(n):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", XLA_CPU_THREADS_ENV: str(n),
               # One device: XLA runs at least a thread per device.
               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        run = subprocess.run([sys.executable, "-c", _COUNT_XLA_THREADS], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])
    assert (xla_threads(1), xla_threads(3)) == (1, 3)


def test_a_worker_reads_its_xla_thread_count_as_xla_does(monkeypatch):
    from worker.backbone_worker import _xla_cpu_threads
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv(XLA_CPU_THREADS_ENV, raising=False)
    monkeypatch.delenv("NPROC", raising=False)
    assert _xla_cpu_threads(WorkerSpec("default")) == cores
    assert _xla_cpu_threads(WorkerSpec("default", mesh_shape=(1, cores + 2))) == cores + 2
    monkeypatch.setenv("NPROC", "3")
    assert _xla_cpu_threads(WorkerSpec("default")) == 3
    monkeypatch.setenv(XLA_CPU_THREADS_ENV, "not a number")  # XLA skips it, so do we
    assert _xla_cpu_threads(WorkerSpec("default")) == 3
    monkeypatch.setenv(XLA_CPU_THREADS_ENV, "5")
    assert _xla_cpu_threads(WorkerSpec("default")) == 5
    assert _xla_cpu_threads(WorkerSpec("default", use_gpus=True)) == 0


def test_the_removed_transport_flags_are_accepted_with_a_warning(capsys):
    """Command lines written for the socket transport keep starting the
    service; the flags do nothing and say so."""
    from coordinator.serve_cli import parse_args
    config = parse_args(["--forward-transport", "ray", "--coalesce-ms", "2"])
    assert config.worker.preset
    err = capsys.readouterr().err
    assert "--forward-transport is ignored" in err and "--coalesce-ms is ignored" in err
    parse_args([])
    assert "ignored" not in capsys.readouterr().err
