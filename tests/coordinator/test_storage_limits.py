"""Per-tenant storage quotas, paged listing, and temporary files that never
outlive their writer."""

import asyncio
import base64
import concurrent.futures
import errno
import logging
import os
import threading

import numpy as np
import pytest

from fixture_support import TINY_CONFIG
from coordinator.adapter_manager import AdapterManager
from coordinator.adapter_registry import AdapterRegistry
from coordinator.dataset_store import DatasetStore
from coordinator.errors import InvalidArgument, ResourceExhausted
from coordinator.fine_tune_jobs import STORE_FAILED, FineTuneJobs
from coordinator.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_of
from coordinator.storage_quota import StorageQuota
from gemma_core import GemmaConfig, LoraAdapter

CONFIG = GemmaConfig(**TINY_CONFIG)


def adapter(seed=0, rank=2):
    return LoraAdapter.random(CONFIG, rank, seed=seed, std=0.1)


def tree(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def by_key(record):
    return record.name, record.version


def test_the_version_quota_refuses_with_usage_and_stores_nothing(tmp_path):
    registry = AdapterRegistry(tmp_path, CONFIG, "base", quota=StorageQuota(
        max_adapter_versions=3))
    for seed in range(3):
        registry.publish("acme", f"a{seed % 2}", adapter(seed), "test")
    before = tree(tmp_path)
    with pytest.raises(ResourceExhausted, match=r"stores 3 adapter versions.*"
                                                r"--tenant-max-adapter-versions 3"):
        registry.publish("acme", "a0", adapter(9), "test")
    assert tree(tmp_path) == before
    registry.publish("globex", "a0", adapter(9), "test")  # per tenant
    registry.delete("acme", "a1")  # room again
    assert registry.publish("acme", "a0", adapter(9), "test").version == 3
    restarted = AdapterRegistry(tmp_path, CONFIG, "base", quota=StorageQuota(
        max_adapter_versions=3))  # usage is rebuilt from disk
    with pytest.raises(ResourceExhausted):
        restarted.publish("acme", "a2", adapter(9), "test")


def test_the_byte_quota_refuses_with_usage_and_stores_nothing(tmp_path):
    size = AdapterRegistry(tmp_path / "probe", CONFIG, "base").publish(
        "acme", "a", adapter(), "test").size_bytes
    quota = StorageQuota(max_adapter_bytes=int(2.5 * size))
    registry = AdapterRegistry(tmp_path / "adapters", CONFIG, "base", quota=quota)
    registry.publish("acme", "a", adapter(0), "test")
    registry.publish("acme", "b", adapter(1), "test")
    before = tree(tmp_path / "adapters")
    with pytest.raises(ResourceExhausted, match=r"stores 0\.\d MiB.*adds 0\.\d MiB.*"
                                                r"--tenant-max-adapter-mib"):
        registry.publish("acme", "c", adapter(2), "test")
    assert tree(tmp_path / "adapters") == before
    assert [r.adapter_id for r in registry.list("acme")] == ["a@1", "b@1"]


class TrainedRouter:
    """Workers whose every job ends at once with `adapter` trained."""

    def __init__(self, adapter):
        self.adapter = adapter

    def fine_tune(self, work):
        async def progress():
            yield {"state": "succeeded", "adapter": self.adapter}
        return "worker-0", progress()


def test_a_fine_tune_publish_is_held_to_the_quota_too(tmp_path):
    registry = AdapterRegistry(tmp_path / "adapters", CONFIG, "base", quota=StorageQuota(
        max_adapter_versions=1))
    registry.publish("acme", "faq", adapter(0), "test")

    async def run():
        jobs = FineTuneJobs(TrainedRouter(adapter(1)), AdapterManager(registry, None, 8, 1 << 20),
                            journal=tmp_path / "jobs")
        started = await jobs.start("acme", "faq", lambda job_id: None)
        *_, end = [job async for job in jobs.watch("acme", started.job_id)]
        return end

    end = asyncio.run(run())
    assert end.state == "failed" and "--tenant-max-adapter-versions 1" in end.error
    assert [r.adapter_id for r in registry.list("acme")] == ["faq@1"]


def test_concurrent_publishes_never_pass_the_quota_together(tmp_path):
    registry = AdapterRegistry(tmp_path, CONFIG, "base", quota=StorageQuota(
        max_adapter_versions=5))
    barrier = threading.Barrier(12)

    def publish(seed):
        barrier.wait()
        try:
            return registry.publish("acme", "race", adapter(seed), "test")
        except ResourceExhausted:
            return None

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        published = [r for r in pool.map(publish, range(12)) if r is not None]
    assert len(published) == 5 and len(registry.list("acme")) == 5
    assert len(list((tmp_path / "acme" / "race").iterdir())) == 5


def test_the_dataset_count_quota(tmp_path):
    store = DatasetStore(tmp_path, StorageQuota(max_datasets=2))
    sequences = [np.arange(2, 10, dtype="int32")]
    store.save("acme", "one", sequences)
    store.save("acme", "two", sequences)
    with pytest.raises(ResourceExhausted, match="stores 2 datasets.*--tenant-max-datasets 2"):
        store.save("acme", "three", sequences)
    assert tree(tmp_path) == ["acme", "acme/one.npz", "acme/two.npz"]
    store.save("acme", "two", sequences * 2)  # replacing one is not adding one
    store.save("globex", "three", sequences)


def test_a_killed_dataset_upload_leaves_nothing_after_a_restart(tmp_path):
    DatasetStore(tmp_path).save("acme", "kept", [np.arange(2, 10, dtype="int32")])
    (tmp_path / "acme" / ".upload-k1ll3d").write_bytes(b"half a dataset")
    (tmp_path / ".incoming").mkdir(exist_ok=True)
    (tmp_path / ".incoming" / ".upload-k1ll3d.jsonl").write_bytes(b'{"text": "half')
    store = DatasetStore(tmp_path)
    assert tree(tmp_path) in (["acme", "acme/kept.npz"],
                              [".incoming", "acme", "acme/kept.npz"])
    assert [name for name, *_ in store.list("acme")] == ["kept"]


def test_pages_hold_every_record_exactly_once_while_others_publish(tmp_path):
    registry = AdapterRegistry(tmp_path, CONFIG, "base")
    for seed in range(30):
        registry.publish("acme", f"n{seed % 7}", adapter(seed), "test")
    present = {by_key(r) for r in registry.list("acme")}
    stop = threading.Event()

    def publish_meanwhile():
        seed = 100
        while not stop.is_set():
            registry.publish("acme", f"n{seed % 9}", adapter(seed), "test")
            seed += 1

    background = threading.Thread(target=publish_meanwhile)
    background.start()
    try:
        seen, token, pages = [], "", 0
        while True:
            page, token = page_of(registry.list("acme"), by_key, 4, token)
            assert len(page) <= 4
            seen += [by_key(r) for r in page]
            pages += 1
            if not token:
                break
    finally:
        stop.set()
        background.join()
    assert len(seen) == len(set(seen)) and seen == sorted(seen)  # none twice, in order
    assert present <= set(seen) and pages >= 8


def test_page_sizes_and_tokens():
    items = [("a", v) for v in range(1, 2500)]
    page, token = page_of(items, tuple, 0, "")
    assert len(page) == DEFAULT_PAGE_SIZE and token
    page, token = page_of(items, tuple, 5000, token)
    assert len(page) == MAX_PAGE_SIZE and page[0] == ("a", 101)
    page, token = page_of(items[:10], tuple, 10, "")
    assert len(page) == 10 and token == ""
    assert page_of([], tuple, 0, "") == ([], "")
    with pytest.raises(InvalidArgument, match="page_size"):
        page_of(items, tuple, -1, "")


@pytest.mark.parametrize("token", [
    "not base64 !", "bm90IGpzb24", base64.urlsafe_b64encode(b'["after", "a"]').decode(),
    base64.urlsafe_b64encode(b'["after", "a", "1"]').decode(),
    base64.urlsafe_b64encode(b'["before", "a", 1]').decode(),
    base64.urlsafe_b64encode(b'{"after": ["a", 1]}').decode(), "\u00e9"])
def test_tokens_the_server_did_not_issue_are_invalid(token):
    with pytest.raises(InvalidArgument, match="page_token: it is not a token this server"):
        page_of([("a", 1)], tuple, 0, token)


def test_the_dataset_byte_quota_refuses_with_usage_and_stores_nothing(tmp_path):
    sequences = [np.arange(2, 60_000, dtype="int32") % 1000]  # about 234 KiB stored
    DatasetStore(tmp_path / "probe").save("acme", "probe", sequences)
    size = (tmp_path / "probe" / "acme" / "probe.npz").stat().st_size
    store = DatasetStore(tmp_path / "datasets", StorageQuota(max_dataset_bytes=int(2.5 * size)))
    store.save("acme", "one", sequences)
    store.save("acme", "two", sequences)
    before = tree(tmp_path / "datasets")
    with pytest.raises(ResourceExhausted, match=r"stores 0\.\d MiB of datasets and this one "
                                                r"adds 0\.2 MiB.*--tenant-max-dataset-mib"):
        store.save("acme", "three", sequences)
    assert tree(tmp_path / "datasets") == before  # no temporary file either
    store.save("acme", "two", sequences)  # a replacement adds only its difference
    with pytest.raises(ResourceExhausted, match="--tenant-max-dataset-mib"):
        store.save("acme", "two", sequences * 2)  # ... which must fit too
    store.save("globex", "three", sequences)  # per tenant
    store.delete("acme", "one")
    store.save("acme", "three", sequences)  # room again


def test_concurrent_dataset_saves_never_pass_the_byte_quota_together(tmp_path):
    sequences = [np.arange(2, 20_000, dtype="int32") % 1000]
    DatasetStore(tmp_path / "probe").save("acme", "probe", sequences)
    size = (tmp_path / "probe" / "acme" / "probe.npz").stat().st_size
    store = DatasetStore(tmp_path / "datasets", StorageQuota(max_dataset_bytes=int(5.5 * size)))
    barrier = threading.Barrier(12)

    def save(number):
        barrier.wait()
        try:
            return store.save("acme", f"d{number}", sequences)
        except ResourceExhausted:
            return None

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        saved = [r for r in pool.map(save, range(12)) if r is not None]
    assert len(saved) == 5 and len(store.list("acme")) == 5
    assert len(list((tmp_path / "datasets" / "acme").iterdir())) == 5  # no temporary left


def test_a_dataset_is_durable_once_saved(tmp_path, monkeypatch):
    """Written straight into its temporary file (replacing_file: fsynced, then
    renamed), and the rename made durable by fsyncing the directory."""
    from coordinator import durable_files
    synced, fsynced_dirs = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(
        f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(durable_files, "fsync_dir",
                        lambda path: fsynced_dirs.append((path, sorted(os.listdir(path)))))
    store = DatasetStore(tmp_path)
    store.save("acme", "kept", [np.arange(2, 10, dtype="int32")])
    assert any(".upload-" in path for path in synced)  # the data, before the rename
    assert fsynced_dirs[-1] == (tmp_path / "acme", ["kept.npz"])  # after it


class BrokenDiskRegistry(AdapterRegistry):
    def publish(self, tenant, name, adapter, source):
        raise OSError(errno.EIO, "Input/output error", "/srv/secret/adapters/.incoming/x")


def test_a_job_that_fails_on_a_disk_error_names_no_server_path(tmp_path, caplog):
    registry = BrokenDiskRegistry(tmp_path / "adapters", CONFIG, "base")

    async def run():
        jobs = FineTuneJobs(TrainedRouter(adapter(1)), AdapterManager(registry, None, 8, 1 << 20),
                            journal=tmp_path / "jobs")
        started = await jobs.start("acme", "faq", lambda job_id: None)
        *_, end = [job async for job in jobs.watch("acme", started.job_id)]
        return end

    with caplog.at_level(logging.WARNING, logger="gemma_serve.fine_tune"):
        end = asyncio.run(run())
    assert end.state == "failed" and end.error == STORE_FAILED
    assert "/srv" not in end.error and "server log" in end.error
    assert "/srv/secret/adapters" in caplog.text  # the operator has the details
