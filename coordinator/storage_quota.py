"""What one tenant may keep stored, and what it holds now.

Quotas keep one tenant from filling the disk everyone shares, and keep each
listing's work and reply bounded. Adapter usage is counted in memory (built
at startup, updated at every publish and delete) by the registry, under its
lock, so a check and the publish it admits are one step: two concurrent
publishes can never both take the last place. Dataset usage is read from
the tenant's folder, under the dataset store's lock, the same way.
"""

from __future__ import annotations

import collections
import dataclasses

from coordinator.errors import ResourceExhausted

_MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class StorageQuota:
    """Per-tenant storage limits (`gemma-serve --tenant-max-...`).

    Attributes:
        max_adapter_versions: adapter versions stored, all names together.
        max_adapter_bytes: bytes of their tensor files.
        max_datasets: uploaded datasets.
        max_dataset_bytes: bytes of their stored files.
    """

    max_adapter_versions: int = 1000
    max_adapter_bytes: int = 4096 * _MIB
    max_datasets: int = 100
    max_dataset_bytes: int = 4096 * _MIB

    def __post_init__(self) -> None:
        for field, flag in (("max_adapter_versions", "--tenant-max-adapter-versions"),
                            ("max_adapter_bytes", "--tenant-max-adapter-mib"),
                            ("max_datasets", "--tenant-max-datasets"),
                            ("max_dataset_bytes", "--tenant-max-dataset-mib")):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} ({flag}) must be positive, got "
                                 f"{getattr(self, field)}.")


class AdapterUsage:
    """Each tenant's stored adapter versions and bytes. Not thread-safe: the
    registry calls it under its own lock."""

    def __init__(self, quota: StorageQuota):
        self.quota = quota
        self._versions: collections.Counter[str] = collections.Counter()
        self._bytes: collections.Counter[str] = collections.Counter()

    def check(self, tenant: str, size_bytes: int) -> None:
        """Raises ResourceExhausted unless one more version of `size_bytes`
        fits the tenant's quota."""
        versions, used = self._versions[tenant], self._bytes[tenant]
        if versions + 1 > self.quota.max_adapter_versions:
            raise ResourceExhausted(
                f"this tenant stores {versions} adapter versions, its quota "
                f"(--tenant-max-adapter-versions {self.quota.max_adapter_versions}); "
                "delete versions it no longer needs (DeleteAdapter) and retry.")
        if used + size_bytes > self.quota.max_adapter_bytes:
            raise ResourceExhausted(
                f"this tenant stores {used / _MIB:.1f} MiB of adapters and this one adds "
                f"{size_bytes / _MIB:.1f} MiB, over its quota (--tenant-max-adapter-mib "
                f"{self.quota.max_adapter_bytes / _MIB:g}); delete versions it no longer "
                "needs (DeleteAdapter) and retry.")

    def add(self, tenant: str, size_bytes: int) -> None:
        self._versions[tenant] += 1
        self._bytes[tenant] += size_bytes

    def remove(self, tenant: str, size_bytes: int) -> None:
        self._versions[tenant] -= 1
        self._bytes[tenant] -= size_bytes


def check_dataset_bytes(quota: StorageQuota, stored: int, adding: int) -> None:
    """Raises ResourceExhausted when a tenant whose datasets take `stored`
    bytes may not add (or grow one by) `adding` more."""
    if stored + adding > quota.max_dataset_bytes:
        raise ResourceExhausted(
            f"this tenant stores {stored / _MIB:.1f} MiB of datasets and this one adds "
            f"{adding / _MIB:.1f} MiB, over its quota (--tenant-max-dataset-mib "
            f"{quota.max_dataset_bytes / _MIB:g}); delete datasets it no longer needs "
            "(DeleteDataset) and retry.")


def check_dataset_count(quota: StorageQuota, stored: int) -> None:
    """Raises ResourceExhausted when a tenant holding `stored` datasets may
    not add another."""
    if stored + 1 > quota.max_datasets:
        raise ResourceExhausted(
            f"this tenant stores {stored} datasets, its quota (--tenant-max-datasets "
            f"{quota.max_datasets}); delete datasets it no longer needs (DeleteDataset) "
            "and retry, or upload under an existing name to replace it.")
