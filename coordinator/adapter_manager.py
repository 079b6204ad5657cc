"""Adapters between the registry on disk and the workers' slots.

The registry answers what a tenant has; this module turns that into what
workers need: an `AdapterRef` (a key unique across tenants and versions,
and the tensors put once into Ray's object store), and the calls that
make adapters resident or release them.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
from pathlib import Path
from typing import AsyncIterator

import ray

from coordinator.adapter_record import AdapterRecord, check_name
from coordinator.adapter_registry import AdapterRegistry
from coordinator import peft_archive
from coordinator.adapter_sources import fetch_adapter
from coordinator.errors import InvalidArgument
from coordinator.off_loop import in_thread
from coordinator.stream_guard import receive_to_file
from coordinator.forward_work import AdapterRef
from coordinator.worker_router import WorkerRouter

# Ray object refs kept for recently used adapters; older ones are put again
# when next used.
_REF_CACHE_SIZE = 256


def adapter_key(record: AdapterRecord) -> str:
    """The workers' slot key: unique per tenant, name and version."""
    return f"{record.tenant}/{record.name}@{record.version}"


def key_tenant(key: str) -> str:
    """The tenant whose adapter a slot key (from `adapter_key`) names."""
    return key.partition("/")[0]


class AdapterManager:
    """Upload, resolve, load, unload, delete and export, for one tenant at
    a time. Every lookup goes through the registry with the caller's tenant,
    so another tenant's adapters are never reachable.

    Args:
        registry: the adapters on disk.
        router: the workers.
        max_rank: the workers' slot rank; larger adapters are refused.
        max_upload_bytes: upload size cap (and of what RegisterAdapter copies).
        source_root: the one directory RegisterAdapter may read local paths
            under (--adapter-source-root); None: no local paths.
    """

    def __init__(self, registry: AdapterRegistry, router: WorkerRouter, max_rank: int,
                 max_upload_bytes: int, source_root: Path | None = None):
        self.registry = registry
        self._router = router
        self.max_rank = max_rank
        self.max_upload_bytes = max_upload_bytes
        self.source_root = source_root
        self._refs: collections.OrderedDict[str, ray.ObjectRef] = collections.OrderedDict()

    async def ref_for(self, tenant: str, adapter_id: str) -> tuple[AdapterRecord, AdapterRef]:
        """The record and worker reference of the caller's adapter.

        Raises:
            NotFound: no such adapter for this tenant.
            FailedPrecondition: corrupt on disk, or made for another base.
        """
        record = self.registry.resolve(tenant, adapter_id)
        key = adapter_key(record)
        ref = self._refs.get(key)
        if ref is None:
            adapter = await asyncio.to_thread(self.registry.load, record)
            ref = ray.put(adapter)
            self._refs[key] = ref
            while len(self._refs) > _REF_CACHE_SIZE:
                self._refs.popitem(last=False)
        self._refs.move_to_end(key)
        return record, AdapterRef(key=key, payload=ref)

    async def upload(self, tenant: str, name: str, fmt: str,
                     chunks: AsyncIterator[bytes]) -> AdapterRecord:
        """Streams `chunks` to a scratch file, then validates and publishes
        (a "peft" upload is a tar archive, peft_archive). Cancelled, it
        returns once the step in progress has ended (the caller's upload
        slot held till then) and publishes nothing unless the publish had
        begun.

        Raises:
            ResourceExhausted: more than `max_upload_bytes`.
            InvalidArgument, FailedPrecondition: from the registry.
        """
        check_name("name", name)
        path = self.registry.new_upload_path()
        unpacked = path.with_name(f"{path.name}.d")
        try:
            size = await receive_to_file(
                chunks, path, self.max_upload_bytes,
                f"the upload is larger than the {self.max_upload_bytes} byte limit "
                "(--max-upload-mib); LoRA adapters are usually far smaller.")
            if size == 0:
                raise InvalidArgument("data", "the upload holds no bytes after the header.")
            source = path
            if fmt == "peft":
                unpacked.mkdir()
                source = await in_thread(peft_archive.unpack, path, unpacked,
                                         self.max_upload_bytes)
            return await self._publish(tenant, name, source, fmt, f"upload:{fmt}")
        finally:
            path.unlink(missing_ok=True)
            shutil.rmtree(unpacked, ignore_errors=True)

    async def register(self, tenant: str, name: str, source: str) -> AdapterRecord:
        """Copies the adapter at `source` (adapter_sources) into a scratch
        directory, then validates and publishes it as `upload` does.

        Raises:
            InvalidArgument, PermissionDenied, FailedPrecondition,
            ResourceExhausted: see adapter_sources.fetch_adapter and `upload`.
        """
        check_name("name", name)
        scratch = self.registry.new_upload_path()
        scratch.mkdir()
        try:
            path, fmt = await in_thread(fetch_adapter, source, scratch, self.source_root,
                                        self.max_upload_bytes)
            return await self._publish(tenant, name, path, fmt, f"register:{source}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _publish(self, tenant: str, name: str, path, fmt: str,
                       source: str) -> AdapterRecord:
        adapter = await in_thread(self.registry.read_file, path, fmt)
        if adapter.largest_rank > self.max_rank:
            raise InvalidArgument(
                "adapter", f"rank {adapter.largest_rank} is above this server's maximum "
                           f"adapter rank {self.max_rank}; retrain at a lower rank or start "
                           "the server with a larger --max-adapter-rank.")
        return await in_thread(self.registry.publish, tenant, name, adapter, source)

    async def load(self, tenant: str, adapter_id: str) -> tuple[AdapterRecord, list[str], float]:
        record, ref = await self.ref_for(tenant, adapter_id)
        workers, load_ms = await self._router.load_adapter(ref)
        return record, workers, load_ms

    async def unload(self, tenant: str, adapter_id: str) -> list[str]:
        record = self.registry.resolve(tenant, adapter_id)
        return self._router.unload_adapters([adapter_key(record)])

    async def delete(self, tenant: str, adapter_id: str) -> list[AdapterRecord]:
        records = await asyncio.to_thread(self.registry.delete, tenant, adapter_id)
        keys = [adapter_key(record) for record in records]
        for key in keys:
            self._refs.pop(key, None)
        self._router.unload_adapters(keys)  # a courtesy: LRU would free them anyway
        return records

    async def resident_on(self) -> dict[str, list[str]]:
        """adapter key -> workers holding it now."""
        where: dict[str, list[str]] = {}
        for worker_id, keys in self._router.resident_adapters().items():
            for key in keys:
                where.setdefault(key, []).append(worker_id)
        return where

    async def export(self, tenant: str, adapter_id: str, fmt: str) -> tuple[str, bytes]:
        """(file name, bytes) of the adapter in `fmt`. Built in
        memory, not in a temporary file: a cancelled call leaves its thread
        running, and that thread would write the file after any cleanup here."""
        record = self.registry.resolve(tenant, adapter_id)
        return await asyncio.to_thread(self.registry.export, record, fmt)
