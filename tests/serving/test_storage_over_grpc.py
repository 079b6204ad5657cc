"""Storage limits through the real service, on a server of its own whose
data directory is a small tmpfs this module mounts: a full disk, cancelled
exports, quotas, paged listing, and adapters whose values would overflow."""

import concurrent.futures
import json
import os
import random
import threading
import time

import grpc
import numpy as np
import pytest
import safetensors.numpy

from disk_support import disk_filled, free_bytes, small_filesystem
from service_support import (ACME_KEY, API_KEYS, BATCHING, COMPILATION_CACHE_ENV, GLOBEX_KEY,
                             MAX_ADAPTER_RANK,
                             MAX_ADAPTERS, keyed_channel)
from coordinator.client import GemmaClient
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
from coordinator.storage_quota import StorageQuota
from gemma_core import LoraAdapter
from gemma_core.default_preset import DEFAULT_CONFIG
from gemma_core.lora_adapter import MAX_LORA_MAGNITUDE
from worker.worker_config import WorkerSpec

SAFETENSORS = apb.ADAPTER_FORMAT_SAFETENSORS
MAX_VERSIONS = 30
STORAGE_FULL = "storage is full"


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    with small_filesystem(tmp_path_factory.mktemp("disk") / "small", "8m") as mount_point:
        yield mount_point


@pytest.fixture(scope="module")
def server(ray_session, disk, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps(API_KEYS))
    config = ServiceConfig(
        # Compiled programs elsewhere: the small disk is for what tenants store.
        worker=WorkerSpec(preset="default", mesh_shape=(1, 1), batching=BATCHING,
                          max_adapters=MAX_ADAPTERS, max_adapter_rank=MAX_ADAPTER_RANK,
                          compilation_cache_dir=os.environ[COMPILATION_CACHE_ENV]),
        num_workers=1, host="127.0.0.1", port=0, data_dir=str(disk / "data"),
        api_keys_file=str(keys_file), max_upload_bytes=1 << 20, metrics_port=None,
        storage_quota=StorageQuota(max_adapter_versions=MAX_VERSIONS))
    running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def acme(server):
    with GemmaClient(server.address, api_key=ACME_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def acme_stub(server):
    with keyed_channel(server.address, ACME_KEY) as channel:
        yield apb_grpc.AdapterServiceStub(channel)


def safetensors_file(path, adapter, fingerprint):
    path.write_bytes(safetensors.numpy.save(adapter.tensors(), metadata={
        "rank": str(adapter.rank), "alpha": repr(adapter.alpha),
        "base_fingerprint": fingerprint}))
    return path


def small_adapter(seed, rank=2):
    return LoraAdapter.random(DEFAULT_CONFIG, rank, seed=seed, std=0.05)


def upload(client, name, adapter, tmp_path):
    fingerprint = client.model_info()["base_fingerprint"]
    return client.upload_adapter(name, safetensors_file(
        tmp_path / f"{name}-{random.getrandbits(32)}.safetensors", adapter, fingerprint))


def ids(client):
    return [adapter["adapter_id"] for adapter in client.list_adapters()]


def refused(call, code):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details()


def test_a_full_disk_is_resource_exhausted_and_delete_frees_space(acme, disk, tmp_path):
    kept = upload(acme, "kept", small_adapter(1), tmp_path)
    exported = acme.export_adapter("kept", tmp_path / "before.lora.h5").read_bytes()
    pending = safetensors_file(tmp_path / "new.safetensors", small_adapter(2),
                               acme.model_info()["base_fingerprint"])
    adapters, jobs = ids(acme), acme.list_fine_tunes()
    with disk_filled(disk):
        for call in (lambda: acme.upload_adapter("new", pending),
                     lambda: acme.upload_dataset("data", [[2, 5, 6, 7]] * 64),
                     lambda: acme.start_fine_tune("tuned", sequences=[[2, 5, 6, 7]] * 8,
                                                  steps=1)):
            details = refused(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert STORAGE_FULL in details and "DeleteAdapter" in details, details
            assert str(disk) not in details
        assert ids(acme) == adapters and acme.list_fine_tunes() == jobs
        # Reading needs no space: export and serving go on.
        assert acme.export_adapter("kept", tmp_path / "full.lora.h5").read_bytes() == exported
        result = acme.forward(token_ids=[[2, 5, 6]], adapter_id="kept")
        assert result.adapter_id == kept["adapter_id"]
        assert free_bytes(disk) == 0
        assert [a["adapter_id"] for a in acme.delete_adapter("kept")] == [kept["adapter_id"]]
        assert free_bytes(disk) > 0
        assert "kept" not in {a["name"] for a in acme.list_adapters()}


def test_cancelled_exports_leave_no_file(acme, acme_stub, disk, tmp_path):
    upload(acme, "exported", small_adapter(3, rank=8), tmp_path)
    before = sorted(p for p in (disk / "data").rglob("*") if p.is_file())
    rng = random.Random(0)

    def export_and_cancel(delay):
        call = acme_stub.ExportAdapter(apb.ExportAdapterRequest(adapter_id="exported"))
        time.sleep(delay)
        call.cancel()
        try:
            for _ in call:
                pass
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.CANCELLED

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(export_and_cancel, [rng.uniform(0, 0.05) for _ in range(20)]))
    time.sleep(1.0)  # let any thread a cancelled call left behind finish
    after = sorted(p for p in (disk / "data").rglob("*") if p.is_file())
    assert after == before


def test_the_version_quota_refuses_and_stores_nothing(server, tmp_path):
    with GemmaClient(server.address, api_key=GLOBEX_KEY) as globex:
        seed = 100
        while len(ids(globex)) < MAX_VERSIONS:
            upload(globex, f"q{seed % 3}", small_adapter(seed, rank=1), tmp_path)
            seed += 1
        before = ids(globex)
        details = refused(lambda: upload(globex, "q0", small_adapter(seed, rank=1), tmp_path),
                          grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert f"stores {MAX_VERSIONS} adapter versions" in details
        assert f"--tenant-max-adapter-versions {MAX_VERSIONS}" in details
        assert ids(globex) == before


def test_pages_return_every_adapter_once_while_others_publish(acme, acme_stub, tmp_path):
    for i in range(10):
        upload(acme, f"page-{i % 4}", small_adapter(200 + i, rank=1), tmp_path)
    present = set(ids(acme))
    stop = threading.Event()

    def publish_meanwhile():
        i = 0
        while not stop.is_set() and i < 8:
            upload(acme, f"page-{i % 5}", small_adapter(300 + i, rank=1), tmp_path)
            i += 1

    background = threading.Thread(target=publish_meanwhile)
    background.start()
    try:
        seen, token = [], ""
        while True:
            reply = acme_stub.ListAdapters(apb.ListAdaptersRequest(page_size=3,
                                                                   page_token=token))
            assert len(reply.adapters) <= 3
            seen += [(a.name, a.version) for a in reply.adapters]
            token = reply.next_page_token
            if not token:
                break
    finally:
        stop.set()
        background.join()
    assert len(seen) == len(set(seen)) and seen == sorted(seen)
    assert present <= {f"{name}@{version}" for name, version in seen}
    everything = acme_stub.ListAdapters(apb.ListAdaptersRequest(page_size=1000))
    assert not everything.next_page_token
    assert ids(acme) == [a.adapter_id for a in everything.adapters]  # the client pages too
    for request, field in ((apb.ListAdaptersRequest(page_token="bm90IGEgdG9rZW4"),
                            "page_token"), (apb.ListAdaptersRequest(page_size=-1), "page_size")):
        details = refused(lambda: acme_stub.ListAdapters(request),
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert details.startswith(field), details


def uniform(a_value, b_value, alpha=1.0):
    """Rank 1; a and b constant on every query and value projection."""
    config = DEFAULT_CONFIG
    return {(block, target): (
        np.full((config.num_query_heads if target == "query" else config.num_key_value_heads,
                 config.hidden_dim, 1), a_value, "float32"),
        np.full((1, config.head_dim), b_value, "float32"))
        for block in range(config.num_layers) for target in ("query", "value")}


def test_adapters_that_would_overflow_are_refused_and_one_just_under_serves(
        acme, acme_stub, tmp_path):
    fingerprint = acme.model_info()["base_fingerprint"]
    row = small_adapter(5, rank=4).tensors()
    row["blocks.2.value.lora_b"][1] = 3e38  # a factor row of 3e38
    alpha = small_adapter(6, rank=1).tensors()  # alpha 3e38 at rank 1
    before = ids(acme)
    for name, tensors, metadata in (("row", row, {"rank": "4", "alpha": "4.0"}),
                                    ("alpha", alpha, {"rank": "1", "alpha": "3e38"})):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(safetensors.numpy.save(tensors, metadata={
            **metadata, "base_fingerprint": fingerprint}))
        details = refused(lambda: acme.upload_adapter(name, path),
                          grpc.StatusCode.INVALID_ARGUMENT)
        assert "block " in details and "limit of 10000" in details, details
    assert ids(acme) == before
    edge = LoraAdapter(rank=1, alpha=1.0, kernels=uniform(
        100.0, 0.99 * MAX_LORA_MAGNITUDE / 100))
    upload(acme, "edge", edge, tmp_path)
    layers = list(range(DEFAULT_CONFIG.num_layers + 1))
    result = acme.forward(token_ids=[list(range(2, 60)), [2, 7, 9]], layers=layers,
                          adapter_id="edge")
    for row_states in result.hidden_states:
        for state in row_states:
            assert np.isfinite(state).all()
    assert not np.allclose(result.hidden_states[0][-1], acme.forward(
        token_ids=[list(range(2, 60))], layers=layers).hidden_states[0][-1])
