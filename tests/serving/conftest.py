"""One Ray instance and one real coordinator on 127.0.0.1 for the session.

Two workers, each a (1, 2) mesh over fake CPU devices in its own process,
serve the built-in default model; tests compare against the same model
loaded in-process. Auth is on with two tenants; the shared channel, stub
and client call as tenant ACME.
"""

import json
import os

import grpc
import pytest

from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from coordinator.admission_control import AdmissionLimits
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
from worker.worker_config import WorkerSpec

from service_support import (ACME_KEY, API_KEYS, BATCHING, COMPILATION_CACHE_ENV,  # noqa: F401
                             MAX_ADAPTER_RANK, MAX_ADAPTERS, GLOBEX_KEY, keyed_channel)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["GEMMA_SERVE_CACHE"] = str(tmp_path_factory.mktemp("gemma-serve-cache"))
    os.environ[COMPILATION_CACHE_ENV] = str(tmp_path_factory.mktemp("compilation-cache"))
    # address="local": a fresh instance, never one that happens to run here.
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps(API_KEYS))
    config = ServiceConfig(
        worker=WorkerSpec(preset="default", mesh_shape=(1, 2), batching=BATCHING,
                          max_adapters=MAX_ADAPTERS, max_adapter_rank=MAX_ADAPTER_RANK,
                          compilation_cache_dir=os.environ[COMPILATION_CACHE_ENV]),
        num_workers=2, host="127.0.0.1", port=0, max_sequences_per_request=32,
        max_text_bytes=16384,
        data_dir=str(tmp_path_factory.mktemp("data")), api_keys_file=str(keys_file),
        max_upload_bytes=1 << 20, metrics_port=0,
        # Roomy: the heavy-load tests hold 64K tokens at once; the limits
        # themselves are tested on a server of their own.
        admission=AdmissionLimits(max_requests=256, max_tokens=1 << 20, max_fine_tunes=4))
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def channel(service):
    with keyed_channel(service.address) as channel:  # default limits
        yield channel


@pytest.fixture(scope="session")
def stub(channel):
    return pb_grpc.GemmaServiceStub(channel)


@pytest.fixture(scope="session")
def client(service):
    from coordinator.client import GemmaClient

    with GemmaClient(service.address, api_key=ACME_KEY) as client:
        yield client


@pytest.fixture(scope="session")
def local_model(service):
    """The served model, in this process, unsharded."""
    from gemma_core import GemmaBackbone, GemmaTokenizer

    return GemmaBackbone.from_preset("default"), GemmaTokenizer.from_preset("default")
