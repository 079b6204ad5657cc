"""One Ray instance and one real coordinator on 127.0.0.1 for the session.

Two workers, each a (1, 2) mesh over fake CPU devices in its own process,
serve the built-in default model; tests compare against the same model
loaded in-process.
"""

import asyncio
import os
import threading

import grpc
import pytest

from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from coordinator.server import GemmaServer
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


class ServerThread:
    """A GemmaServer on its own event loop, as `gemma-serve` runs it."""

    def __init__(self, config: ServiceConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = GemmaServer(config)
        self.call(self.server.start(), timeout=600)
        self.address = f"127.0.0.1:{self.server.port}"

    def call(self, coroutine, timeout=60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self):
        self.call(self.server.stop(grace=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


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
