"""Fine-tune job records on disk, one small JSON file per job, kept so that
a restarted coordinator still answers for its jobs.

A record is replaced atomically (temporary file, rename), so a reader sees
the old one or the new one, whole. A job's final record must reach the disk
even when it has filled up meanwhile (a publish refused for want of space
is the usual way a job fails then): each job holds a preallocated file from
its start (`<job_id>.final`, RESERVE_BYTES), and its final record is
written into those blocks, which needs no new space, then renamed over its
record. Writing into blocks a file already holds needs no new space on
ext4, xfs or tmpfs; on a copy-on-write file system, where it may, the
reserve is freed and the record written again in the space that frees.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

from coordinator.durable_files import replacing_file, write_durably

log = logging.getLogger("gemma_serve.fine_tune")

# A record is a few hundred bytes plus its error text, which FineTuneJobs
# caps: well under this even with every character escaped by JSON.
RESERVE_BYTES = 64 << 10


class JobJournal:
    """The records under `directory`; one coordinator owns it.

    Example:
    >>> journal = JobJournal("/var/lib/gemma-serve/jobs")
    >>> journal.create("ft-1", {"job_id": "ft-1", "state": "queued"})
    >>> journal.write_final("ft-1", {"job_id": "ft-1", "state": "failed"})
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):  # a write cut short
            leftover.unlink(missing_ok=True)

    def _path(self, job_id: str, suffix: str = ".json") -> Path:
        return self.directory / f"{job_id}{suffix}"

    def records(self) -> Iterator[tuple[Path, dict]]:
        """Each stored record that is a JSON object, by file name; the rest
        are logged and skipped."""
        for path in sorted(self.directory.glob("ft-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                record = error
            if isinstance(record, dict):
                yield path, record
            else:
                log.warning("ignoring unreadable job record %s: %s", path, record)

    def create(self, job_id: str, record: dict) -> None:
        """Stores a new job's first record and its reserve; on failure (a
        full disk: OSError) neither is left behind."""
        try:
            self.write(job_id, record, durable=True)
            # Random bytes: a compressing file system cannot shrink them.
            write_durably(self._path(job_id, ".final"), os.urandom(RESERVE_BYTES))
        except BaseException:
            self.remove(job_id)
            raise

    def write(self, job_id: str, record: dict, durable: bool = False) -> None:
        """Replaces a job's record; `durable` (state changes) fsyncs it and
        the rename."""
        data = json.dumps(record, default=float).encode()
        with replacing_file(self._path(job_id), self._path(job_id, ".tmp"),
                            durable=durable) as out:
            out.write(data)

    def write_final(self, job_id: str, record: dict) -> None:
        """Replaces a job's record with its last one, durably, into its
        reserve when it has one (see the module docstring)."""
        data = json.dumps(record, default=float).encode()
        try:
            # The reserve is the temporary file, written over in place; a
            # failure removes it, which frees its blocks for the retry below.
            with replacing_file(self._path(job_id), self._path(job_id, ".final"),
                                mode="r+b") as out:
                out.write(data)
                out.truncate()
            return
        except FileNotFoundError:  # no reserve (already ended once, or an older journal)
            pass
        except OSError as error:  # it needed new blocks after all: freed, write anew
            log.warning("job %s: could not write into its reserved space (%s); freeing "
                        "it and writing the record anew", job_id, error)
        self.write(job_id, record, durable=True)

    def remove(self, job_id: str) -> None:
        for suffix in (".json", ".final", ".tmp"):
            self._path(job_id, suffix).unlink(missing_ok=True)

    def drop_reserves(self) -> None:
        """Frees the reserves no job needs: at start, once every job read
        back has its final record."""
        for reserve in self.directory.glob("*.final"):
            reserve.unlink(missing_ok=True)
