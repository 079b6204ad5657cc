"""`Backbone`: the base of our models, with keras_hub's preset interface."""

from __future__ import annotations

import contextlib
import hashlib
import json
import contextvars
import os
import pathlib
from typing import Any, ClassVar

import keras
import ml_dtypes
import numpy as np

from gemma_core import hf_format, keras_hub_format
from gemma_core.errors import PresetError
from gemma_core.preset_source import resolve_preset


_WEIGHTS_WILL_BE_LOADED = contextvars.ContextVar("weights_will_be_loaded", default=False)


def weights_will_be_loaded() -> bool:
    """True while `from_preset` builds a model whose every weight it will
    overwrite: subclasses then initialize with zeros, which is nearly free,
    instead of drawing billions of random numbers to throw away."""
    return _WEIGHTS_WILL_BE_LOADED.get()


@contextlib.contextmanager
def _loading_weights(enabled: bool):
    token = _WEIGHTS_WILL_BE_LOADED.set(enabled)
    try:
        yield
    finally:
        _WEIGHTS_WILL_BE_LOADED.reset(token)


def _read_preset_config(directory: pathlib.Path) -> tuple[str, dict[str, Any], str | None]:
    """(class name, constructor kwargs, Hugging Face model_type or None)."""
    if keras_hub_format.is_keras_hub_preset(directory):
        class_name, config = keras_hub_format.read_config(directory)
        return class_name, config, None
    if hf_format.is_hf_checkpoint(directory):
        model_type, class_name, config = hf_format.read_config(directory)
        return class_name, config, model_type
    raise PresetError(
        f"{directory} is neither a keras_hub preset (config.json with "
        "'class_name') nor a Hugging Face checkpoint (config.json with "
        "'model_type').")


def read_preset_config(preset: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(class name, constructor kwargs) of a preset, without building it.

    Resolves (and if needed downloads) the preset like `from_preset`. Used to
    plan a layout before the weights are loaded into it.
    """
    class_name, config, _ = _read_preset_config(resolve_preset(preset))
    return class_name, config


class Backbone(keras.Model):
    """A keras Functional model that loads and saves presets.

    Subclasses register themselves by class name, so
    `Backbone.from_preset(...)` returns whichever subclass the preset's
    config names. A subclass provides `presets` and `weight_names` (the
    module mapping its variable paths to checkpoint tensor names).
    """

    presets: ClassVar[dict[str, dict]] = {}
    _subclasses: ClassVar[dict[str, type["Backbone"]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Backbone._subclasses[cls.__name__] = cls

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "trainable": self.trainable,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Backbone":
        config = dict(config)
        if isinstance(config.get("dtype"), dict):
            config["dtype"] = keras.dtype_policies.deserialize(config["dtype"])
        return cls(**config)

    def fingerprint(self) -> str:
        """A short hash naming these weights: adapters record the base model
        they were made for, and a server refuses one made for another.

        Hashes the architecture and, per weight (LoRA excluded), its path,
        shape and 64 values spread over it: cheap for any size, different
        for any other checkpoint, equal across dtypes of the same weights
        within float32 rounding of bfloat16 values (they are cast to
        bfloat16 before hashing).
        """
        digest = hashlib.sha256()
        architecture = {k: v for k, v in self.get_config().items()
                        if k not in ("name", "trainable", "dtype")}
        digest.update(json.dumps(architecture, sort_keys=True).encode())
        for variable in self.variables:
            # LoRA is not the base; dropout's seed state is random per process.
            if "lora_kernel" in variable.path or "seed_generator" in variable.path:
                continue
            flat = keras.ops.reshape(variable.value, (-1,))
            positions = np.linspace(0, flat.shape[0] - 1, 64).astype("int64")
            sample = np.asarray(keras.ops.take(flat, positions), "float32")
            digest.update(f"{variable.path}{tuple(variable.shape)}".encode())
            digest.update(sample.astype(ml_dtypes.bfloat16).tobytes())
        return digest.hexdigest()[:16]

    # ---- presets --------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, load_weights: bool = True,
                    **kwargs) -> "Backbone":
        """Builds a backbone from a preset, with its weights unless told not to.

        Args:
            preset: a built-in name (see `presets`), `kaggle://...`,
                `hf://org/repo`, or a local keras_hub or Hugging Face
                directory.
            load_weights: False builds the architecture with random weights.
            **kwargs: override config entries, e.g. `dtype="bfloat16"`.

        Example:
        >>> backbone = Backbone.from_preset("tests/fixtures/gemma1_tiny")
        >>> type(backbone).__name__
        'GemmaBackbone'
        """
        directory = resolve_preset(preset)
        class_name, config, model_type = _read_preset_config(directory)
        target = cls._subclass_for(class_name, directory)
        config.update(kwargs)
        try:
            with _loading_weights(load_weights):
                backbone = target.from_config(config)
        except (TypeError, ValueError) as error:
            raise PresetError(f"The config in {directory} does not build a "
                              f"{class_name}: {error}") from error
        if load_weights:
            if model_type is None:
                backbone._load_keras_hub_weights(directory)
            else:
                backbone._load_hf_weights(directory, model_type)
        return backbone

    @classmethod
    def _subclass_for(cls, class_name: str, directory) -> type["Backbone"]:
        target = Backbone._subclasses.get(class_name)
        if target is None:
            raise PresetError(f"{directory} holds a {class_name!r}; known backbones: "
                              f"{sorted(Backbone._subclasses)}.")
        if not issubclass(target, cls):
            raise PresetError(f"{directory} holds a {class_name}, not a {cls.__name__}; "
                              f"use Backbone.from_preset or {class_name}.from_preset.")
        return target

    def _assign(self, variable, value: np.ndarray, source: str) -> None:
        if tuple(value.shape) != tuple(variable.shape):
            raise PresetError(
                f"Weight {variable.path} has shape {tuple(value.shape)} in {source} "
                f"but the config asks for {tuple(variable.shape)}; the config and "
                "weights do not belong together.")
        # One tensor at a time, cast on the host in its own dtype: never a
        # second full copy of the model, and bf16 stays bf16.
        variable.assign(value.astype(variable.dtype, copy=False))

    def _load_keras_hub_weights(self, directory: pathlib.Path) -> None:
        weights = keras_hub_format.KerasHubWeights(directory)
        try:
            expected = {}
            for variable in self.weights:
                group = self.weight_names.keras_hub_group(variable.path)
                expected[group] = variable
                self._assign(variable, weights.read(group), str(directory))
            extra = weights.groups() - set(expected)
            if extra:
                raise PresetError(f"{directory} holds weights this config has no "
                                  f"place for: {sorted(extra)[:5]}; the config and "
                                  "weights do not belong together.")
        finally:
            weights.close()

    def _load_hf_weights(self, directory: pathlib.Path, model_type: str) -> None:
        weights = hf_format.HuggingFaceWeights(directory)
        try:
            used = set()
            for variable in self.weights:
                name, transform = self.weight_names.hf_tensor(variable.path, model_type)
                value = weights.read(name)
                if value.size != int(np.prod(variable.shape)):
                    raise PresetError(
                        f"Tensor {name} has shape {tuple(value.shape)} in {directory} "
                        f"but the config asks for {tuple(variable.shape)} "
                        f"({variable.path}).")
                self._assign(variable, transform(value, tuple(variable.shape)), str(directory))
                used.add(name)
            extra = weights.names() - used
            if extra:
                raise PresetError(f"{directory} holds tensors this config has no "
                                  f"place for: {sorted(extra)[:5]}.")
        finally:
            weights.close()

    def save_to_preset(self, preset_dir: str | os.PathLike,
                       max_shard_size: float | None = None) -> None:
        """Writes a keras_hub preset (config, metadata, weights) keras_hub loads.

        Args:
            preset_dir: created if missing.
            max_shard_size: in GB; above it weights are sharded into
                `model_NNNNN.weights.h5` files with a `model.weights.json` index.
        """
        directory = pathlib.Path(preset_dir)
        directory.mkdir(parents=True, exist_ok=True)
        cls = type(self)
        keras_hub_format.write_config(
            directory, cls.__name__, self.keras_hub_module, self.get_config(),
            self.count_params())
        tensors = ((self.weight_names.keras_hub_group(v.path), keras.ops.convert_to_numpy(v.value))
                   for v in self.weights if "lora_kernel" not in v.path)
        keras_hub_format.write_weights(directory, tensors, max_shard_size)
