"""Hugging Face Gemma checkpoints: config.json plus safetensors weights."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from gemma_core.errors import PresetError
from gemma_core.safetensors_file import SafetensorsError, SafetensorsFile

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.model"
SUPPORTED_MODEL_TYPES = ("gemma", "gemma2")

# Buffers some exports carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_checkpoint(directory: pathlib.Path) -> bool:
    config = directory / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _field(config: dict, name: str, path: pathlib.Path):
    if name not in config:
        raise PresetError(f"{path} lacks '{name}', needed for a "
                          f"{config.get('model_type')} checkpoint.")
    return config[name]


def read_config(directory: pathlib.Path) -> tuple[str, str, dict[str, Any]]:
    """Returns (model_type, our class name, GemmaBackbone kwargs)."""
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"{path} is not valid JSON ({error}).") from error
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PresetError(f"{path} has model_type {model_type!r}; only "
                          f"{SUPPORTED_MODEL_TYPES} checkpoints are supported.")
    if config.get("tie_word_embeddings") is False:
        raise PresetError(f"{path} has untied word embeddings; Gemma ties them "
                          "and this backbone cannot represent a separate head.")
    get = lambda name: _field(config, name, path)  # noqa: E731
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    kwargs = {
        "vocabulary_size": get("vocab_size"),
        "num_layers": get("num_hidden_layers"),
        "num_query_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads", heads),
        "hidden_dim": hidden,
        "intermediate_dim": 2 * get("intermediate_size"),
        "head_dim": head_dim,
        "layer_norm_epsilon": config.get("rms_norm_eps", 1e-6),
        "dtype": _dtype_policy(config.get("dtype") or config.get("torch_dtype")),
    }
    if model_type == "gemma2":
        window = config.get("sliding_window")
        layer_types = config.get("layer_types")
        if layer_types is not None:
            alternating = ["sliding_attention" if i % 2 == 0 else "full_attention"
                           for i in range(len(layer_types))]
            if window is not None and list(layer_types) != alternating:
                raise PresetError(f"{path}: layer_types {layer_types} differ from "
                                  "Gemma 2's alternation (even layers sliding), "
                                  "which is the only one supported.")
        scalar = config.get("query_pre_attn_scalar", head_dim)
        if scalar not in (head_dim, hidden // heads):
            raise PresetError(f"{path}: query_pre_attn_scalar {scalar} is neither head_dim "
                              f"({head_dim}) nor hidden_size / num_attention_heads "
                              f"({hidden // heads}), the two scalings Gemma supports.")
        kwargs.update(
            query_head_dim_normalize=scalar == head_dim,
            use_post_attention_norm=True,
            use_post_ffw_norm=True,
            attention_logit_soft_cap=config.get("attn_logit_softcapping"),
            final_logit_soft_cap=config.get("final_logit_softcapping"),
            use_sliding_window_attention=window is not None,
            sliding_window_size=window or 4096,
        )
    return model_type, "GemmaBackbone", kwargs


def _dtype_policy(name: str | None) -> str:
    return {"bfloat16": "bfloat16", "float16": "float16"}.get(name or "", "float32")


class HuggingFaceWeights:
    """Reads tensors by name (without the `model.` prefix) from safetensors."""

    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise PresetError(f"{index} is not a valid safetensors index "
                                  f"({error!r}).") from error
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise PresetError(f"No weights in {directory}: expected {SINGLE_FILE} "
                              f"or {INDEX_FILE}. Pass load_weights=False to build "
                              "the architecture with random weights.")
        # Plain reads, not safetensors' mmap: see safetensors_file.
        self._handles: dict[str, SafetensorsFile] = {}
        self._location: dict[str, tuple[str, str]] = {}
        try:
            for name in files:
                path = directory / name
                if not path.is_file():
                    raise PresetError(f"Weight shard {path} named in {INDEX_FILE} is missing.")
                try:
                    handle = SafetensorsFile(path)
                except (SafetensorsError, OSError) as error:
                    raise _unreadable(path, error) from error
                self._handles[name] = handle
                for key in handle.keys():
                    if key.endswith(_IGNORED_SUFFIXES) or key == "lm_head.weight":
                        continue
                    self._location[key.removeprefix("model.")] = (name, key)
        except BaseException:
            self.close()  # The shards opened so far.
            raise

    def names(self) -> set[str]:
        return set(self._location)

    def read(self, name: str) -> np.ndarray:
        if name not in self._location:
            raise PresetError(f"Tensor '{name}' is missing from the safetensors "
                              f"files in {self.directory}.")
        file, key = self._location[name]
        handle = self._handles[file]
        try:
            return handle.read(key)
        except (SafetensorsError, OSError) as error:
            raise _unreadable(handle.path, error) from error

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _unreadable(path: pathlib.Path, error: Exception) -> PresetError:
    return PresetError(f"{path} is not a readable safetensors file ({error}).")
