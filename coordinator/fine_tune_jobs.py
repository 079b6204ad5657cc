"""Fine-tune jobs: start on a worker, follow its progress, publish or not.

Each job is one asyncio task that reads the worker's progress stream;
watchers wait on a per-job condition and see every state change. With a
journal directory, every job is also a small JSON file there, rewritten
(atomically) at each state change and at most once a second in between, so
a restarted coordinator still lists and answers for its jobs: those that
were queued or running when it stopped end "interrupted" (training does not
resume; a job whose adapter reached the registry before the stop comes back
"succeeded"). A job's final state reaches the journal even on a full disk
(see coordinator/job_journal.py). Journal writes run on one thread of
their own, in the order the changes were made, so a slow disk delays the
records, never the event loop. The jobs in memory are the truth: a change
is visible at once, its record follows.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import time
import uuid
from typing import AsyncIterator

from coordinator.adapter_manager import AdapterManager
from coordinator.adapter_record import shown
from coordinator.errors import NotFound, ResourceExhausted, StorageFull, is_storage_full
from coordinator.job_journal import JobJournal
from coordinator.worker_router import WorkerRouter
from worker.fine_tune_session import FineTuneWork

log = logging.getLogger("gemma_serve.fine_tune")

ENDED = ("succeeded", "failed", "cancelled", "interrupted")
# Progress between state changes reaches the journal at most this often.
JOURNAL_INTERVAL_S = 1.0
# Ended jobs kept per tenant (listed, watchable); older ones are forgotten.
KEPT_ENDED_PER_TENANT = 100
# A job's error text is cut to this, so that a record fits its journal
# reserve and ListFineTunes (100 ended jobs and the active ones) stays far
# below gRPC's 4 MiB message limit.
MAX_ERROR_CHARS = 2000
# What a tenant reads when its job failed on a disk error other than a full
# disk (the error itself names server paths).
STORE_FAILED = "the job could not be stored; the server log has the details"


@dataclasses.dataclass
class FineTuneJob:
    """A job's state as watchers see it (a copy is taken per update)."""

    job_id: str
    tenant: str
    adapter_name: str
    state: str = "queued"  # queued, running, then one of ENDED
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    first_loss: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float = 0.0
    error: str = ""
    worker_id: str = ""
    adapter_id: str = ""
    created: str = dataclasses.field(default_factory=lambda: datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"))


class FineTuneJobs:
    """Every tenant's jobs; a tenant sees only its own (another tenant's job
    id answers as an unknown one)."""

    def __init__(self, router: WorkerRouter, adapters: AdapterManager, max_per_tenant: int = 2,
                 journal: str | os.PathLike | None = None):
        self._router = router
        self._adapters = adapters
        self._max_per_tenant = max_per_tenant
        self._jobs: dict[str, FineTuneJob] = {}
        self._changed: dict[str, asyncio.Condition] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._interrupted: set[str] = set()
        self._journal = None if journal is None else JobJournal(journal)
        self._journaled_at: dict[str, float] = {}
        # One thread: the writes of a job reach the disk in the order made.
        self._journal_thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="job-journal")
        # Jobs whose first record is being written, per tenant: they count
        # against the limit already.
        self._starting: collections.Counter[str] = collections.Counter()
        if self._journal is not None:
            self._read_journal()
            self._journal.drop_reserves()  # every job read back has ended

    def _read_journal(self) -> None:
        """Loads the jobs a previous run left; unfinished ones end "interrupted",
        or "succeeded" if the registry shows they published before it stopped."""
        fields = {f.name for f in dataclasses.fields(FineTuneJob)}
        for path, record in self._journal.records():
            try:
                job = FineTuneJob(**{k: v for k, v in record.items() if k in fields})
            except TypeError as error:
                log.warning("ignoring unreadable job record %s: %s", path, error)
                continue
            # Unfinished, or interrupted at shutdown while its publish was
            # still running: the registry says whether it published.
            if job.state not in ENDED or job.state == "interrupted":
                published = self._published_by(job)
                if published:
                    job.state, job.adapter_id, job.eta_seconds = "succeeded", published, 0.0
                    job.error = ""
                    self._write_now_or_warn(job)
                elif job.state != "interrupted":
                    job.state, job.eta_seconds = "interrupted", 0.0
                    job.error = ("interrupted: the coordinator restarted while the job was "
                                 f"{record.get('state', 'running')}")
                    self._write_now_or_warn(job)
            self._jobs[job.job_id] = job
            self._changed[job.job_id] = asyncio.Condition()

    def _published_by(self, job: FineTuneJob) -> str:
        """The adapter id `job` published, or "" (it stopped before that)."""
        if self._adapters is None:
            return ""
        try:
            records = self._adapters.registry.list(job.tenant)
        except Exception:  # noqa: BLE001 - an unknown tenant has published nothing
            return ""
        return next((r.adapter_id for r in records if r.source == f"finetune:{job.job_id}"), "")

    def _record_writer(self, job: FineTuneJob, durable: bool):
        """A call that records `job` as it is now: durably at state changes
        (what a restart must not lose), into its reserved space once it has
        ended."""
        record, job_id = dataclasses.asdict(job), job.job_id
        if job.state in ENDED:
            return lambda: self._journal.write_final(job_id, record)
        return lambda: self._journal.write(job_id, record, durable)

    async def _on_journal_thread(self, call) -> None:
        """Runs `call` after every journal write submitted before it (the
        submitting is done at once). A caller cancelled meanwhile does not
        withdraw it."""
        await asyncio.shield(asyncio.wrap_future(self._journal_thread.submit(call)))

    async def _told(self, job_id: str, written: concurrent.futures.Future | None) -> None:
        """Waits for the journal write `written` (if any), then wakes the
        job's watchers. The journal is a record, not the job: a failed write
        is logged and the job goes on (its record lags until the next one)."""
        if written is not None:
            try:
                await asyncio.shield(asyncio.wrap_future(written))  # never withdrawn
            except Exception as error:  # noqa: BLE001
                log.warning("could not record fine-tune job %s: %s", job_id, error)
        changed = self._changed.get(job_id)
        if changed is not None:  # None: forgotten meanwhile
            async with changed:
                changed.notify_all()

    def _write_now_or_warn(self, job: FineTuneJob) -> None:
        """Records `job` in this thread: at startup, before serving."""
        try:
            self._record_writer(job, durable=True)()
        except Exception as error:  # noqa: BLE001
            log.warning("could not record fine-tune job %s: %s", job.job_id, error)

    def _forget_old_jobs(self, tenant: str) -> None:
        ended = sorted((j for j in self._jobs.values() if j.tenant == tenant
                        and j.state in ENDED), key=lambda j: j.created)
        for job in ended[:max(0, len(ended) - KEPT_ENDED_PER_TENANT)]:
            for table in (self._jobs, self._changed, self._tasks, self._journaled_at):
                table.pop(job.job_id, None)
            if self._journal is not None:  # after any write of it still queued
                self._journal_thread.submit(self._journal.remove, job.job_id)

    def check_room(self, tenant: str) -> None:
        """Raises ResourceExhausted if the tenant already has its limit of
        jobs queued or running (or being started)."""
        active = self._starting[tenant] + sum(1 for j in self._jobs.values()
                                              if j.tenant == tenant and j.state not in ENDED)
        if active >= self._max_per_tenant:
            raise ResourceExhausted(
                f"this tenant already has {active} fine-tune jobs queued or running (the "
                "limit, --tenant-max-fine-tunes); wait for one to end or cancel one.")

    async def start(self, tenant: str, adapter_name: str, work_for_job) -> FineTuneJob:
        """Queues a job; `work_for_job(job_id)` builds its FineTuneWork.

        Raises:
            ResourceExhausted: the tenant already has its limit of jobs
                queued or running.
            OSError: its first record could not be written (no job then).
        """
        self.check_room(tenant)
        job_id = f"ft-{uuid.uuid4().hex[:12]}"
        job = FineTuneJob(job_id=job_id, tenant=tenant, adapter_name=adapter_name)
        self._forget_old_jobs(tenant)
        if self._journal is not None:  # no record, no job: the caller hears why
            record = dataclasses.asdict(job)
            self._starting[tenant] += 1
            try:
                await self._on_journal_thread(lambda: self._journal.create(job_id, record))
            except asyncio.CancelledError:  # no job: its record goes once written
                self._journal_thread.submit(self._journal.remove, job_id)
                raise
            finally:
                self._starting[tenant] -= 1
                if not self._starting[tenant]:
                    del self._starting[tenant]
        self._jobs[job_id] = job
        self._changed[job_id] = asyncio.Condition()
        self._tasks[job_id] = asyncio.get_running_loop().create_task(
            self._run(job, work_for_job(job_id)))
        return dataclasses.replace(job)

    def counts_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(("queued", "running", *ENDED), 0)
        for job in list(self._jobs.values()):  # a snapshot: called from the metrics thread
            counts[job.state] += 1
        return counts

    def get(self, tenant: str, job_id: str) -> FineTuneJob:
        job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise NotFound(f"job_id: no fine-tune job {shown(job_id)} for this tenant.")
        return dataclasses.replace(job)

    def list(self, tenant: str) -> list[FineTuneJob]:
        jobs = [dataclasses.replace(j) for j in self._jobs.values() if j.tenant == tenant]
        return sorted(jobs, key=lambda j: j.created, reverse=True)

    async def watch(self, tenant: str, job_id: str) -> AsyncIterator[FineTuneJob]:
        """The job now, then after every change, until it has ended."""
        job = self.get(tenant, job_id)
        yield job
        changed = self._changed[job_id]
        while job.state not in ENDED:
            async with changed:
                # A predicate, not a bare wait: a change made while the last
                # update was being sent must not be missed.
                await changed.wait_for(lambda: self._jobs.get(job_id) != job)
            job = self.get(tenant, job_id)
            yield job

    async def cancel(self, tenant: str, job_id: str) -> FineTuneJob:
        job = self.get(tenant, job_id)
        if job.state in ENDED:
            return job
        if job.worker_id:
            self._router.cancel_fine_tune(job_id)
        else:  # not handed to a worker yet; a task cancelled before it ran
            self._tasks[job_id].cancel()  # never reaches its own handler
            await self._update(self._jobs[job_id], state="cancelled", eta_seconds=0.0)
        async with self._changed[job_id]:
            await self._changed[job_id].wait_for(
                lambda: self._jobs[job_id].state in ENDED)
        return self.get(tenant, job_id)

    async def interrupt_all(self, timeout_s: float) -> None:
        """For shutdown: stops every unfinished job; each ends "interrupted"
        (its adapter is not published; a publish in progress completes or
        not at all, being one rename)."""
        pending = [j for j in self._jobs.values() if j.state not in ENDED]
        for job in pending:
            self._interrupted.add(job.job_id)
            if job.worker_id:
                self._router.cancel_fine_tune(job.job_id)
        tasks = [self._tasks[j.job_id] for j in pending]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        for job in pending:
            self._tasks[job.job_id].cancel()
            if job.state not in ENDED:
                await self._update(job, state="interrupted", eta_seconds=0.0,
                                   error="interrupted: the server shut down")

    async def _update(self, job: FineTuneJob, **fields) -> None:
        if job.job_id in self._interrupted and fields.get("state") == "cancelled":
            fields["state"] = "interrupted"
            fields.setdefault("error", "interrupted: the server shut down")
        if len(fields.get("error", "")) > MAX_ERROR_CHARS:
            fields["error"] = fields["error"][:MAX_ERROR_CHARS - 3] + "..."
        for key, value in fields.items():
            setattr(job, key, value)
        written = None
        if self._journal is not None and (
                "state" in fields or time.monotonic() - self._journaled_at.get(job.job_id, 0.0)
                >= JOURNAL_INTERVAL_S):
            self._journaled_at[job.job_id] = time.monotonic()
            # Taken and queued now: the records keep the order of the changes.
            written = self._journal_thread.submit(self._record_writer(job, "state" in fields))
        # Shielded: a caller cancelled meanwhile (at shutdown) still has its
        # change recorded and announced.
        await asyncio.shield(self._told(job.job_id, written))

    async def _run(self, job: FineTuneJob, work: FineTuneWork) -> None:
        try:
            worker_id, stream = self._router.fine_tune(work)
            # Closed however the job ends: its state on the worker and its
            # place there go with it.
            async with contextlib.aclosing(stream):
                await self._update(job, state="running", worker_id=worker_id)
                async for progress in stream:
                    state = progress.pop("state")
                    adapter = progress.pop("adapter", None)
                    if state == "succeeded":
                        record = await asyncio.to_thread(
                            self._adapters.registry.publish, job.tenant, job.adapter_name,
                            adapter, f"finetune:{job.job_id}")
                        await self._update(job, state="succeeded",
                                           adapter_id=record.adapter_id, **progress)
                        log.info("job %s published %s for %s", job.job_id,
                                 record.adapter_id, job.tenant)
                        return
                    await self._update(job, state=state, **progress)
                    if state == "cancelled":
                        return
            await self._update(job, state="failed",
                               error="the worker ended the job without a result")
        except asyncio.CancelledError:
            if job.state not in ENDED:  # cancelled while its final state was recorded: kept
                await self._update(job, state="cancelled", eta_seconds=0.0)
            raise
        except Exception as error:  # noqa: BLE001 - the job fails, the server goes on
            log.warning("fine-tune job %s failed: %s", job.job_id, error)
            message = str(error) or type(error).__name__
            # A disk error names server paths: the tenant hears what to do,
            # the paths stay in the log line above.
            if is_storage_full(error):
                message = str(StorageFull())
            elif isinstance(error, OSError):
                message = STORE_FAILED
            await self._update(job, state="failed", eta_seconds=0.0, error=message)
