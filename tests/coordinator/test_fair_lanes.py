"""The off-loop lanes are fair between tenants: one tenant's large dataset
parses never make another's fine-tune calls wait, a tenant at its job
limit costs no parsing, and a cancelled upload keeps its slot until the
work it started has ended (and publishes nothing)."""

import asyncio
import json
import threading
import time
import types

import pytest

from coordinator import fine_tune_servicer, off_loop
from coordinator.dataset_store import DatasetStore
from coordinator.errors import ResourceExhausted
from coordinator.fine_tune_jobs import FineTuneJobs
from coordinator.fine_tune_servicer import FineTuneServicer
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.service_config import ServiceLimits
from coordinator.stream_guard import StreamLimits, UploadGuard
from coordinator.tenant_auth import TenantAuth

LIMITS = ServiceLimits(vocabulary_size=1024, num_layers=4, hidden_dim=128,
                       max_sequence_length=1024)
KEYS = {"key-of-tenant-a": "a", "key-of-tenant-b": "b"}
# About half a second of parsing each (8,000 lines of 199 ids, 7 MiB).
LARGE = (json.dumps({"ids": list(range(1, 200))}) + "\n").encode() * 8000
SMALL = b'{"ids": [1, 2, 3]}\n{"ids": [4, 5, 6]}\n'


# ---- the lane on its own ------------------------------------------------------------------


def gated_work(order):
    """A call for the lane that records its name; "a0" runs until `gate` opens."""
    started, gate = threading.Event(), threading.Event()

    def work(name):
        if name == "a0":
            started.set()
            gate.wait(10)
        order.append(name)
        return name
    return work, started, gate


def test_tenants_take_turns_and_each_may_have_only_so_many_calls_waiting():
    lane = off_loop.Lane("test-lane", max_waiting_per_tenant=3, retry_after_ms=250)
    order = []
    work, started, gate = gated_work(order)

    async def main():
        first = asyncio.create_task(lane.run("a", work, "a0"))
        await until(started.is_set)
        backlog = [asyncio.create_task(lane.run("a", work, f"a{i}")) for i in (1, 2, 3)]
        await until(lambda: lane.waiting("a") == 3)
        with pytest.raises(ResourceExhausted, match="3 requests waiting") as caught:
            await lane.run("a", work, "a4")
        assert caught.value.retry_after_ms == 250
        other = asyncio.create_task(lane.run("b", work, "b0"))
        await until(lambda: lane.waiting("b") == 1)
        gate.set()
        await asyncio.gather(first, other, *backlog)

    asyncio.run(main())
    assert order == ["a0", "b0", "a1", "a2", "a3"]  # b after a0 only, not a's backlog


def test_a_cancelled_call_never_runs_if_queued_and_returns_once_ended_if_running():
    lane = off_loop.Lane("test-lane", max_waiting_per_tenant=4, retry_after_ms=100)
    order = []
    work, started, gate = gated_work(order)

    async def main():
        running = asyncio.create_task(lane.run("a", work, "a0"))
        await until(started.is_set)
        queued = asyncio.create_task(lane.run("a", work, "a1"))
        await until(lambda: lane.waiting("a") == 1)
        running.cancel()
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await asyncio.sleep(0.05)
        assert not running.done()  # its work still runs: so does the call
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert order == ["a0"]

    asyncio.run(main())
    time.sleep(0.05)
    assert order == ["a0"]  # the queued call never ran


# ---- the fine-tune service on top -----------------------------------------------------------


class Context:
    def __init__(self, tenant):
        key = next(key for key, name in KEYS.items() if name == tenant)
        self._metadata = (("authorization", f"Bearer {key}"),)

    def invocation_metadata(self):
        return self._metadata


class IdleRouter:
    """Workers that take a job and never report: it stays running."""

    def fine_tune(self, work):
        async def progress():
            await asyncio.Event().wait()
            yield {}
        return "worker-0", progress()

    def cancel_fine_tune(self, job_id):
        pass


def make_servicer(tmp_path, uploads=4, fine_tunes=2):
    jobs = FineTuneJobs(IdleRouter(), None, fine_tunes, journal=tmp_path / "jobs")
    return FineTuneServicer(
        TenantAuth(KEYS), jobs, types.SimpleNamespace(max_rank=8),
        DatasetStore(tmp_path / "datasets"), LIMITS, None, max_upload_bytes=64 << 20,
        max_batch_tokens=16384, uploads=UploadGuard(StreamLimits(max_uploads_per_tenant=uploads)))


async def upload(servicer, tenant, name, data):
    async def messages():
        yield fpb.UploadDatasetRequest(name=name)
        for start in range(0, len(data), 1 << 20):
            yield fpb.UploadDatasetRequest(data=data[start:start + (1 << 20)])
    return await servicer.UploadDataset(messages(), Context(tenant))


async def until(condition, timeout_s=30):
    async with asyncio.timeout(timeout_s):  # a failure fails, it does not hang
        while not condition():
            await asyncio.sleep(0.005)


def dataset_job(name, dataset_id):
    return fpb.StartFineTuneRequest(adapter_name=name, dataset_id=dataset_id, steps=1,
                                    batch_size=1, sequence_length=16)


def test_one_tenants_large_parses_never_hold_up_another_tenants_calls(tmp_path, monkeypatch):
    """Tenant A has four large datasets being parsed (about 2 s of work);
    tenant B's dataset_id StartFineTune and its listing answer at once, and
    its small upload waits for A's current parse only."""
    timings, parses_started = {}, []
    parse = fine_tune_servicer.parse_dataset_file
    gate = threading.Event()  # A's first parse runs until B has called

    def gated_parse(*args):
        parses_started.append(args)
        if len(parses_started) == 2:  # after B's own dataset: A's first
            gate.wait(30)
        return parse(*args)
    monkeypatch.setattr(fine_tune_servicer, "parse_dataset_file", gated_parse)

    async def main():
        servicer = make_servicer(tmp_path)
        await upload(servicer, "b", "b-data", SMALL)
        a_uploads = [asyncio.create_task(upload(servicer, "a", f"a{i}", LARGE))
                     for i in range(4)]
        # One of A's parses running, three waiting.
        await until(lambda: len(parses_started) == 2
                    and off_loop.TRAINING_DATA.waiting("a") == 3)

        started = time.perf_counter()
        job = await servicer.StartFineTune(dataset_job("b-tuned", "b-data"), Context("b"))
        timings["start"] = time.perf_counter() - started
        assert job.job_id and job.adapter_name == "b-tuned"
        started = time.perf_counter()
        listed = await servicer.ListDatasets(fpb.ListDatasetsRequest(), Context("b"))
        timings["list"] = time.perf_counter() - started
        assert [d.dataset_id for d in listed.datasets] == ["b-data"]
        gate.set()
        started = time.perf_counter()
        await upload(servicer, "b", "b-more", SMALL)
        timings["upload"] = time.perf_counter() - started
        timings["a_pending_then"] = sum(not task.done() for task in a_uploads)
        assert [d.num_examples for d in await asyncio.gather(*a_uploads)] == [8000] * 4

    asyncio.run(main())
    # A's backlog is about 1.5 s when B calls: wide margins either way.
    assert timings["start"] < 0.5 and timings["list"] < 0.5, timings
    assert timings["a_pending_then"] >= 2, timings  # B's parse went ahead of A's queue


def test_a_tenant_at_its_job_limit_is_refused_before_any_parsing(tmp_path, monkeypatch):
    parsed = []
    parse = fine_tune_servicer.parse_fine_tune_request
    monkeypatch.setattr(fine_tune_servicer, "parse_fine_tune_request",
                        lambda *args: parsed.append(args) or parse(*args))
    inline = fpb.StartFineTuneRequest(
        adapter_name="big", steps=1, batch_size=1, sequence_length=16,
        sequences=[fpb.TrainingSequence(ids=list(range(1, 200)))] * 5000)

    async def main():
        servicer = make_servicer(tmp_path, fine_tunes=1)
        await upload(servicer, "a", "data", SMALL)
        await servicer.StartFineTune(dataset_job("first", "data"), Context("a"))
        assert len(parsed) == 1
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="--tenant-max-fine-tunes"):
            await servicer.StartFineTune(inline, Context("a"))
        assert time.perf_counter() - started < 0.05
        assert len(parsed) == 1  # refused before its 5,000 sequences were read

    asyncio.run(main())


def test_a_cancelled_upload_keeps_its_slot_until_its_parse_ends_and_stores_nothing(
        tmp_path, monkeypatch):
    parses_started, parses_ended, calls_ended = [], [], []
    parse = fine_tune_servicer.parse_dataset_file
    release = threading.Event()  # a parse runs until the test lets it end

    def timed_parse(*args):
        parses_started.append(time.perf_counter())
        try:
            release.wait(30)
            return parse(*args)
        finally:
            parses_ended.append(time.perf_counter())
    monkeypatch.setattr(fine_tune_servicer, "parse_dataset_file", timed_parse)

    async def main():
        servicer = make_servicer(tmp_path, uploads=2)
        guard = servicer._uploads
        uploads = [asyncio.create_task(upload(servicer, "a", f"a{i}", LARGE)) for i in (0, 1)]
        for task in uploads:
            task.add_done_callback(lambda _: calls_ended.append(time.perf_counter()))
        await until(lambda: parses_started and off_loop.TRAINING_DATA.waiting("a") == 1)
        for task in uploads:
            task.cancel()
        await asyncio.sleep(0.05)
        # The queued parse was dropped with its slot; the running one keeps its own.
        assert guard.open_uploads("a") == 1 and not parses_ended
        assert len(parses_started) == 1  # the queued one never ran
        again = asyncio.create_task(upload(servicer, "a", "again", SMALL))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="2 uploads in progress"):
            await upload(servicer, "a", "more", SMALL)  # cancelling freed no room early
        release.set()
        for task in uploads:
            with pytest.raises(asyncio.CancelledError):
                await task
        # The call whose parse ran ended after it; the queued one at once.
        assert min(calls_ended) < parses_ended[0] <= max(calls_ended)
        await again
        assert guard.open_uploads("a") == 0
        return servicer

    servicer = asyncio.run(main())
    # The cancelled uploads published nothing; the later one did.
    assert [name for name, *_ in servicer._datasets.list("a")] == ["again"]
