"""A full disk, for real (a 2 MiB tmpfs the test mounts) and simulated (where
mounting is refused too; see tests/disk_support.py): writes fail with ENOSPC
and store nothing, deletes free space, a job's final state survives, and a
delete cut short never lets a version number be reused."""

import asyncio
import errno
import json
import os

import grpc
import numpy as np
import pytest

from disk_support import KINDS, disk_filled, free_bytes, small_filesystem
from fixture_support import TINY_CONFIG
from coordinator.adapter_manager import AdapterManager
from coordinator.adapter_registry import AdapterRegistry
from coordinator.dataset_store import DatasetStore
from coordinator.error_interceptor import status_of
from coordinator.errors import is_storage_full
from coordinator.fine_tune_jobs import FineTuneJobs
from coordinator.job_journal import RESERVE_BYTES
from gemma_core import GemmaConfig, LoraAdapter

CONFIG = GemmaConfig(**TINY_CONFIG)
FINGERPRINT = "tiny-base-1"


def adapter(seed=0, rank=4):
    return LoraAdapter.random(CONFIG, rank, seed=seed, std=0.1)


def tree(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_a_full_disk_or_quota_is_resource_exhausted_saying_what_to_do():
    for number in (errno.ENOSPC, errno.EDQUOT):
        code, message = status_of(OSError(number, os.strerror(number), "/srv/data/x.tmp"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "storage is full" in message and "DeleteAdapter" in message
        assert "operator" in message and "/srv" not in message
    assert status_of(OSError(errno.EIO, "I/O error"))[0] == grpc.StatusCode.INTERNAL


@pytest.fixture(params=KINDS)
def disk(tmp_path, request):
    with small_filesystem(tmp_path / "small", request.param) as mount_point:
        yield mount_point


def test_a_publish_on_a_full_disk_fails_enospc_and_leaves_the_registry_whole(disk):
    registry = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    kept = registry.publish("acme", "support", adapter(0), "test")
    with disk_filled(disk):
        before = tree(registry.root)
        with pytest.raises(OSError) as caught:
            registry.publish("acme", "support", adapter(1), "test")
        assert is_storage_full(caught.value)
        assert tree(registry.root) == before  # no staging left holding space
        assert registry.list("acme") == [kept]
    restarted = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    assert restarted.list("acme") == [kept] and restarted.load(kept) is not None
    assert restarted.publish("acme", "support", adapter(1), "test").version == 2


def test_delete_frees_space_on_a_full_disk_and_numbers_stay_unused(disk):
    registry = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    for seed in range(3):
        registry.publish("acme", "support", adapter(seed), "test")
    with disk_filled(disk):
        assert free_bytes(disk) == 0
        [third] = registry.delete("acme", "support@3")
        assert third.version == 3 and free_bytes(disk) > 0
        assert [r.version for r in registry.delete("acme", "support")] == [1, 2]
        assert list((registry.root / ".incoming").iterdir()) == []
        assert (registry.root / ".last_version" / "acme" / "support").read_text() == "3"
    restarted = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    assert restarted.publish("acme", "support", adapter(), "test").version == 4


def test_a_delete_cut_short_keeps_its_version_number(disk, monkeypatch):
    """Killed after the rename into the trash, before `.last_version` was
    written: the trash's name carries the number to the next start. And a
    record that cannot be written (the space freed taken again at once)
    still leaves the number unused, now and after a restart."""
    registry = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    for seed in range(2):
        registry.publish("acme", "support", adapter(seed), "test")
    monkeypatch.setattr(AdapterRegistry, "_empty_trash", lambda self, trash: None)  # "crash"
    registry.delete("acme", "support@2")
    monkeypatch.undo()
    [trash] = (registry.root / ".incoming").iterdir()
    assert trash.name.startswith("trash@acme@support@2@")
    assert not (registry.root / ".last_version").exists()
    restarted = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    assert list((registry.root / ".incoming").iterdir()) == []
    assert restarted.publish("acme", "support", adapter(), "test").version == 3

    def no_space(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(AdapterRegistry, "_remember_deleted", no_space)
    assert [r.version for r in restarted.delete("acme", "support@3")] == [3]
    assert restarted.publish("acme", "support", adapter(), "test").version == 4
    monkeypatch.undo()
    again = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    assert [r.version for r in again.list("acme")] == [1, 4]
    again.delete("acme", "support@4")
    assert again.publish("acme", "support", adapter(), "test").version == 5


def test_datasets_on_a_full_disk(disk):
    store = DatasetStore(disk / "datasets")
    store.save("acme", "kept", [np.arange(2, 50, dtype="int32")])
    big = [np.arange(0, 4096, dtype="int32") % 250 + 2 for _ in range(8)]
    with disk_filled(disk):
        with pytest.raises(OSError) as caught:
            store.save("acme", "new", big)
        assert is_storage_full(caught.value)
        assert [name for name, *_ in store.list("acme")] == ["kept"]
        assert tree(disk / "datasets") == ["acme", "acme/kept.npz"]  # no temporary file
        assert store.delete("acme", "kept") == (1, 48)
        assert free_bytes(disk) > 0


class FakeRouter:
    """Workers whose one job "trains" and hands back `adapter`."""

    def __init__(self, adapter, before_result=lambda: None):
        self.adapter, self.before_result = adapter, before_result

    def fine_tune(self, work):
        async def progress():
            yield {"state": "running", "step": 1, "total_steps": 1}
            self.before_result()
            yield {"state": "succeeded", "adapter": self.adapter}
        return "worker-0", progress()


def test_a_job_that_failed_on_a_full_disk_reads_failed_after_a_restart(disk):
    """Its publish hits ENOSPC; its final record still reaches the disk (into
    the space reserved when it started), so a restart reads FAILED, not
    INTERRUPTED."""
    registry = AdapterRegistry(disk / "adapters", CONFIG, FINGERPRINT)
    manager = AdapterManager(registry, None, 8, 1 << 20)
    filling = []

    def fill_the_disk():  # after the job started, before it publishes
        filling.append(disk_filled(disk))
        filling[-1].__enter__()

    async def run():
        jobs = FineTuneJobs(FakeRouter(adapter(), fill_the_disk), manager, journal=disk / "jobs")
        started = await jobs.start("acme", "faq", lambda job_id: None)
        *_, end = [job async for job in jobs.watch("acme", started.job_id)]
        return end

    try:
        end = asyncio.run(run())
        assert free_bytes(disk) <= RESERVE_BYTES  # full still, but for the reserve given back
        assert end.state == "failed" and "storage is full" in end.error
        assert str(disk) not in end.error  # no server paths in what the tenant sees
        assert registry.list("acme") == []
        record = json.loads((disk / "jobs" / f"{end.job_id}.json").read_text())
        assert record["state"] == "failed"
        assert os.listdir(disk / "jobs") == [f"{end.job_id}.json"]  # its reserve used up
        restarted = FineTuneJobs(None, AdapterManager(AdapterRegistry(
            disk / "adapters", CONFIG, FINGERPRINT), None, 8, 1 << 20), journal=disk / "jobs")
        again = restarted.get("acme", end.job_id)
        assert (again.state, again.error) == ("failed", end.error)
    finally:
        for filled in filling:
            filled.__exit__(None, None, None)


def test_a_job_that_cannot_write_its_first_record_leaves_nothing(disk):
    async def run():
        jobs = FineTuneJobs(None, None, journal=disk / "jobs")
        with disk_filled(disk):
            with pytest.raises(OSError) as caught:
                await jobs.start("acme", "faq", lambda job_id: None)
            assert is_storage_full(caught.value)
        assert jobs.list("acme") == [] and os.listdir(disk / "jobs") == []
    asyncio.run(run())


def test_unfinished_jobs_end_interrupted_on_a_full_disk(disk):
    """A coordinator stopped mid-job, restarted on a full disk: the job's
    reserve takes its final "interrupted" record."""
    async def start_and_stop():
        jobs = FineTuneJobs(None, None, journal=disk / "jobs")
        jobs._run = lambda job, work: asyncio.sleep(3600)  # "running" until killed
        return (await jobs.start("acme", "faq", lambda job_id: None)).job_id
    job_id = asyncio.run(start_and_stop())
    assert sorted(os.listdir(disk / "jobs")) == [f"{job_id}.final", f"{job_id}.json"]
    with disk_filled(disk):
        restarted = FineTuneJobs(None, None, journal=disk / "jobs")
        assert restarted.get("acme", job_id).state == "interrupted"
        record = json.loads((disk / "jobs" / f"{job_id}.json").read_text())
        assert record["state"] == "interrupted"
