"""One tenant's load and activity, seen from another: never a refusal caused
by the other's work, never the other's private counters."""

import json
import threading

import grpc
import numpy as np

from coordinator.client import GemmaClient
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from gemma_core import LoraAdapter
from service_support import ACME_KEY, API_KEYS, GLOBEX_KEY, keyed_channel, operator_worker_infos
from test_tls_admission_shutdown import start_serve, stop

QUEUE_SHARE = 16  # --max-queued-sequences: each tenant's share of a worker's queue


def test_a_busy_tenant_within_its_limits_never_gets_another_refused(ray_session, tmp_path,
                                                                     local_model):
    """Tenant A keeps 6 callers x 8 sequences in flight against a queue share
    of 16, so its own calls are refused over and over; tenant B's calls, one
    sequence each, all succeed and are right. (With one bound for the whole
    worker, as before, A's 16 queued sequences refused B's calls.)"""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(API_KEYS))
    process, address = start_serve(ray_session, tmp_path, "--api-keys-file", keys,
                                   "--max-queued-sequences", QUEUE_SHARE)
    backbone = local_model[0]
    ids = [5, 6, 7, 8]
    expected = np.asarray(backbone.hidden_states(
        {"token_ids": np.array([ids]), "padding_mask": np.ones((1, 4), "int32")})[0])[0]
    busy_codes, stop_busy = [], threading.Event()

    def busy():
        with keyed_channel(address, ACME_KEY) as channel:
            stub = pb_grpc.GemmaServiceStub(channel)
            while not stop_busy.is_set():
                try:
                    list(stub.Forward(pb.ForwardRequest(
                        sequences=[pb.TokenSequence(ids=ids)] * 8), timeout=60))
                    busy_codes.append("OK")
                except grpc.RpcError as error:
                    busy_codes.append(error.code().name)

    threads = [threading.Thread(target=busy) for _ in range(6)]
    quiet = []
    try:
        for thread in threads:
            thread.start()
        with GemmaClient(address, api_key=GLOBEX_KEY) as client:
            while len(busy_codes) < 30:  # A's load is up
                threading.Event().wait(0.05)
            for _ in range(40):
                try:
                    result = client.forward(token_ids=[ids], timeout=60)
                    quiet.append(np.allclose(result.hidden_states[0][0], expected, atol=1e-5))
                except grpc.RpcError as error:
                    quiet.append(error.code().name)
    finally:
        stop_busy.set()
        for thread in threads:
            thread.join(60)
        stop(process)
    assert quiet == [True] * 40, [q for q in quiet if q is not True][:3]
    # A really was at its share: its own calls were refused meanwhile.
    assert "RESOURCE_EXHAUSTED" in busy_codes and "OK" in busy_codes
    assert set(busy_codes) <= {"OK", "RESOURCE_EXHAUSTED"}, set(busy_codes)


def _worker_counters(stub) -> list[pb.WorkerInfo]:
    return list(stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).workers)


def test_model_info_shows_a_tenant_only_its_own_adapter_activity(service, tmp_path,
                                                                 local_model):
    """Globex loads adapters; ACME's GetModelInfo does not move with it, and
    shows ACME's own usage; the operator's view counts everything."""
    backbone = local_model[0]
    path = tmp_path / "g.lora.h5"
    LoraAdapter.random(backbone.config, rank=2, std=0.1).write_lora_file(path, backbone.config)
    with keyed_channel(service.address, ACME_KEY) as acme_channel, \
            GemmaClient(service.address, api_key=GLOBEX_KEY) as globex:
        acme = pb_grpc.GemmaServiceStub(acme_channel)
        acme_before = _worker_counters(acme)
        loads_before = sum(int(w["adapter_loads"]) for w in operator_worker_infos(service))
        names = [f"isolated-{i}" for i in range(2)]
        for name in names:
            globex.upload_adapter(name, path)
            globex.load_adapter(name)
            globex.forward(token_ids=[[1, 2, 3]], adapter_id=name)
        acme_after = _worker_counters(acme)
        globex_view = globex.model_info()
        acme_info = acme.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)

    # The operator sees globex's loads; ACME sees none of them.
    assert sum(int(w["adapter_loads"]) for w in operator_worker_infos(service)) \
        >= loads_before + len(names)
    private = ("adapter_loads", "adapter_evictions", "fine_tune_steps", "max_adapters_in_a_batch")
    for before, after in zip(acme_before, acme_after):
        for field in private:
            assert getattr(after, field) == getattr(before, field) == 0, field
        # Globex's loads may evict ACME's adapters, never add to ACME's count.
        assert after.adapters_resident <= before.adapters_resident
    # Globex sees its own adapters in the slots (loaded on every worker).
    assert all(int(w.get("adapters_resident", 0)) >= len(names)
               for w in globex_view["workers"])
    # Each tenant's usage is its own.
    assert int(globex_view["usage"]["adapter_versions"]) >= len(names)
    with GemmaClient(service.address, api_key=ACME_KEY) as client:
        acme_adapters = client.list_adapters()
    assert acme_info.usage.adapter_versions == len(acme_adapters)
    assert acme_info.usage.adapter_bytes == sum(int(a["size_bytes"]) for a in acme_adapters)
    assert acme_info.usage.requests_in_flight == 0
