"""keras_hub preset directories: config.json, metadata.json, weights in h5.

The h5 layout (each tensor at `<group>/vars/0`, bf16 stored as 2-byte void
with a `dtype` attribute, optional sharding through `model.weights.json`)
is Keras' own, written here tensor by tensor so that a preset of any size
is read and written without a second copy of the weights in memory.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Iterable

import h5py
import keras
import ml_dtypes
import numpy as np

from gemma_core.errors import PresetError

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
WEIGHTS_FILE = "model.weights.h5"
SHARDED_WEIGHTS_INDEX = "model.weights.json"
TOKENIZER_CONFIG_FILE = "tokenizer.json"
TOKENIZER_ASSET = pathlib.Path("assets", "tokenizer", "vocabulary.spm")

# The keras_hub version whose file format we write and test against.
KERAS_HUB_FORMAT_VERSION = "0.32.0"


def is_keras_hub_preset(directory: pathlib.Path) -> bool:
    config = directory / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "class_name" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # Claimed by its shape; read_config reports the damage.


def read_config(directory: pathlib.Path) -> tuple[str, dict[str, Any]]:
    """Returns (class name, constructor kwargs) from a preset's config.json."""
    path = directory / CONFIG_FILE
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"{path} is not valid JSON ({error}); re-download or "
                          "re-save the preset.") from error
    if not isinstance(document, dict) or not isinstance(document.get("config"), dict):
        raise PresetError(f"{path} has no 'config' object; it does not look like "
                          "a keras_hub preset config.")
    registered = document.get("registered_name") or document.get("class_name", "")
    class_name = str(registered).split(">")[-1]
    kwargs = dict(document["config"])
    dtype = kwargs.get("dtype")
    if isinstance(dtype, dict):  # A serialized DTypePolicy: keep its name.
        kwargs["dtype"] = dtype.get("config", {}).get("name", "float32")
    return class_name, kwargs


class KerasHubWeights:
    """Reads tensors by h5 group from a single or sharded weights file."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index = directory / SHARDED_WEIGHTS_INDEX
        single = directory / WEIGHTS_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise PresetError(f"{index} is not a valid sharded-weights index "
                                  f"({error!r}).") from error
            self._file_of = {k.strip("/").removesuffix("/vars"): v
                             for k, v in weight_map.items()}
        elif single.is_file():
            self._file_of = None
        else:
            raise PresetError(
                f"No weights in {directory}: expected {WEIGHTS_FILE} or "
                f"{SHARDED_WEIGHTS_INDEX}. Pass load_weights=False to build the "
                "architecture with random weights.")
        self._open: dict[str, h5py.File] = {}

    def _file(self, name: str) -> h5py.File:
        if name not in self._open:
            path = self.directory / name
            if not path.is_file():
                raise PresetError(f"Weight shard {path} is missing.")
            try:
                self._open[name] = h5py.File(path, "r")
            except OSError as error:
                raise PresetError(f"{path} is not a readable h5 file ({error}).") from error
        return self._open[name]

    def _files_for(self, group: str) -> list[str]:
        if self._file_of is None:
            return [WEIGHTS_FILE]
        if group in self._file_of:
            return [self._file_of[group]]
        return sorted(set(self._file_of.values()))

    def groups(self) -> set[str]:
        """Every group that holds a tensor (`<group>/vars/0`)."""
        names = [WEIGHTS_FILE] if self._file_of is None else sorted(set(self._file_of.values()))
        found = set()
        for name in names:
            def visit(key, obj):
                if isinstance(obj, h5py.Dataset) and key.endswith("/vars/0"):
                    found.add(key[: -len("/vars/0")])
            self._file(name).visititems(visit)
        return found

    def read(self, group: str) -> np.ndarray:
        for name in self._files_for(group):
            dataset = self._file(name).get(f"{group}/vars/0")
            if dataset is not None:
                value = dataset[()]
                if dataset.attrs.get("dtype") == "bfloat16":
                    value = value.view(ml_dtypes.bfloat16)
                return np.asarray(value)
        raise PresetError(f"Weight '{group}' is missing from the weights in "
                          f"{self.directory}.")

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def _write_tensor(group: h5py.Group, value: np.ndarray) -> None:
    if value.dtype == ml_dtypes.bfloat16:
        dataset = group.create_dataset("0", data=value.view("V2"))
        dataset.attrs["dtype"] = "bfloat16"
    else:
        group.create_dataset("0", data=value)


def write_weights(directory: pathlib.Path, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_size: float | None = None) -> None:
    """Writes `(group, array)` pairs, one at a time, as keras_hub would.

    Args:
        max_shard_size: in GB (as Keras counts it, 1024**3 bytes); above it
            the weights go to `model_NNNNN.weights.h5` files plus an index.
    """
    if max_shard_size is None:
        with h5py.File(directory / WEIGHTS_FILE, "w") as handle:
            for group, value in tensors:
                _write_tensor(handle.require_group(f"{group}/vars"), value)
        return
    limit = float(max_shard_size) * 1024**3
    weight_map: dict[str, str] = {}
    total, shard_bytes, shard_index, handle = 0, 0, 0, None
    try:
        for group, value in tensors:
            if handle is None or (shard_bytes and shard_bytes + value.nbytes > limit):
                if handle is not None:
                    handle.close()
                    shard_index += 1
                handle = h5py.File(directory / f"model_{shard_index:05d}.weights.h5", "w")
                shard_bytes = 0
            _write_tensor(handle.require_group(f"{group}/vars"), value)
            weight_map[f"/{group}/vars"] = f"model_{shard_index:05d}.weights.h5"
            shard_bytes += value.nbytes
            total += value.nbytes
    finally:
        if handle is not None:
            handle.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SHARDED_WEIGHTS_INDEX).write_text(json.dumps(index, indent=4))


def write_config(directory: pathlib.Path, class_name: str, module: str,
                 config: dict[str, Any], parameter_count: int) -> None:
    document = {"module": module, "class_name": class_name, "config": config,
                "registered_name": f"keras_hub>{class_name}"}
    (directory / CONFIG_FILE).write_text(json.dumps(document, indent=4))
    metadata = {
        "keras_version": keras.__version__,
        "keras_hub_version": KERAS_HUB_FORMAT_VERSION,
        "parameter_count": parameter_count,
        "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        "tasks": [],
        "saved_by": "gemma_core",
    }
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=4))

