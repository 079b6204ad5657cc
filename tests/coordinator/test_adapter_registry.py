"""The adapter registry on real files: publish, versions, tenant isolation,
imports, corruption and crashes."""

import hashlib
import inspect
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from fixture_support import FIXTURES, TINY_CONFIG
from coordinator.adapter_record import FORMAT
from coordinator.adapter_registry import AdapterRegistry
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from gemma_core import GemmaConfig, LoraAdapter
from gemma_core.gemma_lora import keras_hub_lora_index, read_lora_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = GemmaConfig(**TINY_CONFIG)
FINGERPRINT = "tiny-base-1"


def random_adapter(rank=4, alpha=None, seed=0, config=CONFIG):
    """Random factors of the right shapes on every block's query and value."""
    return LoraAdapter.random(config, rank, alpha, seed=seed, std=1.0)


def assert_same(got, want):
    assert (got.rank, got.alpha) == (want.rank, want.alpha)
    assert sorted(got.kernels) == sorted(want.kernels)
    for key, (a, b) in want.kernels.items():
        np.testing.assert_array_equal(got.kernels[key][0], a)
        np.testing.assert_array_equal(got.kernels[key][1], b)


def tree(root):
    """Every path under `root`, to show that a refused request changed nothing."""
    return sorted(str(path.relative_to(root)) for path in Path(root).rglob("*"))


@pytest.fixture()
def root(tmp_path):
    return tmp_path / "adapters"


@pytest.fixture()
def registry(root):
    return AdapterRegistry(root, CONFIG, FINGERPRINT)


def test_publish_resolve_load_round_trip(registry):
    adapter = random_adapter(alpha=8.0)
    record = registry.publish("acme", "support", adapter, "finetune:job-1")
    assert (record.adapter_id, record.version, record.rank, record.alpha) == (
        "support@1", 1, 4, 8.0)
    assert (record.targets, record.layers, record.source) == (("query", "value"), (0, 1),
                                                              "finetune:job-1")
    assert record.num_parameters == adapter.num_parameters() and record.fits_base
    assert record.path == registry.root / "acme" / "support" / "1"
    payload = (record.path / "adapter.safetensors").read_bytes()
    assert (record.sha256, record.size_bytes) == (hashlib.sha256(payload).hexdigest(),
                                                  len(payload))
    manifest = json.loads((record.path / "manifest.json").read_text())
    assert manifest == record.to_manifest() and manifest["format"] == FORMAT
    with safetensors.safe_open(record.path / "adapter.safetensors", "numpy") as handle:
        assert handle.metadata() == {"format": FORMAT, "rank": "4", "alpha": "8.0",
                                     "base_fingerprint": FINGERPRINT}
    assert registry.list("acme") == [record]
    assert registry.resolve("acme", "support@1") == record
    loaded = registry.load(record)
    assert_same(loaded, adapter)
    assert registry.load(record) is loaded  # cached: Forward resolves adapters often
    assert not loaded.kernels[(0, "query")][0].flags.writeable  # shared, so read-only


def test_the_load_cache_is_bounded(root):
    registry = AdapterRegistry(root, CONFIG, FINGERPRINT, cache_size=1)
    first = registry.publish("acme", "support", random_adapter(seed=0), "test")
    second = registry.publish("acme", "support", random_adapter(seed=1), "test")
    loaded = registry.load(first)
    registry.load(second)
    assert registry.load(first) is not loaded
    assert_same(registry.load(first), loaded)


def test_versions_increment_and_a_bare_name_is_the_latest(registry):
    records = [registry.publish("acme", "support", random_adapter(seed=seed), "test")
               for seed in range(3)]
    registry.publish("acme", "another", random_adapter(), "test")
    assert [r.adapter_id for r in records] == ["support@1", "support@2", "support@3"]
    assert registry.resolve("acme", "support") == records[-1]
    assert [r.adapter_id for r in registry.list("acme")] == [
        "another@1", "support@1", "support@2", "support@3"]
    assert_same(registry.load(registry.resolve("acme", "support@2")), random_adapter(seed=1))


def test_concurrent_publishes_of_one_name_get_distinct_versions(registry):
    threads = [threading.Thread(target=registry.publish,
                                args=("acme", "support", random_adapter(seed=seed), "test"))
               for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.version for r in registry.list("acme")] == list(range(1, 9))
    for record in registry.list("acme"):
        registry.load(record)


def test_a_version_taken_meanwhile_on_disk_makes_publish_take_the_next(registry, monkeypatch):
    """If the rename finds its target already there, publish moves on to the
    next number instead of failing or overwriting."""
    registry.publish("acme", "support", random_adapter(), "test")
    monkeypatch.setattr(registry, "_next_version", lambda tenant, name, floor: floor)
    record = registry.publish("acme", "support", random_adapter(seed=1), "test")
    assert record.adapter_id == "support@2"
    assert_same(registry.load(registry.resolve("acme", "support@1")), random_adapter())
    assert list((registry.root / ".incoming").iterdir()) == []


def test_another_tenants_adapter_looks_exactly_like_a_missing_one(registry):
    """The NotFound message depends only on the id sent, so a tenant learns
    nothing about other tenants' adapters."""
    registry.publish("acme", "support", random_adapter(), "test")
    for adapter_id in ("support", "support@1", "support@2", "nope", "support@x", "@1", ""):
        with pytest.raises(NotFound) as caught:
            registry.resolve("globex", adapter_id)
        assert str(caught.value) == f"adapter_id: no adapter {adapter_id!r} for this tenant."
        with pytest.raises(NotFound) as missing:
            registry.resolve("nobody", adapter_id)
        assert str(missing.value) == str(caught.value)
    with pytest.raises(NotFound):
        registry.delete("globex", "support")
    assert registry.list("globex") == [] and registry.resolve("acme", "support")


@pytest.mark.parametrize("tenant, name", [("acme", "../escape"), ("acme", ".hidden"),
                                          ("acme", ""), ("acme", "x" * 65), ("a/b", "ok"),
                                          ("acme", "with@version")])
def test_names_of_the_wrong_form_are_refused(registry, tenant, name):
    with pytest.raises(InvalidArgument, match="letters, digits"):
        registry.publish(tenant, name, random_adapter(), "test")
    assert tree(registry.root) == [".incoming"]


def test_keras_hub_lora_file_imports(root):
    """The keras_hub fixture (alpha is the rank there) imports as its factors."""
    fixture = FIXTURES / "gemma1_tiny"
    config = GemmaConfig.from_kwargs(json.loads((fixture / "config.json").read_text())["config"])
    registry = AdapterRegistry(root, config, FINGERPRINT)
    record = registry.import_file("acme", "fixture", fixture / "adapter.lora.h5", "lora.h5")
    assert (record.rank, record.alpha, record.source) == (4, 4.0, "upload:lora.h5")
    rank, by_index = read_lora_file(fixture / "adapter.lora.h5")
    adapter = registry.load(record)
    assert adapter.rank == rank and len(adapter.kernels) == len(by_index)
    for (block, target), (a, b) in adapter.kernels.items():
        want_a, want_b = by_index[keras_hub_lora_index(block, target, False, False)]
        np.testing.assert_array_equal(a, want_a)
        np.testing.assert_array_equal(b, want_b)


def test_own_safetensors_file_imports_into_another_registry(registry, tmp_path):
    adapter = random_adapter(rank=3, alpha=6.0)
    original = registry.publish("acme", "support", adapter, "test")
    other = AdapterRegistry(tmp_path / "other", CONFIG, FINGERPRINT)
    record = other.import_file("globex", "copy", original.path / "adapter.safetensors",
                               "safetensors")
    assert (record.adapter_id, record.source) == ("copy@1", "upload:safetensors")
    assert_same(other.load(record), adapter)


def test_adapters_for_another_base_are_refused_and_change_nothing(registry, tmp_path):
    registry.publish("acme", "support", random_adapter(), "test")
    before = tree(registry.root)
    foreign = AdapterRegistry(tmp_path / "foreign", CONFIG, "other-base-7")
    made_elsewhere = foreign.publish("acme", "x", random_adapter(), "test")
    with pytest.raises(FailedPrecondition, match="'other-base-7'.*'tiny-base-1'"):
        registry.import_file("acme", "support", made_elsewhere.path / "adapter.safetensors",
                             "safetensors")
    wide = GemmaConfig(**{**TINY_CONFIG, "hidden_dim": 32, "num_layers": 3})
    with pytest.raises(FailedPrecondition, match="another base model"):
        registry.publish("acme", "support", random_adapter(config=wide), "test")
    random_adapter(config=wide).write_lora_file(tmp_path / "wide.lora.h5", wide)
    with pytest.raises(FailedPrecondition, match="another base model"):
        registry.import_file("acme", "support", tmp_path / "wide.lora.h5", "lora.h5")
    assert tree(registry.root) == before
    assert [r.adapter_id for r in registry.list("acme")] == ["support@1"]


@pytest.mark.parametrize("fmt", ["lora.h5", "safetensors"])
def test_corrupt_uploads_are_invalid_and_leave_nothing_behind(registry, fmt):
    upload = registry.new_upload_path()
    try:
        upload.write_bytes(b"\x89HDF not really" * 100)
        with pytest.raises(InvalidArgument, match=f"not a valid {fmt} LoRA file") as caught:
            registry.import_file("acme", "support", upload, fmt)
        assert str(upload) not in str(caught.value)  # no server paths in messages
    finally:
        upload.unlink()
    assert tree(registry.root) == [".incoming"]


def test_safetensors_without_adapter_metadata_is_invalid(registry, tmp_path):
    path = tmp_path / "bare.safetensors"
    safetensors.numpy.save_file(random_adapter().tensors(), path)
    with pytest.raises(InvalidArgument, match="metadata lacks"):
        registry.import_file("acme", "support", path, "safetensors")
    with pytest.raises(InvalidArgument, match="format"):
        registry.import_file("acme", "support", path, "pt")
    assert registry.list("acme") == []


def test_failed_publish_leaves_nothing_behind(registry, monkeypatch):
    def no_space(source, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "rename", no_space)
    with pytest.raises(OSError, match="No space"):
        registry.publish("acme", "support", random_adapter(), "test")
    monkeypatch.undo()
    assert registry.list("acme") == [] and list((registry.root / ".incoming").iterdir()) == []


def test_corruption_on_disk_is_caught_at_load_and_quarantined_at_restart(registry, caplog):
    record = registry.publish("acme", "support", random_adapter(), "test")
    tensors = record.path / "adapter.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="corrupt on disk.*delete and re-upload"):
        registry.load(record)
    with caplog.at_level(logging.WARNING, "gemma_serve.adapters"):
        restarted = AdapterRegistry(registry.root, CONFIG, FINGERPRINT)
    assert restarted.list("acme") == [] and not record.path.exists()
    assert "checksum mismatch" in caplog.text
    kept = list((registry.root / ".quarantine" / "acme" / "support").iterdir())
    assert len(kept) == 1 and (kept[0] / "adapter.safetensors").read_bytes() == bytes(data)


def test_restart_empties_incoming_and_quarantines_incomplete_versions(registry, caplog):
    whole = registry.publish("acme", "support", random_adapter(), "test")
    half = registry.publish("acme", "support", random_adapter(seed=1), "test")
    (half.path / "manifest.json").unlink()
    (registry.new_upload_path()).write_bytes(b"half an upload")
    (registry.root / ".incoming" / "publish-crashed").mkdir()
    with caplog.at_level(logging.WARNING, "gemma_serve.adapters"):
        restarted = AdapterRegistry(registry.root, CONFIG, FINGERPRINT)
    assert restarted.list("acme") == [whole]
    assert list((registry.root / ".incoming").iterdir()) == []
    assert "quarantined" in caplog.text and "manifest.json" in caplog.text
    assert restarted.publish("acme", "support", random_adapter(), "test").version == 3


def test_adapter_of_a_previous_base_stays_listed_but_does_not_load(registry):
    record = registry.publish("acme", "support", random_adapter(), "test")
    upgraded = AdapterRegistry(registry.root, CONFIG, "tiny-base-2")
    [listed] = upgraded.list("acme")
    assert listed.sha256 == record.sha256 and not listed.fits_base
    with pytest.raises(FailedPrecondition, match="'tiny-base-1' but this server runs"):
        upgraded.load(listed)


CRASH_SCRIPT = """
import sys
import numpy as np
from coordinator.adapter_registry import AdapterRegistry
from gemma_core import GemmaConfig, LoraAdapter
CONFIG = GemmaConfig(**{config!r})
{random_adapter}
registry = AdapterRegistry(sys.argv[1], CONFIG, "tiny-base-1")
adapter = random_adapter(rank=256, seed=7)
print("publishing", flush=True)
while True:
    registry.publish("acme", "big", adapter, "test")
    for old in registry.list("acme")[:-2]:
        registry.delete("acme", old.adapter_id)
"""


def test_a_publish_killed_midway_leaves_only_whole_adapters(root):
    """SIGKILL at a random moment of a publish-and-delete loop (about 1 MB
    per adapter): a restart lists whole adapters only, each loads, nothing is
    quarantined and no leftovers remain."""
    script = CRASH_SCRIPT.format(config=TINY_CONFIG,
                                 random_adapter=inspect.getsource(random_adapter))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", script, str(root)], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert child.stdout.readline() == "publishing\n"
            time.sleep(random.uniform(0.05, 0.5))
        finally:
            child.kill()
            child.wait()
        registry = AdapterRegistry(root, CONFIG, FINGERPRINT)
        records = registry.list("acme")
        assert len(records) <= 3
        for record in records:
            assert_same(registry.load(record), random_adapter(rank=256, seed=7))
        assert not (root / ".quarantine").exists()
        assert list((root / ".incoming").iterdir()) == []
    assert records, "the child never finished a publish; sleep longer"


def test_delete_one_version_or_all(registry):
    for seed in range(3):
        registry.publish("acme", "support", random_adapter(seed=seed), "test")
    [second] = registry.delete("acme", "support@2")
    assert second.version == 2 and not second.path.exists()
    with pytest.raises(NotFound):
        registry.load(second)
    assert [r.version for r in registry.list("acme")] == [1, 3]
    assert [r.version for r in registry.delete("acme", "support")] == [1, 3]
    assert registry.list("acme") == [] and not (registry.root / "acme").exists()
    assert list((registry.root / ".incoming").iterdir()) == []
    with pytest.raises(NotFound):
        registry.resolve("acme", "support")


def test_deleted_version_numbers_are_never_reused(registry):
    """A client pinned to "support@2" must never get other weights, even
    after support@2 was deleted and the name published again."""
    for seed in range(2):
        registry.publish("acme", "support", random_adapter(seed=seed), "test")
    registry.delete("acme", "support@2")
    assert registry.publish("acme", "support", random_adapter(), "test").version == 3
    registry.delete("acme", "support")
    restarted = AdapterRegistry(registry.root, CONFIG, FINGERPRINT)
    assert restarted.publish("acme", "support", random_adapter(), "test").version == 4


def test_export_lora_h5_reads_back_with_alpha_folded_in(registry, tmp_path):
    """keras_hub has no alpha (it is the rank), so alpha/rank moves into b."""
    adapter = random_adapter(rank=4, alpha=8.0)
    record = registry.publish("acme", "support", adapter, "test")
    (tmp_path / "support.lora.h5").write_bytes(registry.export(record, "lora.h5")[1])
    back = LoraAdapter.from_lora_file(tmp_path / "support.lora.h5", CONFIG)
    assert (back.rank, back.alpha) == (4, 4.0)
    for key, (a, b) in adapter.kernels.items():
        np.testing.assert_array_equal(back.kernels[key][0], a)
        np.testing.assert_allclose(back.kernels[key][1], 2.0 * b, rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "support.lora.h5"]


def test_listing_a_tenant_does_not_scan_the_other_tenants(tmp_path):
    """The index is by tenant: with 100,000 other tenants' versions stored,
    a tenant's ListAdapters or GetModelInfo costs what its own take."""
    import dataclasses
    registry = AdapterRegistry(tmp_path, CONFIG, FINGERPRINT)
    mine = registry.publish("acme", "support", random_adapter(), "test")
    with registry._lock:
        for number in range(100_000):
            registry._add(dataclasses.replace(mine, tenant=f"t{number}"))
    started = time.perf_counter()
    for _ in range(500):
        assert registry.list("acme") == [mine]
    assert time.perf_counter() - started < 0.2  # scanning every tenant: 1 s or more
    assert registry.list("t7") == [dataclasses.replace(mine, tenant="t7")]
