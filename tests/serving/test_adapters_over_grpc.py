"""Per-tenant LoRA adapters through the real service: upload, mix, swap, isolate."""

import concurrent.futures
import pathlib
import threading

import grpc
import numpy as np
import pytest
import safetensors.numpy

from service_support import (ACME_KEY, BATCHING, GLOBEX_KEY, MAX_ADAPTERS, keyed_channel,
                             operator_worker_infos)
from coordinator.client import GemmaClient
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from gemma_core import GemmaBackbone, LoraAdapter

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
LORA_H5 = apb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5
SAFETENSORS = apb.ADAPTER_FORMAT_SAFETENSORS


def random_adapter(config, seed, rank, alpha=None):
    return LoraAdapter.random(config, rank, alpha, seed=seed)


def lora_h5_bytes(adapter, config, tmp_path):
    path = tmp_path / f"a{np.random.default_rng().integers(1 << 30)}.lora.h5"
    adapter.write_lora_file(path, config)
    return path.read_bytes()


def upload_requests(name, fmt, data, chunk=64 << 10):
    yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name, format=fmt))
    for start in range(0, len(data), chunk):
        yield apb.UploadAdapterRequest(data=data[start:start + chunk])


@pytest.fixture(scope="module")
def adapters_stub(service):
    with keyed_channel(service.address, ACME_KEY) as channel:
        yield apb_grpc.AdapterServiceStub(channel)


@pytest.fixture(scope="module")
def globex(service):
    with keyed_channel(service.address, GLOBEX_KEY) as channel:
        yield apb_grpc.AdapterServiceStub(channel), pb_grpc.GemmaServiceStub(channel)


@pytest.fixture(scope="module")
def base(local_model):
    return local_model[0]


def with_adapter(base, adapter):
    """gemma_core's enable_lora model carrying `adapter`."""
    model = GemmaBackbone.from_config(base.get_config())
    model.set_weights(base.get_weights())
    if adapter is not None:
        adapter.apply_to(model)
    return model


def test_concurrent_requests_with_four_adapters_and_the_base_get_their_own_rows(
        service, adapters_stub, client, base, tmp_path):
    adapters = {f"mix-{i}": random_adapter(base.config, seed=i, rank=rank, alpha=alpha)
                for i, (rank, alpha) in enumerate([(2, 2.0), (4, 8.0), (8, 8.0), (3, 1.5)])}
    for name, adapter in adapters.items():
        adapters_stub.UploadAdapter(upload_requests(name, LORA_H5, lora_h5_bytes(
            adapter, base.config, tmp_path)) if name != "mix-3" else upload_requests(
            name, SAFETENSORS, safetensors.numpy.save(adapter.tensors(), metadata={
                "rank": "3", "alpha": "1.5", "base_fingerprint": base.fingerprint()})))
    rng = np.random.default_rng(0)
    jobs = [(name, rng.integers(1, 1024, int(rng.integers(3, 14))).tolist())
            for _ in range(4) for name in [*adapters, None]]
    barrier = threading.Barrier(len(jobs))

    def run(job):
        name, ids = job
        with GemmaClient(service.address, api_key=ACME_KEY) as own:
            own.model_info()  # connected before the burst, so that the calls arrive together
            barrier.wait()
            return own.forward(token_ids=[ids], layers=[1, -1], adapter_id=name or "")

    # Twice: the first burst also loads the adapters (each adapter's rows
    # wait for its own slot write, so whether two adapters share a batch
    # then depends on timing); in the second all four are resident.
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        first = list(pool.map(run, jobs))
        results = list(pool.map(run, jobs))
    for a, b in zip(first, results):
        np.testing.assert_allclose(a.hidden_states[0][1], b.hidden_states[0][1], atol=1e-5)
    models = {name: with_adapter(base, adapter) for name, adapter in
              [*adapters.items(), (None, None)]}
    for (name, ids), result in zip(jobs, results):
        expected = models[name].hidden_states(
            {"token_ids": np.array([ids], "int32"),
             "padding_mask": np.ones((1, len(ids)), "int32")}, layers=[1, -1])
        for got, want in zip(result.hidden_states[0], expected):
            np.testing.assert_allclose(got, np.asarray(want)[0], atol=1e-5)
        if name:
            assert result.adapter_id == f"{name}@1"
    assert max(int(w["max_adapters_in_a_batch"]) for w in operator_worker_infos(service)) > 1


def test_loads_unloads_and_evictions_never_recompile(service, adapters_stub, client, base,
                                                     tmp_path):
    names = [f"swap-{i}" for i in range(MAX_ADAPTERS + 2)]  # more than the slots
    for i, name in enumerate(names):
        adapters_stub.UploadAdapter(upload_requests(name, LORA_H5, lora_h5_bytes(
            random_adapter(base.config, seed=100 + i, rank=1 + i % 4), base.config, tmp_path)))
    before = {w["worker_id"]: w for w in operator_worker_infos(service)}
    stop = threading.Event()
    served = []

    def keep_serving():  # base-model traffic while slots churn
        with GemmaClient(service.address, api_key=ACME_KEY) as own:
            while not stop.is_set():
                served.append(own.forward(token_ids=[[5, 6, 7]]).hidden_states[0][0])

    background = threading.Thread(target=keep_serving)
    background.start()
    def loads_since_start():
        return sum(int(w["adapter_loads"]) - int(before[w["worker_id"]]["adapter_loads"])
                   for w in operator_worker_infos(service))

    try:
        # How many ops make a load depends on routing: go on until 20 loads
        # happened (each round of 10 ops on 6 adapters in 4 slots makes some).
        for op in range(400):
            if op % 10 == 0 and op and loads_since_start() >= 20:
                break
            name = names[op % len(names)]
            if op % 5 == 4:
                adapters_stub.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=name))
            elif op % 2:
                adapters_stub.LoadAdapter(apb.LoadAdapterRequest(adapter_id=name))
            else:
                client.forward(token_ids=[[1, 2, 3, 4]], adapter_id=name)
    finally:
        stop.set()
        background.join(60)
    after = operator_worker_infos(service)
    assert sum(int(w["adapter_loads"]) - int(before[w["worker_id"]]["adapter_loads"])
               for w in after) >= 20  # slot writes while serving
    assert sum(int(w["adapter_evictions"]) for w in after) > 0
    for worker in after:
        # The bucket programs compiled before ready serve every adapter mix.
        assert int(worker["compiled_functions"]) == 2 * len(BATCHING.shapes())
        assert int(worker["programs_compiled"]) == \
            int(before[worker["worker_id"]]["programs_compiled"])
        assert int(worker["compiled_slot_writers"]) == 1
    assert served and all(np.array_equal(s, served[0]) for s in served)


def test_tenants_never_see_each_others_adapters(adapters_stub, globex, base, tmp_path):
    globex_adapters, globex_forward = globex
    adapters_stub.UploadAdapter(upload_requests("private", LORA_H5, lora_h5_bytes(
        random_adapter(base.config, 7, 2), base.config, tmp_path)))
    listed = globex_adapters.ListAdapters(apb.ListAdaptersRequest()).adapters
    assert "private" not in {a.name for a in listed}
    answers = []
    for adapter_id in ("private", "never-existed"):
        with pytest.raises(grpc.RpcError) as caught:
            list(globex_forward.Forward(pb.ForwardRequest(
                sequences=[pb.TokenSequence(ids=[1, 2])], adapter_id=adapter_id)))
        answers.append((caught.value.code(),
                        caught.value.details().replace(adapter_id, "<id>")))
        for call, request in ((globex_adapters.LoadAdapter, apb.LoadAdapterRequest),
                              (globex_adapters.DeleteAdapter, apb.DeleteAdapterRequest)):
            with pytest.raises(grpc.RpcError) as caught:
                call(request(adapter_id=adapter_id))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert answers[0] == answers[1] and answers[0][0] == grpc.StatusCode.NOT_FOUND
    assert "private" in {a.name for a in adapters_stub.ListAdapters(
        apb.ListAdaptersRequest()).adapters}  # still there for its owner


@pytest.mark.parametrize("key", [None, "wrong-key-123456", "Basic abc"])
def test_missing_or_wrong_key_is_unauthenticated(service, key):
    metadata = [] if key is None else [("authorization", key if " " in key
                                        else f"Bearer {key}")]
    with grpc.insecure_channel(service.address) as channel:
        for call in (lambda: list(pb_grpc.GemmaServiceStub(channel).Forward(
                         pb.ForwardRequest(sequences=[pb.TokenSequence(ids=[1])]),
                         metadata=metadata)),
                     lambda: apb_grpc.AdapterServiceStub(channel).ListAdapters(
                         apb.ListAdaptersRequest(), metadata=metadata)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "key" in caught.value.details()


def registry_snapshot(stub):
    return sorted(a.adapter_id for a in stub.ListAdapters(apb.ListAdaptersRequest()).adapters)


BAD_UPLOADS = {
    "corrupt bytes": (LORA_H5, b"\x89HDF\r\n\x1a\n" + b"garbage" * 100,
                      grpc.StatusCode.INVALID_ARGUMENT, "not a valid lora.h5"),
    "safetensors garbage": (SAFETENSORS, b"{not json" * 10, grpc.StatusCode.INVALID_ARGUMENT,
                            "not a valid safetensors"),
    "oversized": (LORA_H5, b"\0" * (1 << 20) + b"\0", grpc.StatusCode.RESOURCE_EXHAUSTED,
                  "byte limit"),
    "no format": (apb.ADAPTER_FORMAT_UNSPECIFIED, b"x", grpc.StatusCode.INVALID_ARGUMENT,
                  "header.format"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_change_nothing(adapters_stub, case):
    fmt, data, code, message = BAD_UPLOADS[case]
    before = registry_snapshot(adapters_stub)
    with pytest.raises(grpc.RpcError) as caught:
        adapters_stub.UploadAdapter(upload_requests("bad", fmt, data))
    assert caught.value.code() == code and message in caught.value.details()
    assert registry_snapshot(adapters_stub) == before


def test_adapters_for_another_base_model_are_failed_precondition(adapters_stub, base,
                                                                 tmp_path):
    before = registry_snapshot(adapters_stub)
    # keras_hub's fixture adapter belongs to another architecture.
    data = (FIXTURES / "gemma1_tiny" / "adapter.lora.h5").read_bytes()
    with pytest.raises(grpc.RpcError) as caught:
        adapters_stub.UploadAdapter(upload_requests("other", LORA_H5, data))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another" in caught.value.details()
    # Same shapes, other weights: the fingerprint tells.
    adapter = random_adapter(base.config, 1, 2)
    data = safetensors.numpy.save(adapter.tensors(), metadata={
        "rank": "2", "alpha": "2.0", "base_fingerprint": "0123456789abcdef"})
    with pytest.raises(grpc.RpcError) as caught:
        adapters_stub.UploadAdapter(upload_requests("other", SAFETENSORS, data))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "0123456789abcdef" in caught.value.details()
    # A rank above the slots' maximum.
    data = lora_h5_bytes(random_adapter(base.config, 1, 16), base.config, tmp_path)
    with pytest.raises(grpc.RpcError) as caught:
        adapters_stub.UploadAdapter(upload_requests("other", LORA_H5, data))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum adapter rank" in caught.value.details()
    assert registry_snapshot(adapters_stub) == before


def test_export_and_delete(adapters_stub, client, base, tmp_path):
    adapter = random_adapter(base.config, 3, 4, alpha=2.0)
    record = adapters_stub.UploadAdapter(upload_requests(
        "exported", LORA_H5, lora_h5_bytes(adapter, base.config, tmp_path)))
    chunks = list(adapters_stub.ExportAdapter(apb.ExportAdapterRequest(
        adapter_id=record.adapter_id)))
    data = b"".join(c.data for c in chunks)
    assert chunks[0].total_bytes == len(data) and chunks[0].file_name.endswith(".lora.h5")
    path = tmp_path / "back.lora.h5"
    path.write_bytes(data)
    back = LoraAdapter.from_lora_file(path, base.config)
    for key, (a, b) in adapter.kernels.items():
        np.testing.assert_allclose(back.kernels[key][1] * back.scale, b * adapter.scale,
                                   rtol=1e-6)
    deleted = adapters_stub.DeleteAdapter(apb.DeleteAdapterRequest(adapter_id="exported"))
    assert [a.adapter_id for a in deleted.deleted] == [record.adapter_id]
    with pytest.raises(grpc.RpcError) as caught:
        client.forward(token_ids=[[1, 2]], adapter_id="exported")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
