"""One stored adapter version: its record, its manifest.json, its names.

A version directory of the registry holds `adapter.safetensors` and a
`manifest.json` whose fields are those of `AdapterRecord` (less the ones
that depend on where and by whom it is read: `path`, `fits_base`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from coordinator.errors import InvalidArgument
from gemma_core.lora_targets import TARGETS

FORMAT = "gemma-serve-lora/1"
TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_FORM = ("1 to 64 characters from letters, digits, '_', '.' and '-', "
             "starting with a letter or digit")
_ADAPTER_ID = re.compile(rf"({NAME_PATTERN.pattern})(?:@([1-9][0-9]{{0,8}}))?")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def shown(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to about `limit` characters, for echoing what a user
    sent in a message (status messages travel in a header: keep them short).
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = (f"{len(value)} characters" if isinstance(value, str) else
            f"{len(text)} digits" if isinstance(value, int) else f"{len(text)} in all")
    return f"{text[:limit]}... ({size})"


def check_name(field: str, value: object) -> str:
    """Returns `value` if it is a valid tenant or adapter name.

    Raises:
        InvalidArgument: naming `field` and the allowed form.
    """
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidArgument(field, f"{shown(value)} is not a valid {field}; use {NAME_FORM}.")
    return value


def parse_adapter_id(adapter_id: object) -> tuple[str, int | None] | None:
    """("name", None) for "name", ("name", N) for "name@N", None if malformed."""
    match = _ADAPTER_ID.fullmatch(adapter_id) if isinstance(adapter_id, str) else None
    if match is None:
        return None
    return match[1], None if match[2] is None else int(match[2])


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """What the registry knows about one adapter version.

    Attributes:
        tenant, name, version: where it lives; versions count 1, 2, 3...
        adapter_id: "name@version", what clients send.
        rank, alpha: the LoRA rank and scale numerator (update = alpha/rank * a @ b).
        targets: the adapted projections, among gemma_core.lora_targets.TARGETS.
        layers: indices of the adapted decoder blocks.
        base_fingerprint: the base model it was made for.
        sha256, size_bytes: of its `adapter.safetensors`.
        created: ISO-8601 UTC time of publishing.
        source: where it came from, e.g. "upload:lora.h5" or "finetune:<job id>".
        num_parameters: LoRA parameter count.
        path: its version directory.
        fits_base: False when base_fingerprint is not the server's base model;
            such an adapter is listed but cannot be loaded.
    """

    tenant: str
    name: str
    version: int
    adapter_id: str
    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    base_fingerprint: str
    sha256: str
    size_bytes: int
    created: str
    source: str
    num_parameters: int
    path: Path
    fits_base: bool = True

    def to_manifest(self) -> dict[str, Any]:
        """The manifest.json content."""
        return {"format": FORMAT, "tenant": self.tenant, "name": self.name,
                "version": self.version, "adapter_id": self.adapter_id, "rank": self.rank,
                "alpha": self.alpha, "targets": list(self.targets),
                "layers": list(self.layers), "base_fingerprint": self.base_fingerprint,
                "sha256": self.sha256, "size_bytes": self.size_bytes,
                "created": self.created, "source": self.source,
                "num_parameters": self.num_parameters}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], path: Path,
                      fits_base: bool = True) -> "AdapterRecord":
        """The record a manifest describes.

        Raises:
            ValueError: naming the first field that is missing or wrong.
        """
        if not isinstance(manifest, Mapping):
            raise ValueError("the manifest is not a JSON object")

        def field(key: str, kind: type | tuple[type, ...], valid=lambda value: True):
            value = manifest.get(key)
            if isinstance(value, bool) or not isinstance(value, kind) or not valid(value):
                raise ValueError(f"manifest field {key!r} is missing or invalid: {value!r}")
            return value

        field("format", str, lambda value: value == FORMAT)
        name = field("name", str, NAME_PATTERN.fullmatch)
        version = field("version", int, lambda value: value >= 1)
        return cls(
            tenant=field("tenant", str, NAME_PATTERN.fullmatch), name=name, version=version,
            adapter_id=field("adapter_id", str, lambda value: value == f"{name}@{version}"),
            rank=field("rank", int, lambda value: value >= 1),
            alpha=float(field("alpha", (int, float),
                              lambda value: math.isfinite(value) and value > 0)),
            targets=tuple(field("targets", list, lambda value: value and all(
                target in TARGETS for target in value))),
            layers=tuple(field("layers", list, lambda value: value and all(
                isinstance(block, int) and block >= 0 for block in value))),
            base_fingerprint=field("base_fingerprint", str),
            sha256=field("sha256", str, _SHA256.fullmatch),
            size_bytes=field("size_bytes", int, lambda value: value >= 0),
            created=field("created", str), source=field("source", str),
            num_parameters=field("num_parameters", int, lambda value: value >= 0),
            path=Path(path), fits_base=fits_base)


def read_version_dir(version_dir: Path) -> AdapterRecord:
    """The record of a registry version directory
    (`<tenant>/<name>/<version>/`), its files checked against each other.

    Raises:
        ValueError, OSError (a missing file): why it is not a whole, intact
            version.
    """
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
    return record
