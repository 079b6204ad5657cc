"""PEFT adapters through a real service on the PEFT fixture's base model:
upload (directory and archive), register by reference, serve mixed with
other kinds in one batch, export and re-upload, refuse bad input, and
fine-tune on all seven projections."""

import concurrent.futures
import dataclasses
import io
import json
import os
import shutil
import tarfile

import grpc
import numpy as np
import pytest
import safetensors.numpy

from fixture_support import FIXTURES, reference
from service_support import ACME_KEY, API_KEYS, GLOBEX_KEY, operator_worker_infos
from coordinator.client import GemmaClient
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.peft_archive import pack
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
from gemma_core import GemmaBackbone, LoraAdapter, lora_targets
from worker.worker_config import BatchingConfig, WorkerSpec

FIXTURE = FIXTURES / "hf_gemma2_tiny_peft"
ADAPTERS = ["peft_all", "peft_qv", "peft_rs"]
BATCHING = BatchingConfig(length_buckets=(16, 32), batch_buckets=(1, 4, 8))
# Fewer slots than the four adapters the mixing test uses: it must evict.
MAX_ADAPTERS = 3
PEFT = apb.ADAPTER_FORMAT_PEFT


@pytest.fixture(scope="module")
def peft_service(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-sources")
    for name in ADAPTERS:
        shutil.copytree(FIXTURE / name, root / name)
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps(API_KEYS))
    config = ServiceConfig(
        worker=WorkerSpec(preset=str(FIXTURE), mesh_shape=(1, 1), batching=BATCHING,
                          max_adapters=MAX_ADAPTERS, max_adapter_rank=16,
                          compilation_cache_dir=os.environ["GEMMA_SERVE_TEST_COMPILATION_CACHE"]),
        num_workers=1, host="127.0.0.1", port=0,
        data_dir=str(tmp_path_factory.mktemp("data")), api_keys_file=str(keys_file),
        max_upload_bytes=1 << 20, adapter_source_root=str(root))
    running = ServerThread(config)
    running.source_root = root
    yield running
    running.stop()


@pytest.fixture(scope="module")
def acme(peft_service):
    with GemmaClient(peft_service.address, api_key=ACME_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def base():
    return GemmaBackbone.from_preset(FIXTURE)


def rows():
    """The reference inputs as token-id lists, padding dropped."""
    ref = reference("hf_gemma2_tiny_peft")
    return [list(ids[mask.astype(bool)]) for ids, mask in zip(ref["token_ids"],
                                                                ref["padding_mask"])]


def forward(client, adapter_id=""):
    result = client.forward(token_ids=rows(), adapter_id=adapter_id)
    return [result.hidden_states[i][0] for i in range(len(rows()))]


def expected(name):
    ref = reference("hf_gemma2_tiny_peft")
    key = "hidden_states" if name == "base" else f"hidden_states_{name}"
    return [ref[key][i][ref["padding_mask"][i].astype(bool)] for i in range(len(rows()))]


def assert_rows_close(got, want, atol):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def code_of(call):
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def test_mixed_batch_of_peft_keras_hub_and_base_rows_equals_each_alone(
        peft_service, acme, base, tmp_path):
    for name in ADAPTERS:  # directories, as users have them
        uploaded = acme.upload_adapter(name, FIXTURE / name)
        assert uploaded["adapter_id"] == f"{name}@1"
    assert set(uploaded["targets"]) == {"query", "value", "attention_output", "ffw_linear"}
    all_linear = acme.list_adapters()[0]
    assert all_linear["name"] == "peft_all" and all_linear["targets"] == list(
        lora_targets.TARGETS)
    h5 = tmp_path / "qv.lora.h5"
    LoraAdapter.from_peft(FIXTURE / "peft_qv", base.config).write_lora_file(h5, base.config)
    acme.upload_adapter("qv_h5", h5)
    want = {**{name: expected(name) for name in ADAPTERS},
            "qv_h5": expected("peft_qv"), "base": expected("base")}
    ids = {name: "" if name == "base" else f"{name}@1" for name in want}
    alone = {name: forward(acme, ids[name]) for name in want}
    for name in want:
        assert_rows_close(alone[name], want[name], 1e-4)
    before = operator_worker_infos(peft_service)[0]
    # Five kinds at once, three rounds: they share batches, and with four
    # slots for four adapters plus reloads, slots are evicted and rewritten.
    with concurrent.futures.ThreadPoolExecutor(len(want) * 3) as pool:
        futures = [(name, pool.submit(forward, acme, ids[name]))
                   for _ in range(3) for name in want]
        for name, future in futures:
            assert_rows_close(future.result(), alone[name], 1e-5)
    acme.unload_adapter("peft_all")
    assert_rows_close(forward(acme, "peft_all@1"), alone["peft_all"], 1e-5)
    after = operator_worker_infos(peft_service)[0]
    assert int(after["compiled_functions"]) == 2 * len(BATCHING.shapes())
    assert int(after["programs_compiled"]) == int(before["programs_compiled"])
    assert int(after["compiled_slot_writers"]) == 1
    assert int(after["max_adapters_in_a_batch"]) >= 2  # kinds really shared batches
    assert int(after["adapter_evictions"]) > int(before["adapter_evictions"])


def test_export_then_reupload_gives_identical_outputs(peft_service, acme, tmp_path):
    acme.upload_adapter("round", FIXTURE / "peft_rs")
    original = forward(acme, "round@1")
    archive = acme.export_adapter("round@1", tmp_path, format="peft")
    assert archive.name == "round-v1.peft.tar"
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    exported = tmp_path / "out" / "round-v1"
    fixture_config = json.loads((FIXTURE / "peft_rs" / "adapter_config.json").read_text())
    config = json.loads((exported / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules",
                  "rank_pattern", "alpha_pattern", "bias", "fan_in_fan_out", "use_dora"):
        assert field in config and field in fixture_config, field
    assert (config["r"], config["use_rslora"]) == (fixture_config["r"], True)
    keys = set(safetensors.numpy.load_file(exported / "adapter_model.safetensors"))
    fixture_keys = set(safetensors.numpy.load_file(FIXTURE / "peft_rs" /
                                                   "adapter_model.safetensors"))
    assert keys == fixture_keys
    acme.upload_adapter("round", exported)
    acme.upload_adapter("round", archive)  # the archive as it came
    st = acme.export_adapter("round@1", tmp_path / "x.safetensors", format="safetensors")
    acme.upload_adapter("round", st)
    for version in (2, 3, 4):
        assert_rows_close(forward(acme, f"round@{version}"), original, 0)
    code, details = code_of(lambda: acme.export_adapter("round@1", tmp_path / "x.lora.h5"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "Export it as PEFT" in details
    assert not (tmp_path / "x.lora.h5").exists()


def test_register_adapter_by_reference(peft_service, acme, tmp_path, monkeypatch):
    root = peft_service.source_root
    registered = acme.register_adapter("by_path", str(root / "peft_all"))
    assert registered["source"] == f"register:{root / 'peft_all'}"
    assert_rows_close(forward(acme, "by_path@1"), expected("peft_all"), 1e-4)
    assert acme.register_adapter("by_path", "peft_qv")["adapter_id"] == "by_path@2"  # relative
    names = [a["adapter_id"] for a in acme.list_adapters()]
    outside = tmp_path / "outside"
    shutil.copytree(FIXTURE / "peft_qv", outside)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    cases = {str(outside): grpc.StatusCode.PERMISSION_DENIED,
             str(root / "escape"): grpc.StatusCode.PERMISSION_DENIED,
             f"{root}/../outside": grpc.StatusCode.PERMISSION_DENIED,
             "s3://bucket/adapter": grpc.StatusCode.INVALID_ARGUMENT,
             "https://example.com/adapter": grpc.StatusCode.INVALID_ARGUMENT}
    for source, want in cases.items():
        code, details = code_of(lambda: acme.register_adapter("nope", source))
        assert code == want, (source, details)
        assert str(tmp_path) not in details.replace(str(outside), "")
    # No network: the Hub's endpoint refuses connections.
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    code, details = code_of(lambda: acme.register_adapter("nope", "hf://org/adapter"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "upload" in details
    assert [a["adapter_id"] for a in acme.list_adapters()] == names


def peft_variant(tmp_path, name, config=None, tensors=None, source="peft_qv"):
    """A copy of a fixture adapter with its config or tensors changed."""
    directory = tmp_path / name
    shutil.copytree(FIXTURE / source, directory)
    if config is not None:
        settings = json.loads((directory / "adapter_config.json").read_text())
        config(settings)
        (directory / "adapter_config.json").write_text(json.dumps(settings))
    if tensors is not None:
        loaded = safetensors.numpy.load_file(directory / "adapter_model.safetensors")
        tensors(loaded)
        safetensors.numpy.save_file(loaded, directory / "adapter_model.safetensors")
    return directory


def first_key(tensors, part):
    return sorted(k for k in tensors if part in k)[0]


BAD_PEFT = {
    "missing config": (lambda d: (d / "adapter_config.json").unlink(),
                       grpc.StatusCode.INVALID_ARGUMENT, "lacks adapter_config.json"),
    "DoRA": (lambda d: None, grpc.StatusCode.INVALID_ARGUMENT, "use_dora"),
    "modules_to_save": (lambda d: None, grpc.StatusCode.INVALID_ARGUMENT, "modules_to_save"),
    "unpaired shapes": (lambda d: None, grpc.StatusCode.INVALID_ARGUMENT, "do not make a"),
    "another model's shapes": (lambda d: None, grpc.StatusCode.FAILED_PRECONDITION,
                               "another base model"),
    "layer the model lacks": (lambda d: None, grpc.StatusCode.FAILED_PRECONDITION,
                              "another base model"),
    "NaN factors": (lambda d: None, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
}


def bad_directory(tmp_path, case):
    if case == "DoRA":
        return peft_variant(tmp_path, case, config=lambda c: c.update(use_dora=True))
    if case == "modules_to_save":
        return peft_variant(tmp_path, case, config=lambda c: c.update(
            modules_to_save=["lm_head"]))
    if case == "unpaired shapes":  # lora_A of rank 1, lora_B of rank 2
        return peft_variant(tmp_path, "unpaired", tensors=lambda t: t.update({
            (key := first_key(t, "lora_A")): t[key][:-1].copy()}))
    if case == "another model's shapes":  # a hidden size of 95, not 96
        return peft_variant(tmp_path, "other", tensors=lambda t: t.update({
            (key := first_key(t, "lora_A")): t[key][:, :-1].copy()}))
    if case == "layer the model lacks":
        def extra_layer(t):
            for key in [k for k in t if ".layers.0." in k]:
                t[key.replace(".layers.0.", ".layers.7.")] = t[key]
        return peft_variant(tmp_path, case, tensors=extra_layer)
    if case == "NaN factors":
        def poison(t):
            t[first_key(t, "lora_B")][0, 0] = np.nan
        return peft_variant(tmp_path, case, tensors=poison)
    directory = peft_variant(tmp_path, case)
    BAD_PEFT[case][0](directory)
    return directory


def upload_archive(client, data, name="bad"):
    requests = [apb.UploadAdapterRequest(header=apb.UploadHeader(name=name, format=PEFT)),
                apb.UploadAdapterRequest(data=data)]
    return client._adapters.UploadAdapter(iter(requests), metadata=client._metadata,
                                          timeout=60)


@pytest.mark.parametrize("case", list(BAD_PEFT))
def test_bad_peft_adapters_get_their_code_and_leave_the_registry_unchanged(
        peft_service, acme, tmp_path, case):
    names = [a["adapter_id"] for a in acme.list_adapters()]
    directory = bad_directory(tmp_path, case)
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    code, details = code_of(lambda: upload_archive(acme, pack(files, "bad")))
    assert (code, BAD_PEFT[case][2] in details) == (BAD_PEFT[case][1], True), details
    assert str(tmp_path) not in details and "incoming" not in details
    assert [a["adapter_id"] for a in acme.list_adapters()] == names


@pytest.mark.parametrize("members, reason", [
    ({"../adapter_config.json": b"{}"}, "outside the archive"),
    ({"adapter_config.json": b"{}", "adapter_model.safetensors": b"", "run.sh": b""},
     "not one of its files"),
])
def test_archives_with_extra_or_traversing_members_are_refused(acme, members, reason):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    names = [a["adapter_id"] for a in acme.list_adapters()]
    code, details = code_of(lambda: upload_archive(acme, buffer.getvalue()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and reason in details
    assert [a["adapter_id"] for a in acme.list_adapters()] == names


def test_another_tenant_cannot_see_or_export_them(peft_service, acme, tmp_path):
    acme.upload_adapter("private_peft", FIXTURE / "peft_qv")
    with GemmaClient(peft_service.address, api_key=GLOBEX_KEY) as globex:
        code, _ = code_of(lambda: globex.export_adapter("private_peft", tmp_path,
                                                        format="peft"))
        assert code == grpc.StatusCode.NOT_FOUND
        assert not list(tmp_path.iterdir())


def test_all_linear_fine_tune_lowers_the_loss_and_adapts_every_projection(
        peft_service, acme, base, tmp_path):
    pattern = [11, 12, 13, 14, 15, 16, 17, 18] * 4
    job = acme.start_fine_tune("tuned", sequences=[pattern[i:] + pattern[:i] for i in range(8)],
                               rank=4, learning_rate=1e-2, steps=30, batch_size=8,
                               sequence_length=32, seed=1, targets=["all-linear"])
    final = list(acme.watch_fine_tune(job["job_id"], timeout=600))[-1]
    assert final["state"] == "succeeded", final["error"]
    assert final["loss"] < 0.9 * final["first_loss"]
    archive = acme.export_adapter(final["adapter_id"], tmp_path, format="peft")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "out", filter="data")
    adapter = LoraAdapter.from_peft(next((tmp_path / "out").iterdir()), base.config)
    assert adapter.targets == lora_targets.TARGETS and adapter.largest_rank == 4
    for target in lora_targets.TARGETS:  # every projection moved off the base
        update = max(np.abs(lora_targets.update(*adapter.kernels[(block, target)])).max()
                     for block in range(base.num_layers))
        assert update > 1e-4, target
    assert np.abs(forward(acme, final["adapter_id"])[0] - forward(acme)[0]).max() > 1e-3
    code, details = code_of(lambda: acme.start_fine_tune(
        "x", sequences=[pattern], steps=1, targets=["lm_head"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "lm_head" in details


def test_tokenize_without_a_tokenizer_is_failed_precondition(acme):
    # This fixture model ships no tokenizer: texts cannot be tokenized.
    code, details = code_of(lambda: acme.tokenize(["hello"]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no tokenizer" in details


@pytest.mark.parametrize("name", ["base", "peft_all", "peft_rs"])
def test_score_equals_numpy_on_the_reference_logits(peft_service, acme, name):
    """Gemma 2 (final soft cap on), base and PEFT adapters: Score against
    numpy on the logits transformers + peft computed."""
    from test_score_over_grpc import check_scores

    if name != "base" and not any(a["name"] == name for a in acme.list_adapters()):
        acme.upload_adapter(name, FIXTURE / name)
    ref = reference("hf_gemma2_tiny_peft")
    logits = ref["logits" if name == "base" else f"logits_{name}"]
    result = acme.score(token_ids=rows(), adapter_id="" if name == "base" else name,
                        token_logprobs=True, top_k=4, top_k_positions=[-1, 2],
                        candidates=[9, 99, 199])
    check_scores(result, logits, 4, [-1, 2], [9, 99, 199], inputs=rows())
