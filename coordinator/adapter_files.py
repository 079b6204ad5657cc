"""Adapter files in and out of the registry: keras_hub `.lora.h5`, PEFT
directories and this registry's own safetensors read and validated, the
export formats built.

Every way a file can be wrong becomes InvalidArgument (malformed) or
FailedPrecondition (made for another base model), with the server's own
paths kept out of the message.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import safetensors

from coordinator import peft_archive
from coordinator.adapter_record import FORMAT
from coordinator.errors import FailedPrecondition, InvalidArgument, is_storage_full
from gemma_core.errors import AdapterMismatch, PresetError, UnsupportedAdapter
from gemma_core.gemma_config import GemmaConfig
from gemma_core.lora_targets import KERAS_HUB_TARGETS
from gemma_core.lora_adapter import LoraAdapter, MalformedAdapter

IMPORT_FORMATS = ("lora.h5", "safetensors", "peft")
_REQUIRED_METADATA = ("rank", "alpha", "base_fingerprint")


def read_adapter_file(path: str | os.PathLike, fmt: str, base_config: GemmaConfig,
                      base_fingerprint: str) -> LoraAdapter:
    """Reads an adapter file of format `fmt` ("lora.h5": keras_hub's LoRA
    file, alpha = rank; "safetensors": the registry's own, with metadata;
    "peft": a PEFT adapter directory).

    Raises:
        InvalidArgument: an unknown format, a file that is not one, or a
            PEFT adapter with a setting gemma-serve does not compute.
        FailedPrecondition: a safetensors file made for another base model,
            or a lora.h5 file or PEFT adapter that does not fit this one.
    """
    if fmt == "lora.h5":
        return _read_lora_h5(Path(path), base_config)
    if fmt == "safetensors":
        return _read_safetensors(Path(path), base_fingerprint)
    if fmt == "peft":
        return _read_peft(Path(path), base_config)
    raise InvalidArgument("format", f"{fmt!r} is not an adapter file format; "
                                    f"use one of {list(IMPORT_FORMATS)}.")


def lora_h5_bytes(adapter: LoraAdapter, base_config: GemmaConfig) -> bytes:
    """`adapter` as the bytes of a keras_hub `.lora.h5` file (alpha/rank
    folded into b). Built in memory: an export needs no disk space and
    leaves no file behind, however the call that asked for it ends."""
    buffer = io.BytesIO()
    adapter.write_lora_file(buffer, base_config)
    return buffer.getvalue()


def _read_peft(directory: Path, base_config: GemmaConfig) -> LoraAdapter:
    try:
        return LoraAdapter.from_peft(directory, base_config)
    except UnsupportedAdapter as error:
        raise InvalidArgument("adapter", f"the PEFT adapter uses what gemma-serve does not "
                                         f"compute: {_hide(directory, error)}.") from error
    except MalformedAdapter as error:
        raise _not_valid("PEFT", directory, error) from error
    except AdapterMismatch as error:
        raise another_base(directory, error) from error
    except (PresetError, OSError, ValueError, TypeError) as error:
        if is_storage_full(error):
            raise
        raise _not_valid("PEFT", directory, error) from error


def export_file(adapter: LoraAdapter, fmt: str, base_config: GemmaConfig,
                stored: bytes, name: str) -> tuple[str, bytes]:
    """(file name, bytes) of `adapter` exported as `fmt`: "lora.h5",
    "safetensors" (`stored`, the registry's own file as it is) or "peft" (a
    tar archive of the PEFT directory, peft_archive), built in memory.

    Raises:
        FailedPrecondition: "lora.h5" for an adapter keras_hub files cannot
            hold (projections beyond query and value).
    """
    if fmt == "safetensors":
        return f"{name}.safetensors", stored
    if fmt == "peft":
        return f"{name}.peft.tar", peft_archive.pack(adapter.peft_files(base_config), name)
    if any(target not in KERAS_HUB_TARGETS for target in adapter.targets):
        raise FailedPrecondition(
            f"format: the adapter adapts {', '.join(adapter.targets)}; keras_hub .lora.h5 "
            "files hold query and value only. Export it as PEFT or safetensors instead.")
    return f"{name}.lora.h5", lora_h5_bytes(adapter, base_config)


def another_base(path: Path | None, error: object) -> FailedPrecondition:
    detail = _hide(path, error) if path else str(error).rstrip(".")
    return FailedPrecondition(f"adapter: it was made for another base model ({detail}).")


def _read_lora_h5(path: Path, base_config: GemmaConfig) -> LoraAdapter:
    try:
        return LoraAdapter.from_lora_file(path, base_config)
    except MalformedAdapter as error:
        raise _not_valid("lora.h5", path, error) from error
    except AdapterMismatch as error:
        raise another_base(path, error) from error
    except (PresetError, OSError, KeyError, ValueError, TypeError) as error:
        if is_storage_full(error):  # the server's disk, not the caller's file
            raise
        raise _not_valid("lora.h5", path, error) from error


def _read_safetensors(path: Path, base_fingerprint: str) -> LoraAdapter:
    try:
        with safetensors.safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as error:
        if is_storage_full(error):  # the server's disk, not the caller's file
            raise
        raise _not_valid("safetensors", path, error) from error
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise _not_valid("safetensors", path, f"its metadata lacks {missing}; "
                         f"adapter files carry {list(_REQUIRED_METADATA)}")
    if metadata.get("format", FORMAT) != FORMAT:
        raise _not_valid("safetensors", path, f"its format is {metadata['format']!r}, "
                         f"not {FORMAT!r}")
    if metadata["base_fingerprint"] != base_fingerprint:
        raise FailedPrecondition(
            f"adapter: it was made for base model {metadata['base_fingerprint']!r} but "
            f"this server runs base model {base_fingerprint!r}; import an adapter "
            "made for this base model.")
    try:
        return LoraAdapter.from_tensors(tensors, metadata)
    except ValueError as error:  # AdapterMismatch included: malformed factors
        raise _not_valid("safetensors", path, error) from error


def payload_metadata(payload: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file held in memory (the
    registry reads a stored adapter whole, to check its checksum first)."""
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + size]).get("__metadata__") or {}


def _hide(path: Path, error: object) -> str:
    """The error's text without the server-side file path or a final period
    (files in a directory keep their own names)."""
    text = str(error).removeprefix(f"{os.fspath(path)}: ")
    text = text.replace(f"{os.fspath(path)}/", "")
    return text.replace(os.fspath(path), "it").rstrip(".")


def _not_valid(fmt: str, path: Path, error: object) -> InvalidArgument:
    return InvalidArgument("adapter", f"the file is not a valid {fmt} LoRA file: "
                                      f"{_hide(path, error)}.")
