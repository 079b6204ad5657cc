"""One Ray instance and one real coordinator on 127.0.0.1 for the session.

Two workers, each a (1, 2) mesh over fake CPU devices in its own process,
serve the built-in default model; tests compare against the same model
loaded in-process.
"""

import os

import grpc
import pytest

from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
from worker.worker_config import BatchingConfig, WorkerSpec

BATCHING = BatchingConfig(length_buckets=(16, 64, 256, 1024), batch_buckets=(1, 4, 16),
                          max_batch_tokens=16384, max_wait_ms=2.0, layer_slots=5)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["GEMMA_SERVE_CACHE"] = str(tmp_path_factory.mktemp("gemma-serve-cache"))
    # address="local": a fresh instance, never one that happens to run here.
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session):
    config = ServiceConfig(
        worker=WorkerSpec(preset="default", mesh_shape=(1, 2), batching=BATCHING),
        num_workers=2, host="127.0.0.1", port=0, max_sequences_per_request=32)
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def channel(service):
    with grpc.insecure_channel(service.address) as channel:  # default limits
        yield channel


@pytest.fixture(scope="session")
def stub(channel):
    return pb_grpc.GemmaServiceStub(channel)


@pytest.fixture(scope="session")
def client(service):
    from coordinator.client import GemmaClient

    with GemmaClient(service.address) as client:
        yield client


@pytest.fixture(scope="session")
def local_model(service):
    """The served model, in this process, unsharded."""
    from gemma_core import GemmaBackbone, GemmaTokenizer

    return GemmaBackbone.from_preset("default"), GemmaTokenizer.from_preset("default")
