"""Per-tenant LoRA adapters on disk: atomic publish, lookup, load, delete.

Layout under the root:

    <tenant>/<name>/<version>/adapter.safetensors  the factors, plus string metadata
    <tenant>/<name>/<version>/manifest.json        the AdapterRecord fields, checksum
    .incoming/                                     uploads and publishes in progress, trash
    .quarantine/                                   version directories found broken
    .last_version/<tenant>/<name>                  the highest version deleted

A version directory appears by one rename of a fully written and fsynced
temporary directory, and disappears by one rename into `.incoming/`, so a
reader, or a restart after a crash, sees a whole adapter or none of it.
Startup empties `.incoming/` and indexes every version whose checksum holds.
Version numbers are never reused, even after a delete, so "name@N" always
means the same weights. Each tenant's versions and bytes are held to its
`StorageQuota`, checked under the lock that numbers a publish.
One registry object owns a root; processes must not share one.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from pathlib import Path

import safetensors.numpy

from coordinator.adapter_files import (another_base, export_file, payload_metadata,
                                      read_adapter_file)
from coordinator.adapter_record import (FORMAT, MANIFEST_FILE, NAME_PATTERN, TENSORS_FILE,
                                        AdapterRecord, check_name, parse_adapter_id,
                                        read_version_dir, shown)
from coordinator.durable_files import fsync_dir, make_dirs, replacing_file, write_durably
from coordinator.errors import FailedPrecondition, NotFound
from coordinator.storage_quota import AdapterUsage, StorageQuota
from gemma_core.errors import AdapterMismatch
from gemma_core.gemma_config import GemmaConfig
from gemma_core.lora_adapter import LoraAdapter, MalformedAdapter

log = logging.getLogger("gemma_serve.adapters")


class AdapterRegistry:
    """The adapters of every tenant, stored under one root directory.

    Thread-safe. Lookups are answered from an in-memory index built at
    startup; loaded adapters are kept in a small LRU cache.

    Args:
        root: the registry directory (created if missing).
        base_config: the architecture adapters must fit.
        base_fingerprint: identifies the base model's weights; adapters
            made for another one are refused on import and on load.
        cache_size: how many loaded adapters to keep in memory.
        quota: what each tenant may store (default: StorageQuota()).

    Example:
    >>> registry = AdapterRegistry("/var/lib/gemma-serve/adapters", config, "gemma2-2b:1f3a")
    >>> record = registry.import_file("acme", "support", "/tmp/a.lora.h5", "lora.h5")
    >>> record.adapter_id
    'support@1'
    >>> adapter = registry.load(registry.resolve("acme", "support"))
    """

    def __init__(self, root: str | os.PathLike, base_config: GemmaConfig,
                 base_fingerprint: str, cache_size: int = 64,
                 quota: StorageQuota | None = None):
        self.root = Path(root)
        self.base_config = base_config
        self.base_fingerprint = base_fingerprint
        self._incoming = self.root / ".incoming"
        self._quarantine = self.root / ".quarantine"
        self._last_version = self.root / ".last_version"
        self._lock = threading.Lock()
        # tenant -> name -> version -> record: a tenant's lookups never scan others'.
        self._index: dict[str, dict[str, dict[int, AdapterRecord]]] = {}
        self._cache: collections.OrderedDict[tuple[str, str, int], tuple[str, LoraAdapter]] = \
            collections.OrderedDict()
        self._cache_size = cache_size
        self._usage = AdapterUsage(quota or StorageQuota())
        # The highest version deleted per name, for when `.last_version`
        # could not be written yet (a full disk): never hand it out again.
        self._deleted: dict[tuple[str, str], int] = {}
        self._rebuild()

    # ---- writing -------------------------------------------------------------

    def publish(self, tenant: str, name: str, adapter: LoraAdapter,
                source: str) -> AdapterRecord:
        """Stores `adapter` as the next version of `name` and returns its record.

        Raises:
            InvalidArgument: a tenant or adapter name of the wrong form.
            FailedPrecondition: the adapter does not fit the base model.
            ResourceExhausted: the tenant's quota is used up.
            OSError: the disk is full (ENOSPC); nothing is stored.
        """
        check_name("tenant", tenant)
        check_name("name", name)
        try:
            adapter.check_fits(self.base_config)
        except AdapterMismatch as error:
            raise another_base(None, error) from error
        payload = safetensors.numpy.save(adapter.tensors(), metadata={
            "format": FORMAT, "base_fingerprint": self.base_fingerprint,
            **adapter.metadata()})
        fields = dict(
            tenant=tenant, name=name, rank=int(adapter.rank), alpha=float(adapter.alpha),
            targets=adapter.targets, layers=adapter.blocks,
            base_fingerprint=self.base_fingerprint,
            sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source=str(source), num_parameters=int(adapter.num_parameters()))
        with self._lock:  # early, to write nothing when refused; _place checks again
            self._usage.check(tenant, len(payload))
        self._incoming.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="publish-", dir=self._incoming))
        try:
            write_durably(staging / TENSORS_FILE, payload)
            return self._place(staging, fields)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone once placed

    def _place(self, staging: Path, fields: dict) -> AdapterRecord:
        """Numbers the staged version and renames it into place. The manifest
        is written here because it holds the version number."""
        name_dir = self.root / fields["tenant"] / fields["name"]
        floor = 1
        with self._lock:
            self._usage.check(fields["tenant"], fields["size_bytes"])
            while True:
                version = self._next_version(fields["tenant"], fields["name"], floor)
                record = AdapterRecord(version=version, adapter_id=f"{fields['name']}@{version}",
                                       path=name_dir / str(version), **fields)
                write_durably(staging / MANIFEST_FILE,
                              json.dumps(record.to_manifest(), indent=2).encode())
                fsync_dir(staging)
                make_dirs(name_dir, self.root)
                try:
                    os.rename(staging, record.path)
                except OSError as error:  # the version exists on disk: take the next
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    floor = version + 1
                    continue
                fsync_dir(name_dir)
                self._add(record)
                self._cache.pop((record.tenant, record.name, version), None)
                return record

    def _next_version(self, tenant: str, name: str, floor: int) -> int:
        """One above every version in the index, on disk or deleted, at least
        `floor`."""
        versions = set(self._versions(tenant, name) or ())
        versions.add(max(self._deleted_up_to(tenant, name), self._deleted.get((tenant, name), 0)))
        name_dir = self.root / tenant / name
        if name_dir.is_dir():
            versions.update(int(entry.name) for entry in name_dir.iterdir()
                            if entry.name.isdigit())
        return max(floor, max(versions) + 1)

    def _deleted_up_to(self, tenant: str, name: str) -> int:
        try:
            return int((self._last_version / tenant / name).read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def _remember_deleted(self, tenant: str, name: str, version: int) -> None:
        """Records durably that `version` was used, so a later publish does
        not hand the number to different weights."""
        if self._deleted_up_to(tenant, name) >= version:
            return
        path = self._last_version / tenant / name
        make_dirs(path.parent, self.root)
        with replacing_file(path, self._incoming / f"last-version-{uuid.uuid4().hex}") as out:
            out.write(str(version).encode())

    def import_file(self, tenant: str, name: str, path: str | os.PathLike, fmt: str,
                    source: str | None = None) -> AdapterRecord:
        """Reads an adapter file (see `read_file`) and publishes it as the next
        version of `name`; `source` (recorded provenance) defaults to
        "upload:<fmt>".

        Raises:
            InvalidArgument, FailedPrecondition: as `read_file` and `publish`.
        """
        check_name("tenant", tenant)
        check_name("name", name)
        adapter = self.read_file(path, fmt)
        return self.publish(tenant, name, adapter, source or f"upload:{fmt}")

    def read_file(self, path: str | os.PathLike, fmt: str) -> LoraAdapter:
        """Reads an adapter file without storing it: `fmt` "lora.h5" (keras_hub's
        LoRA file; alpha is its rank), "safetensors" (this registry's own
        format, with metadata) or "peft" (a PEFT adapter directory). See
        coordinator/adapter_files.py."""
        return read_adapter_file(path, fmt, self.base_config, self.base_fingerprint)

    def new_upload_path(self, suffix: str = "") -> Path:
        """A fresh file path in `.incoming/` to stream an upload into. The
        caller deletes it after `import_file`; a restart deletes leftovers."""
        self._incoming.mkdir(exist_ok=True)
        return self._incoming / f"upload-{uuid.uuid4().hex}{suffix}"

    def delete(self, tenant: str, adapter_id: str) -> list[AdapterRecord]:
        """Deletes "name" (every version) or "name@N" (that one); returns the
        deleted records. Needs no new disk space before it has freed some,
        so it works on a full disk (see `_empty_trash`).

        Raises:
            NotFound: no such adapter for this tenant.
        """
        parsed = parse_adapter_id(adapter_id)
        with self._lock:
            versions = self._versions(tenant, parsed[0]) if parsed else None
            if not versions or (parsed[1] is not None and parsed[1] not in versions):
                raise _not_found(adapter_id)
            name_dir = self.root / tenant / parsed[0]
            if parsed[1] is None:
                removed = [versions[version] for version in sorted(versions)]
                target = name_dir
            else:
                removed = [versions[parsed[1]]]
                target = removed[0].path
            trash = self._incoming / "@".join(
                ("trash", tenant, parsed[0], str(removed[-1].version), uuid.uuid4().hex))
            self._incoming.mkdir(exist_ok=True)
            os.rename(target, trash)
            fsync_dir(target.parent)
            key = (tenant, parsed[0])
            self._deleted[key] = max(self._deleted.get(key, 0), removed[-1].version)
            for record in removed:
                del versions[record.version]
                self._usage.remove(tenant, record.size_bytes)
                self._cache.pop((tenant, record.name, record.version), None)
            if not versions:
                del self._index[tenant][parsed[0]]
                if not self._index[tenant]:
                    del self._index[tenant]
                for empty in (name_dir, name_dir.parent):
                    try:
                        empty.rmdir()
                    except FileNotFoundError:  # the name directory went to the trash
                        continue
                    except OSError:  # not empty
                        break
        self._empty_trash(trash)
        return removed

    def _empty_trash(self, trash: Path) -> None:
        """Frees what a delete renamed into `trash`, then records the highest
        version it held in `.last_version` and removes it. Until then the
        trash's name (trash@tenant@name@version@id) holds that number, so a
        crash in between never lets it be reused; a failure (a full disk
        taken again meanwhile) leaves the trash for the next start."""
        _, tenant, name, version, _ = trash.name.split("@")
        try:
            for entry in list(trash.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            with self._lock:
                self._deleted[(tenant, name)] = max(self._deleted.get((tenant, name), 0),
                                                    int(version))
                self._remember_deleted(tenant, name, int(version))
            trash.rmdir()
        except OSError as error:
            log.warning("could not finish deleting %s/%s@%s (%s); the next start will",
                        tenant, name, version, error)

    # ---- reading -------------------------------------------------------------

    def list(self, tenant: str) -> list[AdapterRecord]:
        """Every adapter version of `tenant`, sorted by name, then version."""
        with self._lock:
            records = [record for versions in self._index.get(tenant, {}).values()
                       for record in versions.values()]
        return sorted(records, key=lambda record: (record.name, record.version))

    def resolve(self, tenant: str, adapter_id: str) -> AdapterRecord:
        """The record of "name" (its latest version) or "name@N".

        Raises:
            NotFound: the same message whether the id is malformed, unknown
                or another tenant's, so tenants cannot probe each other.
        """
        parsed = parse_adapter_id(adapter_id)
        with self._lock:
            versions = self._versions(tenant, parsed[0]) if parsed else None
            if versions:
                version = max(versions) if parsed[1] is None else parsed[1]
                if version in versions:
                    return versions[version]
        raise _not_found(adapter_id)

    def load(self, record: AdapterRecord) -> LoraAdapter:
        """The adapter of `record`, checked against its manifest's checksum.
        Its arrays are read-only: cached adapters are shared.

        Raises:
            FailedPrecondition: made for another base model, or corrupt on disk.
            NotFound: deleted (or replaced) since `record` was resolved.
        """
        if record.base_fingerprint != self.base_fingerprint:
            raise FailedPrecondition(
                f"adapter_id: adapter {record.adapter_id!r} was made for base model "
                f"{record.base_fingerprint!r} but this server runs base model "
                f"{self.base_fingerprint!r}; re-import or re-train it for this base model.")
        key = (record.tenant, record.name, record.version)
        with self._lock:
            current = (self._versions(*key[:2]) or {}).get(record.version)
            if current is None or current.sha256 != record.sha256:
                raise _not_found(record.adapter_id)
            cached = self._cache.get(key)
            if cached is not None and cached[0] == record.sha256:
                self._cache.move_to_end(key)
                return cached[1]
        payload = self._stored_bytes(record)
        try:
            adapter = LoraAdapter.from_tensors(safetensors.numpy.load(payload),
                                               payload_metadata(payload))
        except MalformedAdapter as error:  # stored before a check refused such adapters
            raise FailedPrecondition(f"adapter_id: adapter {record.adapter_id!r} cannot be "
                                     f"served: {error} Delete it.") from error
        for pair in adapter.kernels.values():
            for factor in pair:
                factor.setflags(write=False)
        with self._lock:
            self._cache[key] = (record.sha256, adapter)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return adapter

    def _stored_bytes(self, record: AdapterRecord) -> bytes:
        """`record`'s safetensors file, checked against its checksum."""
        try:
            payload = (record.path / TENSORS_FILE).read_bytes()
        except FileNotFoundError:  # deleted meanwhile
            raise _not_found(record.adapter_id) from None
        if hashlib.sha256(payload).hexdigest() != record.sha256:
            log.error("adapter %s/%s fails its checksum at %s", record.tenant,
                      record.adapter_id, record.path)
            raise FailedPrecondition(
                f"adapter_id: adapter {record.adapter_id!r} is corrupt on disk (checksum "
                "mismatch); delete and re-upload it.")
        return payload

    def export(self, record: AdapterRecord, fmt: str) -> tuple[str, bytes]:
        """(file name, bytes) of `record`'s adapter in `fmt` ("lora.h5",
        "safetensors" or "peft"; adapter_files.export_file), built in memory.
        """
        adapter = self.load(record)
        stored = self._stored_bytes(record) if fmt == "safetensors" else b""
        return export_file(adapter, fmt, self.base_config, stored,
                           f"{record.name}-v{record.version}")

    # ---- startup -------------------------------------------------------------

    def _rebuild(self) -> None:
        """Empties `.incoming/`, then indexes every whole, intact version and
        quarantines the rest."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self._incoming.iterdir():
            log.info("removing %s, left over from an interrupted upload, publish or delete",
                     leftover)
            if _is_trash(leftover):  # a delete cut short: its version stays used
                self._empty_trash(leftover)
            elif leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        for tenant_dir in sorted(self.root.iterdir()):
            if tenant_dir in (self._incoming, self._quarantine, self._last_version):
                continue
            if not _is_name_dir(tenant_dir):
                log.warning("ignoring %s: not a tenant directory", tenant_dir)
                continue
            for name_dir in sorted(tenant_dir.iterdir()):
                if not _is_name_dir(name_dir):
                    log.warning("ignoring %s: not an adapter directory", name_dir)
                    continue
                for version_dir in sorted(name_dir.iterdir()):
                    try:
                        record = self._read_version(version_dir)
                    except (OSError, ValueError) as error:
                        self._quarantine_entry(version_dir, str(error))
                        continue
                    self._add(record)
        log.info("adapter registry %s: %d adapter versions", self.root,
                 sum(len(v) for names in self._index.values() for v in names.values()))

    def _add(self, record: AdapterRecord) -> None:
        """Indexes `record` and counts it against its tenant's quota."""
        names = self._index.setdefault(record.tenant, {})
        names.setdefault(record.name, {})[record.version] = record
        self._usage.add(record.tenant, record.size_bytes)

    def _versions(self, tenant: str, name: str) -> dict[int, AdapterRecord] | None:
        return self._index.get(tenant, {}).get(name)

    def _read_version(self, version_dir: Path) -> AdapterRecord:
        """`read_version_dir`, marked when made for another base model."""
        record = read_version_dir(version_dir)
        if record.base_fingerprint != self.base_fingerprint:
            log.warning("adapter %s/%s was made for base model %r, not this one (%r); it "
                        "stays listed but cannot be loaded", record.tenant, record.adapter_id,
                        record.base_fingerprint, self.base_fingerprint)
            record = dataclasses.replace(record, fits_base=False)
        return record

    def _quarantine_entry(self, entry: Path, reason: str) -> None:
        """Moves a broken version aside (never deletes it) and says so."""
        relative = entry.relative_to(self.root)
        if entry.name.isdigit():
            self._remember_deleted(relative.parts[0], relative.parts[1], int(entry.name))
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        target = (self._quarantine / relative.parent
                  / f"{relative.name}.{stamp}.{uuid.uuid4().hex[:8]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(entry, target)
        fsync_dir(entry.parent)
        log.warning("quarantined %s to %s: %s", entry, target, reason)


def _is_name_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and bool(NAME_PATTERN.fullmatch(path.name))


def _is_trash(path: Path) -> bool:
    """Whether `path` is a trash directory `delete` made."""
    parts = path.name.split("@")
    return (len(parts) == 5 and parts[0] == "trash" and path.is_dir() and not path.is_symlink()
            and all(NAME_PATTERN.fullmatch(part) for part in parts[1:3])
            and parts[3].isdigit())


def _not_found(adapter_id: object) -> NotFound:
    return NotFound(f"adapter_id: no adapter {shown(adapter_id)} for this tenant.")
