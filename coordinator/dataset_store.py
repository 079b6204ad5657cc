"""Uploaded training datasets, per tenant, as token ids on disk.

`<root>/<tenant>/<name>.npz` holds the sequences concatenated (`ids`) and
where each starts (`offsets`). Written to a temporary file, fsynced and
renamed (the directory fsynced after), so a dataset is there whole or not
at all; uploading a name again replaces it. A tenant holds at most
`StorageQuota.max_datasets` of them, of `max_dataset_bytes` in all, counted
from its folder under the store's lock, so a check and the rename it admits
are one step. An upload streams into `<root>/.incoming/` before it is parsed.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np

from coordinator.adapter_record import check_name, shown
from coordinator.durable_files import make_dirs, replacing_file
from coordinator.errors import NotFound
from coordinator.storage_quota import StorageQuota, check_dataset_bytes, check_dataset_count
from worker.packed_sequences import PackedSequences

log = logging.getLogger("gemma_serve.datasets")

# Datasets are written under this prefix, then renamed into place.
TEMPORARY_PREFIX = ".upload-"


class DatasetStore:
    """Datasets of every tenant under `root`; a tenant reaches only its own.
    One store owns a root: at start it removes the temporary files a killed
    process left (nobody else can be writing them)."""

    def __init__(self, root: str | os.PathLike, quota: StorageQuota | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota = quota or StorageQuota()
        self._lock = threading.Lock()  # a count check and the rename it admits: one step
        for leftover in self.root.glob(f"*/{TEMPORARY_PREFIX}*"):
            log.info("removing %s, left over from an interrupted dataset upload", leftover)
            leftover.unlink(missing_ok=True)

    def _path(self, tenant: str, name: str) -> Path:
        return self.root / check_name("tenant", tenant) / f"{check_name('name', name)}.npz"

    def new_upload_path(self) -> Path:
        """A fresh path in `.incoming/` (no tenant can have that name) to
        stream an upload into. The caller removes the file; a restart removes
        leftovers, its name starting with TEMPORARY_PREFIX."""
        incoming = self.root / ".incoming"
        incoming.mkdir(exist_ok=True)
        return incoming / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}.jsonl"

    def save(self, tenant: str, name: str,
             sequences: PackedSequences | Sequence[np.ndarray]) -> tuple[int, int]:
        """Stores `sequences` as dataset `name`; returns (examples, tokens).

        Raises:
            ResourceExhausted: the tenant's count or byte quota would be
                passed; nothing is stored.
            OSError: the disk is full (ENOSPC); nothing is stored.
        """
        path = self._path(tenant, name)
        if not isinstance(sequences, PackedSequences):
            sequences = PackedSequences.pack(sequences)
        with self._lock:  # early, to write nothing when refused (the arrays' size)
            self._check_quota(path, sequences.ids.nbytes + sequences.offsets.nbytes)
        make_dirs(path.parent, self.root)
        # Not *.npz: never listed or counted while it is written.
        temporary = path.parent / f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}"
        # Checked again with the file's size, as others save meanwhile.
        with replacing_file(path, temporary, guard=self._lock,
                            admit=lambda written: self._check_quota(
                                path, written.stat().st_size)) as out:
            np.savez(out, ids=sequences.ids, offsets=sequences.offsets)
        return len(sequences), sequences.num_tokens

    def _check_quota(self, path: Path, size: int) -> None:
        """Raises ResourceExhausted unless a file of `size` bytes may become
        dataset `path`, new or replacing one. Under the lock."""
        sizes = {}
        for stored in path.parent.glob("*.npz"):
            try:
                sizes[stored] = stored.stat().st_size
            except FileNotFoundError:  # deleted meanwhile
                continue
        if sizes.pop(path, None) is None:  # a new name, not a replacement
            check_dataset_count(self.quota, len(sizes))
        check_dataset_bytes(self.quota, sum(sizes.values()), size)

    def list(self, tenant: str) -> list[tuple[str, int, int]]:
        """(name, examples, tokens) of each of the tenant's datasets, by name."""
        folder = self.root / check_name("tenant", tenant)
        found = []
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            counts = _counts(path)
            if counts is not None:  # unreadable: not listed, as load refuses it
                found.append((path.stem, *counts))
        return found

    def delete(self, tenant: str, dataset_id: str) -> tuple[int, int]:
        """Removes the caller's dataset `dataset_id`; returns its (examples,
        tokens). Raises NotFound as `load` does."""
        try:
            path = self._path(tenant, dataset_id)
        except Exception:  # noqa: BLE001 - a name that cannot exist is unknown too
            path = None
        counts = None if path is None else _counts(path)
        if counts is None:
            raise _unknown(dataset_id)
        try:
            path.unlink()
        except FileNotFoundError:  # deleted meanwhile by another call
            raise _unknown(dataset_id) from None
        return counts

    def load(self, tenant: str, dataset_id: str) -> PackedSequences:
        """The sequences of the caller's dataset `dataset_id`.

        Raises:
            NotFound: no such dataset for this tenant (same answer whoever
                else may have one by that name).
        """
        try:
            path = self._path(tenant, dataset_id)
            with np.load(path) as data:
                return PackedSequences(data["ids"], data["offsets"])
        except Exception:  # noqa: BLE001 - malformed, missing, unreadable: all unknown
            raise _unknown(dataset_id) from None


def _counts(path: Path) -> tuple[int, int] | None:
    """(examples, tokens) of a stored dataset from its offsets alone (the
    ids are not read), or None if it is missing or unreadable."""
    try:
        with np.load(path) as data:
            offsets = data["offsets"]
        return len(offsets) - 1, int(offsets[-1])
    except Exception:  # noqa: BLE001 - malformed, missing, unreadable: all unknown
        return None


def _unknown(dataset_id: str) -> NotFound:
    # The same answer whoever else may have a dataset by that name.
    return NotFound(f"dataset_id: no dataset {shown(dataset_id)} for this tenant.")
