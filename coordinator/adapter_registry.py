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
means the same weights.
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

import safetensors
import safetensors.numpy

from coordinator.adapter_record import (FORMAT, NAME_PATTERN, AdapterRecord, check_name,
                                        parse_adapter_id, shown)
from coordinator.errors import FailedPrecondition, InvalidArgument, NotFound
from gemma_core.errors import AdapterMismatch, PresetError
from gemma_core.gemma_config import GemmaConfig
from gemma_core.lora_adapter import LoraAdapter, MalformedAdapter

log = logging.getLogger("gemma_serve.adapters")

TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
IMPORT_FORMATS = ("lora.h5", "safetensors")
_REQUIRED_METADATA = ("rank", "alpha", "base_fingerprint")


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

    Example:
    >>> registry = AdapterRegistry("/var/lib/gemma-serve/adapters", config, "gemma2-2b:1f3a")
    >>> record = registry.import_file("acme", "support", "/tmp/a.lora.h5", "lora.h5")
    >>> record.adapter_id
    'support@1'
    >>> adapter = registry.load(registry.resolve("acme", "support"))
    """

    def __init__(self, root: str | os.PathLike, base_config: GemmaConfig,
                 base_fingerprint: str, cache_size: int = 64):
        self.root = Path(root)
        self.base_config = base_config
        self.base_fingerprint = base_fingerprint
        self._incoming = self.root / ".incoming"
        self._quarantine = self.root / ".quarantine"
        self._last_version = self.root / ".last_version"
        self._lock = threading.Lock()
        self._index: dict[tuple[str, str], dict[int, AdapterRecord]] = {}
        self._cache: collections.OrderedDict[tuple[str, str, int], tuple[str, LoraAdapter]] = \
            collections.OrderedDict()
        self._cache_size = cache_size
        self._rebuild()

    # ---- writing -------------------------------------------------------------

    def publish(self, tenant: str, name: str, adapter: LoraAdapter,
                source: str) -> AdapterRecord:
        """Stores `adapter` as the next version of `name` and returns its record.

        Raises:
            InvalidArgument: a tenant or adapter name of the wrong form.
            FailedPrecondition: the adapter does not fit the base model.
        """
        check_name("tenant", tenant)
        check_name("name", name)
        try:
            adapter.check_fits(self.base_config)
        except AdapterMismatch as error:
            raise _another_base(None, error) from error
        payload = safetensors.numpy.save(adapter.tensors(), metadata={
            "format": FORMAT, "rank": str(adapter.rank), "alpha": repr(float(adapter.alpha)),
            "base_fingerprint": self.base_fingerprint})
        fields = dict(
            tenant=tenant, name=name, rank=int(adapter.rank), alpha=float(adapter.alpha),
            targets=adapter.targets, layers=adapter.blocks,
            base_fingerprint=self.base_fingerprint,
            sha256=hashlib.sha256(payload).hexdigest(), size_bytes=len(payload),
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            source=str(source), num_parameters=int(adapter.num_parameters()))
        self._incoming.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="publish-", dir=self._incoming))
        try:
            _write_durably(staging / TENSORS_FILE, payload)
            return self._place(staging, fields)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone once placed

    def _place(self, staging: Path, fields: dict) -> AdapterRecord:
        """Numbers the staged version and renames it into place. The manifest
        is written here because it holds the version number."""
        name_dir = self.root / fields["tenant"] / fields["name"]
        floor = 1
        with self._lock:
            while True:
                version = self._next_version(fields["tenant"], fields["name"], floor)
                record = AdapterRecord(version=version, adapter_id=f"{fields['name']}@{version}",
                                       path=name_dir / str(version), **fields)
                _write_durably(staging / MANIFEST_FILE,
                               json.dumps(record.to_manifest(), indent=2).encode())
                _fsync_dir(staging)
                _make_dirs(name_dir, self.root)
                try:
                    os.rename(staging, record.path)
                except OSError as error:  # the version exists on disk: take the next
                    if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    floor = version + 1
                    continue
                _fsync_dir(name_dir)
                self._index.setdefault((record.tenant, record.name), {})[version] = record
                self._cache.pop((record.tenant, record.name, version), None)
                return record

    def _next_version(self, tenant: str, name: str, floor: int) -> int:
        """One above every version in the index, on disk or deleted, at least
        `floor`."""
        versions = set(self._index.get((tenant, name), {}))
        versions.add(self._deleted_up_to(tenant, name))
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
        """Records (durably, before the delete) that `version` was used, so a
        later publish does not hand the number to different weights."""
        if self._deleted_up_to(tenant, name) >= version:
            return
        path = self._last_version / tenant / name
        _make_dirs(path.parent, self.root)
        staging = self._incoming / f"last-version-{uuid.uuid4().hex}"
        _write_durably(staging, str(version).encode())
        os.rename(staging, path)
        _fsync_dir(path.parent)

    def import_file(self, tenant: str, name: str, path: str | os.PathLike, fmt: str,
                    source: str | None = None) -> AdapterRecord:
        """Reads an adapter file and publishes it as the next version of `name`.

        Args:
            fmt: "lora.h5" (keras_hub's LoRA file; alpha is its rank) or
                "safetensors" (this registry's own format, with metadata).
            source: recorded provenance; defaults to "upload:<fmt>".

        Raises:
            InvalidArgument: an unknown format, or a file that is not one.
            FailedPrecondition: the adapter was made for another base model.
        """
        check_name("tenant", tenant)
        check_name("name", name)
        adapter = self.read_file(path, fmt)
        return self.publish(tenant, name, adapter, source or f"upload:{fmt}")

    def read_file(self, path: str | os.PathLike, fmt: str) -> LoraAdapter:
        """Reads an adapter file without storing it (see `import_file`).

        Raises:
            InvalidArgument: an unknown format, or a file that is not one.
            FailedPrecondition: a safetensors file made for another base model,
                or a lora.h5 file that does not fit this one.
        """
        if fmt == "lora.h5":
            return self._read_lora_h5(Path(path))
        if fmt == "safetensors":
            return self._read_safetensors(Path(path))
        raise InvalidArgument("format", f"{fmt!r} is not an adapter file format; "
                                        f"use one of {list(IMPORT_FORMATS)}.")

    def _read_lora_h5(self, path: Path) -> LoraAdapter:
        try:
            return LoraAdapter.from_lora_file(path, self.base_config)
        except MalformedAdapter as error:
            raise _not_valid("lora.h5", path, error) from error
        except AdapterMismatch as error:
            raise _another_base(path, error) from error
        except (PresetError, OSError, KeyError, ValueError, TypeError) as error:
            raise _not_valid("lora.h5", path, error) from error

    def _read_safetensors(self, path: Path) -> LoraAdapter:
        try:
            with safetensors.safe_open(path, framework="numpy") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (safetensors.SafetensorError, OSError, ValueError, TypeError) as error:
            raise _not_valid("safetensors", path, error) from error
        missing = [key for key in _REQUIRED_METADATA if key not in metadata]
        if missing:
            raise _not_valid("safetensors", path, f"its metadata lacks {missing}; "
                             f"adapter files carry {list(_REQUIRED_METADATA)}")
        if metadata.get("format", FORMAT) != FORMAT:
            raise _not_valid("safetensors", path, f"its format is {metadata['format']!r}, "
                             f"not {FORMAT!r}")
        if metadata["base_fingerprint"] != self.base_fingerprint:
            raise FailedPrecondition(
                f"adapter: it was made for base model {metadata['base_fingerprint']!r} but "
                f"this server runs base model {self.base_fingerprint!r}; import an adapter "
                "made for this base model.")
        try:
            return LoraAdapter.from_tensors(tensors, int(metadata["rank"]),
                                            float(metadata["alpha"]))
        except ValueError as error:  # AdapterMismatch included: malformed factors
            raise _not_valid("safetensors", path, error) from error

    def new_upload_path(self, suffix: str = "") -> Path:
        """A fresh file path in `.incoming/` to stream an upload into. The
        caller deletes it after `import_file`; a restart deletes leftovers."""
        self._incoming.mkdir(exist_ok=True)
        return self._incoming / f"upload-{uuid.uuid4().hex}{suffix}"

    def delete(self, tenant: str, adapter_id: str) -> list[AdapterRecord]:
        """Deletes "name" (every version) or "name@N" (that one); returns the
        deleted records.

        Raises:
            NotFound: no such adapter for this tenant.
        """
        parsed = parse_adapter_id(adapter_id)
        trash = self._incoming / f"trash-{uuid.uuid4().hex}"
        with self._lock:
            versions = self._index.get((tenant, parsed[0])) if parsed else None
            if not versions or (parsed[1] is not None and parsed[1] not in versions):
                raise _not_found(adapter_id)
            name_dir = self.root / tenant / parsed[0]
            if parsed[1] is None:
                removed = [versions[version] for version in sorted(versions)]
                target = name_dir
            else:
                removed = [versions[parsed[1]]]
                target = removed[0].path
            self._incoming.mkdir(exist_ok=True)
            self._remember_deleted(tenant, parsed[0], removed[-1].version)
            os.rename(target, trash)
            _fsync_dir(target.parent)
            for record in removed:
                del versions[record.version]
                self._cache.pop((tenant, record.name, record.version), None)
            if not versions:
                del self._index[(tenant, parsed[0])]
                for empty in (name_dir, name_dir.parent):
                    try:
                        empty.rmdir()
                    except FileNotFoundError:  # the name directory went to the trash
                        continue
                    except OSError:  # not empty
                        break
        shutil.rmtree(trash, ignore_errors=True)
        return removed

    # ---- reading -------------------------------------------------------------

    def list(self, tenant: str) -> list[AdapterRecord]:
        """Every adapter version of `tenant`, sorted by name, then version."""
        with self._lock:
            records = [record for (owner, _), versions in self._index.items()
                       if owner == tenant for record in versions.values()]
        return sorted(records, key=lambda record: (record.name, record.version))

    def resolve(self, tenant: str, adapter_id: str) -> AdapterRecord:
        """The record of "name" (its latest version) or "name@N".

        Raises:
            NotFound: the same message whether the id is malformed, unknown
                or another tenant's, so tenants cannot probe each other.
        """
        parsed = parse_adapter_id(adapter_id)
        with self._lock:
            versions = self._index.get((tenant, parsed[0])) if parsed else None
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
            current = self._index.get(key[:2], {}).get(record.version)
            if current is None or current.sha256 != record.sha256:
                raise _not_found(record.adapter_id)
            cached = self._cache.get(key)
            if cached is not None and cached[0] == record.sha256:
                self._cache.move_to_end(key)
                return cached[1]
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
        adapter = LoraAdapter.from_tensors(safetensors.numpy.load(payload), record.rank,
                                           record.alpha)
        for pair in adapter.kernels.values():
            for factor in pair:
                factor.setflags(write=False)
        with self._lock:
            self._cache[key] = (record.sha256, adapter)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return adapter

    def export_lora_h5(self, record: AdapterRecord, path: str | os.PathLike) -> None:
        """Writes `record`'s adapter as a keras_hub `.lora.h5` file (alpha/rank
        folded into b), atomically.

        Raises:
            InvalidArgument: `path` does not end in ".lora.h5".
        """
        path = Path(path)
        if not path.name.endswith(".lora.h5"):
            raise InvalidArgument("path", f"LoRA files end in '.lora.h5', got {path.name!r}.")
        adapter = self.load(record)
        staging = path.with_name(f".{uuid.uuid4().hex}.tmp.lora.h5")
        try:
            adapter.write_lora_file(staging, self.base_config)
            with open(staging, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)

    # ---- startup -------------------------------------------------------------

    def _rebuild(self) -> None:
        """Empties `.incoming/`, then indexes every whole, intact version and
        quarantines the rest."""
        self._incoming.mkdir(parents=True, exist_ok=True)
        for leftover in self._incoming.iterdir():
            log.info("removing %s, left over from an interrupted upload or publish", leftover)
            if leftover.is_dir() and not leftover.is_symlink():
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
                    versions = self._index.setdefault((record.tenant, record.name), {})
                    versions[record.version] = record
        log.info("adapter registry %s: %d adapter versions", self.root,
                 sum(len(versions) for versions in self._index.values()))

    def _read_version(self, version_dir: Path) -> AdapterRecord:
        """The record of a version directory; ValueError or OSError (a
        missing file) says why it is not a whole, intact version."""
        if not version_dir.name.isdigit() or version_dir.name.startswith("0"):
            raise ValueError("not a version directory")
        manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
        record = AdapterRecord.from_manifest(manifest, version_dir)
        where = (version_dir.parent.parent.name, version_dir.parent.name, int(version_dir.name))
        if (record.tenant, record.name, record.version) != where:
            raise ValueError(f"its manifest describes {record.tenant}/{record.adapter_id}")
        with open(version_dir / TENSORS_FILE, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        if digest != record.sha256:
            raise ValueError(f"checksum mismatch: {TENSORS_FILE} has sha256 {digest}, "
                             f"the manifest says {record.sha256}")
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
        _fsync_dir(entry.parent)
        log.warning("quarantined %s to %s: %s", entry, target, reason)


def _is_name_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and bool(NAME_PATTERN.fullmatch(path.name))


def _not_found(adapter_id: object) -> NotFound:
    return NotFound(f"adapter_id: no adapter {shown(adapter_id)} for this tenant.")


def _hide(path: Path, error: object) -> str:
    """The error's text without the server-side file path or a final period."""
    text = str(error).removeprefix(f"{os.fspath(path)}: ")
    return text.replace(os.fspath(path), "it").rstrip(".")


def _another_base(path: Path | None, error: object) -> FailedPrecondition:
    detail = _hide(path, error) if path else str(error).rstrip(".")
    return FailedPrecondition(f"adapter: it was made for another base model ({detail}).")


def _not_valid(fmt: str, path: Path, error: object) -> InvalidArgument:
    return InvalidArgument("adapter", f"the file is not a valid {fmt} LoRA file: "
                                      f"{_hide(path, error)}.")


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _make_dirs(path: Path, root: Path) -> None:
    """mkdir -p below `root`, fsyncing the parent of each directory made."""
    if path == root or path.is_dir():
        return
    _make_dirs(path.parent, root)
    path.mkdir(exist_ok=True)
    _fsync_dir(path.parent)
