"""The fine-tune job journal on its own: what a restarted coordinator reads
back, what it ignores, and how many ended jobs it keeps."""

import asyncio
import dataclasses
import json
import time

from fixture_support import TINY_CONFIG
from coordinator.adapter_manager import AdapterManager
from coordinator.adapter_registry import AdapterRegistry
from coordinator.errors import ResourceExhausted
from coordinator.fine_tune_jobs import KEPT_ENDED_PER_TENANT, FineTuneJob, FineTuneJobs
from coordinator.job_journal import JobJournal
from gemma_core import GemmaConfig, LoraAdapter


def record(job_id, state, created="2026-01-01T00:00:00+00:00", **fields):
    return dataclasses.asdict(FineTuneJob(job_id=job_id, tenant="acme", adapter_name="a",
                                          state=state, created=created, **fields))


def jobs_from(journal):
    """FineTuneJobs reading `journal`, no workers behind it (a started job
    fails at once: there is no router)."""
    return FineTuneJobs(router=None, adapters=None, journal=journal)


def test_unfinished_jobs_come_back_interrupted_and_bad_records_are_skipped(tmp_path):
    (tmp_path / "ft-running.json").write_text(json.dumps(record("ft-running", "running",
                                                                step=7, total_steps=50)))
    (tmp_path / "ft-done.json").write_text(json.dumps(record("ft-done", "succeeded",
                                                             adapter_id="a@1")))
    (tmp_path / "ft-torn.json").write_text('{"job_id": "ft-torn", "ten')
    (tmp_path / "ft-odd.json").write_text(json.dumps({"job_id": "ft-odd"}))  # no tenant
    (tmp_path / "ft-future.json").write_text(json.dumps(
        {**record("ft-future", "queued"), "a_field_from_a_newer_version": 1}))

    async def main():
        jobs = jobs_from(tmp_path)
        listed = {job.job_id: job for job in jobs.list("acme")}
        assert set(listed) == {"ft-running", "ft-done", "ft-future"}
        assert listed["ft-running"].state == "interrupted"
        assert listed["ft-running"].step == 7 and "while the job was running" in \
            listed["ft-running"].error
        assert listed["ft-future"].state == "interrupted"
        assert listed["ft-done"].state == "succeeded" and listed["ft-done"].adapter_id == "a@1"
        assert jobs.list("globex") == []
        # Watching an interrupted job yields it once and ends.
        assert [j.state async for j in jobs.watch("acme", "ft-running")] == ["interrupted"]
        # The journal says so too, for the next restart.
        assert json.loads((tmp_path / "ft-running.json").read_text())["state"] == "interrupted"
    asyncio.run(main())


def test_ended_jobs_beyond_the_limit_are_forgotten_oldest_first(tmp_path):
    for i in range(KEPT_ENDED_PER_TENANT + 5):
        (tmp_path / f"ft-{i:04d}.json").write_text(json.dumps(record(
            f"ft-{i:04d}", "failed", created=f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}+00:00")))

    async def main():
        jobs = jobs_from(tmp_path)
        assert len(jobs.list("acme")) == KEPT_ENDED_PER_TENANT + 5
        new = await jobs.start("acme", "a", lambda job_id: None)  # fails at once: no pool
        *_, end = [j async for j in jobs.watch("acme", new.job_id)]
        assert end.state == "failed"
        kept = {job.job_id for job in jobs.list("acme")}
        assert "ft-0000" not in kept and f"ft-{KEPT_ENDED_PER_TENANT + 4:04d}" in kept
        assert len(kept) == KEPT_ENDED_PER_TENANT + 1  # the 100 newest ended, and the new one
        assert sorted(p.stem for p in tmp_path.glob("ft-*.json")) == sorted(kept)
    asyncio.run(main())


def test_a_job_that_published_before_the_restart_comes_back_succeeded(tmp_path):
    journal = tmp_path / "jobs"
    journal.mkdir()
    (journal / "ft-published.json").write_text(json.dumps(record("ft-published", "running")))
    # Interrupted at shutdown while its publish, in a thread, went on to finish.
    (journal / "ft-late.json").write_text(json.dumps(record(
        "ft-late", "interrupted", error="interrupted: the server shut down")))
    (journal / "ft-cut.tmp").write_text('{"job_id": "ft-cu')  # a write cut short
    config = GemmaConfig(**TINY_CONFIG)
    registry = AdapterRegistry(tmp_path / "adapters", config, "tiny-base")
    registry.publish("acme", "a", LoraAdapter.random(config, rank=2, alpha=2.0, seed=0),
                     "finetune:ft-published")  # the coordinator died right after this
    registry.publish("acme", "b", LoraAdapter.random(config, rank=2, alpha=2.0, seed=1),
                     "finetune:ft-late")

    async def main():
        jobs = FineTuneJobs(router=None, adapters=AdapterManager(registry, None, 8, 1 << 20),
                            journal=journal)
        job = jobs.get("acme", "ft-published")
        assert (job.state, job.adapter_id) == ("succeeded", "a@1")
        late = jobs.get("acme", "ft-late")
        assert (late.state, late.adapter_id, late.error) == ("succeeded", "b@1", "")
    asyncio.run(main())
    assert not list(journal.glob("*.tmp"))


class ProgressRouter:
    """A worker that reports a step, then that the job was cancelled."""

    def fine_tune(self, work):
        async def progress():
            yield {"state": "running", "step": 1, "total_steps": 2}
            yield {"state": "cancelled"}
        return "worker-0", progress()


def test_journal_writes_wait_off_the_event_loop_and_keep_their_order(tmp_path, monkeypatch):
    """A disk that takes 0.25 s per write: the loop still turns every few
    milliseconds, and the job's records reach it in the order made."""
    written = []

    def slow(write):
        def slowly(self, job_id, record, *args, **kwargs):
            time.sleep(0.25)
            written.append((record["state"], record["step"]))
            return write(self, job_id, record, *args, **kwargs)
        return slowly
    monkeypatch.setattr(JobJournal, "write", slow(JobJournal.write))
    monkeypatch.setattr(JobJournal, "write_final", slow(JobJournal.write_final))

    async def main():
        gaps, done = [], asyncio.Event()

        async def tick():
            while not done.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                gaps.append(time.perf_counter() - before)
        ticker = asyncio.create_task(tick())
        jobs = FineTuneJobs(ProgressRouter(), None, journal=tmp_path)
        started = await jobs.start("acme", "a", lambda job_id: None)
        seen = [(job.state, job.step) async for job in jobs.watch("acme", started.job_id)]
        done.set()
        await ticker
        return started, seen, max(gaps)

    started, seen, longest_gap = asyncio.run(main())
    assert longest_gap < 0.15, longest_gap  # each write takes 0.25 s
    assert written == [("queued", 0), ("running", 0), ("running", 1), ("cancelled", 1)], written
    assert seen[-1] == ("cancelled", 1)
    record = json.loads((tmp_path / f"{started.job_id}.json").read_text())
    assert record["state"] == "cancelled"


def test_starts_racing_for_the_last_place_while_their_records_are_written(tmp_path,
                                                                         monkeypatch):
    write = JobJournal.write

    def slowly(self, *args, **kwargs):
        time.sleep(0.1)
        return write(self, *args, **kwargs)
    monkeypatch.setattr(JobJournal, "write", slowly)

    async def main():
        jobs = FineTuneJobs(router=None, adapters=None, max_per_tenant=1, journal=tmp_path)
        jobs._run = lambda job, work: asyncio.sleep(3600)  # stays queued
        outcomes = await asyncio.gather(*(jobs.start("acme", "a", lambda job_id: None)
                                          for _ in range(3)), return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, ResourceExhausted)]
        assert len(refused) == 2 and len(jobs.list("acme")) == 1
        assert len(list(tmp_path.glob("ft-*.json"))) == 1
    asyncio.run(main())
