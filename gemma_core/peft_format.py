"""PEFT LoRA adapter directories: `adapter_config.json` and
`adapter_model.safetensors`, as Hugging Face's PEFT writes them for Gemma
and Gemma 2 causal LMs.

Keys are `base_model.model.model.layers.<i>.<module>.lora_<A|B>.weight`,
<module> one of the seven projections (lora_targets.PEFT_MODULES); A is
(r, in) and B (out, r), the update `x @ A.T @ B.T * scale` with scale
lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`, r and alpha
taken per module from `rank_pattern` / `alpha_pattern` where one matches.
Here the pairs are held in PEFT's factor form on our axes (lora_targets):
a = A.T with the input axes split out, b = B.T with the output axes split
out. Anything that is not plain LoRA on those projections is refused,
naming the setting: computing it as plain LoRA would be silently wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np
import safetensors.numpy

from gemma_core import lora_targets
from gemma_core.errors import (AdapterMismatch, MalformedAdapter, PresetError,
                               UnsupportedAdapter)
from gemma_core.gemma_config import GemmaConfig
from gemma_core.safetensors_file import SafetensorsError, SafetensorsFile

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# PEFT prefixes a causal LM's keys with base_model.model.model.; a bare
# Gemma model (no LM head) has one `model.` less. Both reach the same layers.
_KEY = re.compile(r"^base_model\.model\.((?:model\.)?layers\.(0|[1-9][0-9]*)\."
                  r"(self_attn|mlp)\.([a-z_]+))\.lora_(A|B)\.weight$")
_EMBEDDINGS = ("embed_tokens", "lm_head")

# Settings that change what the adapter computes, with the value meaning
# "off" (anything else is refused, naming the setting).
_OFF = {"use_dora": False, "bias": "none", "lora_bias": False, "modules_to_save": None,
        "fan_in_fan_out": False, "use_qalora": False, "use_bdlora": None,
        "target_parameters": None, "trainable_token_indices": None,
        "layer_replication": None, "alora_invocation_tokens": None, "arrow_config": None,
        "kasa_config": None, "monteclora_config": None, "velora_config": None,
        "megatron_config": None}
# Settings that only say how the adapter was initialized or trained, or
# where it came from: they change nothing for a saved adapter.
_HARMLESS = {"base_model_name_or_path", "revision", "inference_mode", "lora_dropout",
             "peft_version", "megatron_core", "qalora_group_size", "layers_to_transform",
             "layers_pattern", "exclude_modules", "loftq_config", "eva_config",
             "corda_config", "lora_ga_config", "ensure_weight_tying", "runtime_config"}
_HANDLED = {"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern",
            "alpha_pattern", "task_type", "init_lora_weights", "auto_mapping"}
# Inits that leave the base weights alone; PiSSA, OLoRA, CorDA, LoftQ,
# LoRA-GA and MiCA change them, so their adapters need that changed base
# (saving with PEFT's path_initial_model_for_weight_conversion makes plain
# LoRA of them, and writes init_lora_weights = true).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_TASK_TYPES = (None, "CAUSAL_LM", "FEATURE_EXTRACTION")


@dataclasses.dataclass(frozen=True)
class PeftLora:
    """A PEFT LoRA adapter on our axes, in PEFT's factor form.

    Attributes:
        rank, alpha, use_rslora: PEFT's `r`, `lora_alpha`, `use_rslora`.
        kernels: (block, target) -> (a, b) float32; a pair's rank is its
            own (a.shape[-1]), r where no rank_pattern entry says otherwise.
        alphas: (block, target) -> alpha, for the pairs whose alpha is not
            `alpha` (what alpha_pattern said).
    """

    rank: int
    alpha: float
    use_rslora: bool
    kernels: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]
    alphas: Mapping[tuple[int, str], float]


def module_name(block: int, target: str) -> str:
    """The module's name in a Hugging Face causal LM, which is what PEFT
    matches rank_pattern / alpha_pattern keys against."""
    return f"model.layers.{block}.{lora_targets.PEFT_MODULES[target]}"


def pattern_value(patterns: Mapping[str, Any], name: str, default):
    """PEFT's rule: the first key `k` of `patterns` with `name` matching
    `(.*\\.)?(k)$` gives the value, else `default`."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


# ---- reading ---------------------------------------------------------------------


def read_peft(directory: str | os.PathLike, config: GemmaConfig) -> PeftLora:
    """Reads a PEFT LoRA directory written for a Gemma model of `config`.

    Raises:
        PresetError: a file missing or unreadable.
        UnsupportedAdapter: a setting other than plain LoRA on the seven
            projections (the message names it).
        MalformedAdapter: keys, element types or ranks that do not make
            LoRA pairs.
        AdapterMismatch: layers or shapes this base model does not have.

    Example:
    >>> lora = read_peft("my-adapter", backbone.config)
    """
    directory = pathlib.Path(directory)
    settings = _read_settings(directory)
    targets = _targets(settings, directory / CONFIG_FILE, config)
    rank, alpha = settings["r"], float(settings["lora_alpha"])
    kernels, alphas = {}, {}
    for (block, target, name), pair in sorted(_read_pairs(directory / WEIGHTS_FILE).items()):
        where = f"{directory / WEIGHTS_FILE}: {name}"
        if targets is not None and target not in targets:
            raise MalformedAdapter(f"{where} has LoRA factors, but target_modules "
                                   f"({settings['target_modules']!r}) does not name "
                                   f"{lora_targets.PEFT_MODULES[target]}.")
        if set(pair) != {"A", "B"}:
            raise MalformedAdapter(f"{where} has only lora_{''.join(pair)}; each adapted "
                                   "module needs lora_A and lora_B.")
        if (block, target) in kernels:
            raise MalformedAdapter(f"{where}: layer {block} {lora_targets.PEFT_MODULES[target]} "
                                   "has factors under two names.")
        if block >= config.num_layers:
            raise AdapterMismatch(f"{where}: layer {block} is out of range; the base model "
                                  f"has {config.num_layers} layers, so the adapter was made "
                                  "for another model.")
        pair_rank = pattern_value(settings["rank_pattern"], name, rank)
        kernels[(block, target)] = _our_pair(pair["A"], pair["B"], pair_rank, target, config,
                                             where)
        pair_alpha = float(pattern_value(settings["alpha_pattern"], name, alpha))
        if pair_alpha != alpha:
            alphas[(block, target)] = pair_alpha
    if not kernels:
        raise MalformedAdapter(f"{directory / WEIGHTS_FILE} holds no LoRA factors.")
    return PeftLora(rank=rank, alpha=alpha, use_rslora=bool(settings["use_rslora"]),
                    kernels=kernels, alphas=alphas)


def _read_settings(directory: pathlib.Path) -> dict[str, Any]:
    """adapter_config.json, checked: every setting plain LoRA needs is there
    and valid, and none asks for more."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise PresetError(f"{directory} is not a PEFT adapter directory: {CONFIG_FILE} is "
                          "missing.")
    try:
        settings = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PresetError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(settings, dict):
        raise PresetError(f"{path} is not a JSON object.")
    if settings.get("peft_type") != "LORA":
        raise UnsupportedAdapter(f"{path}: peft_type is {settings.get('peft_type')!r}; only "
                                 "PEFT's LORA adapters are supported.")
    for name, off in _OFF.items():
        value = settings.get(name, off)
        # null, false and empty all say "off" for a switch or a list.
        if value != off and not (off in (None, False) and value in (None, False, [], {})):
            raise UnsupportedAdapter(f"{path}: {name} is {value!r}; gemma_core computes plain "
                                     f"LoRA only ({name} must be {json.dumps(off)}).")
    unknown = sorted(name for name, value in settings.items()
                     if name not in _OFF and name not in _HARMLESS and name not in _HANDLED
                     and value not in (None, False, [], {}, "", 0))
    if unknown:
        raise UnsupportedAdapter(f"{path}: settings {unknown} are unknown to gemma_core, which "
                                 "computes plain LoRA only; a newer PEFT feature cannot be "
                                 "assumed to be off.")
    init = settings.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise UnsupportedAdapter(
            f"{path}: init_lora_weights is {init!r}, whose adapters only work on base weights "
            "PEFT changed when it made them; save it with PEFT's "
            "path_initial_model_for_weight_conversion to get plain LoRA.")
    if settings.get("task_type") not in _TASK_TYPES:
        raise UnsupportedAdapter(f"{path}: task_type is {settings['task_type']!r}; a Gemma "
                                 f"backbone serves {[t for t in _TASK_TYPES if t]} adapters.")
    base_class = (settings.get("auto_mapping") or {}).get("base_model_class")
    if base_class is not None and not str(base_class).startswith("Gemma"):
        raise UnsupportedAdapter(f"{path}: auto_mapping names base model class {base_class!r}; "
                                 "the adapter was made for another model type than Gemma.")
    rank, alpha = settings.get("r"), settings.get("lora_alpha")
    if type(rank) is not int or rank < 1:
        raise MalformedAdapter(f"{path}: r must be a positive integer, got {rank!r}.")
    if not _positive_number(alpha):
        raise MalformedAdapter(f"{path}: lora_alpha must be a positive number, got {alpha!r}.")
    if not isinstance(settings.get("use_rslora", False), bool):
        raise MalformedAdapter(f"{path}: use_rslora must be true or false.")
    settings.setdefault("use_rslora", False)
    for name, valid in (("rank_pattern", lambda v: type(v) is int and v > 0),
                        ("alpha_pattern", _positive_number)):
        patterns = settings.get(name) or {}
        if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
            raise MalformedAdapter(f"{path}: {name} must map module name patterns to positive "
                                   f"{'integers' if name == 'rank_pattern' else 'numbers'}, "
                                   f"got {patterns!r}.")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise MalformedAdapter(f"{path}: {name} key {pattern!r} is not a regular "
                                       f"expression ({error}).") from error
        settings[name] = patterns
    return settings


def _positive_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _targets(settings: dict, path: pathlib.Path, config: GemmaConfig) -> set[str] | None:
    """Our names of the projections target_modules names (None: not given,
    so the factors alone say). LoRA on the embedding or LM head, or on a
    module Gemma has not, is refused."""
    value = settings.get("target_modules")
    if value is None:
        return None
    if value == "all-linear":  # PEFT: every linear layer but the output head
        return set(lora_targets.TARGETS)
    if isinstance(value, str):  # a regular expression over full module names
        try:
            pattern = re.compile(value)
        except re.error as error:
            raise UnsupportedAdapter(f"{path}: target_modules {value!r} is not a regular "
                                     f"expression ({error}).") from error
        names = {module_name(block, target): target for block in range(config.num_layers)
                 for target in lora_targets.TARGETS}
        if any(pattern.fullmatch(name) for name in ("model.embed_tokens", "lm_head")):
            raise UnsupportedAdapter(f"{path}: target_modules {value!r} puts LoRA on the "
                                     "embedding (embed_tokens / lm_head), which gemma_core "
                                     "does not support.")
        return {target for name, target in names.items() if pattern.fullmatch(name)}
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedAdapter(f"{path}: target_modules must be a list of module names or a "
                               f"regular expression, got {value!r}.")
    targets = set()
    for entry in value:
        last = entry.rsplit(".", 1)[-1]
        if last in _EMBEDDINGS:
            raise UnsupportedAdapter(f"{path}: target_modules names {entry!r}: LoRA on the "
                                     "embedding (embed_tokens / lm_head) is not supported.")
        if last not in lora_targets.PEFT_NAMES:
            raise UnsupportedAdapter(f"{path}: target_modules names {entry!r}, not one of "
                                     f"Gemma's projections {list(lora_targets.PEFT_NAMES)}.")
        targets.add(lora_targets.PEFT_NAMES[last])
    return targets


def _read_pairs(path: pathlib.Path) -> dict[tuple[int, str, str], dict[str, np.ndarray]]:
    """(block, target, module name) -> {"A": ..., "B": ...} as stored."""
    if not path.is_file():
        if (path.parent / "adapter_model.bin").is_file():
            raise PresetError(f"{path.parent} holds adapter_model.bin (a pickle), which is not "
                              f"read; save the adapter with safetensors ({WEIGHTS_FILE}).")
        raise PresetError(f"{path.parent} is not a PEFT adapter directory: {WEIGHTS_FILE} is "
                          "missing.")
    try:
        handle = SafetensorsFile(path)
    except (SafetensorsError, OSError) as error:
        raise PresetError(f"{path} is not a readable safetensors file ({error}).") from error
    pairs: dict[tuple[int, str, str], dict[str, np.ndarray]] = {}
    try:
        for key in handle.keys():
            match = _KEY.match(key)
            if match is None:
                raise _unexpected_key(path, key)
            name, block, kind, module, factor = match.groups()
            target = lora_targets.PEFT_NAMES.get(module)
            if target is None or lora_targets.PEFT_MODULES[target] != f"{kind}.{module}":
                raise UnsupportedAdapter(f"{path}: {key} puts LoRA on {kind}.{module}, not one "
                                         "of Gemma's seven projections.")
            value = handle.read(key)
            if value.dtype.kind != "f" and value.dtype != ml_dtypes.bfloat16:
                raise MalformedAdapter(f"{path}: {key} holds {value.dtype} values; LoRA "
                                       "factors are floating point.")
            pairs.setdefault((int(block), target, name), {})[factor] = value
    except (SafetensorsError, OSError) as error:
        raise PresetError(f"{path} is not a readable safetensors file ({error}).") from error
    finally:
        handle.close()
    return pairs


def _unexpected_key(path: pathlib.Path, key: str) -> Exception:
    if any(part in key for part in _EMBEDDINGS):
        return UnsupportedAdapter(f"{path}: {key} is LoRA on (or a copy of) the embedding; "
                                  "gemma_core does not support LoRA on embed_tokens / lm_head.")
    if "lora_magnitude_vector" in key:
        return UnsupportedAdapter(f"{path}: {key} is a DoRA magnitude; DoRA (use_dora) is not "
                                  "supported.")
    if key.endswith(".bias"):
        return UnsupportedAdapter(f"{path}: {key} is a LoRA bias (lora_bias / bias), which is "
                                  "not supported.")
    return MalformedAdapter(f"{path}: unexpected tensor {key!r}; PEFT LoRA keys are "
                            "base_model.model.model.layers.<i>.<self_attn|mlp>.<module>."
                            "lora_<A|B>.weight, <i> without leading zeros.")


def _our_pair(A: np.ndarray, B: np.ndarray, rank: int, target: str, config: GemmaConfig,
              where: str) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (A, B) checked against `rank` and `config`, as our a and b."""
    inputs, outputs = lora_targets.peft_axes(config, target)
    want_a, want_b = (rank, math.prod(inputs)), (math.prod(outputs), rank)
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise MalformedAdapter(f"{where}: lora_A {A.shape} and lora_B {B.shape} do not make a "
                               "LoRA pair ((r, in) and (out, r)).")
    if A.shape[0] != rank:
        raise MalformedAdapter(f"{where}: the factors have rank {A.shape[0]} but the config "
                               f"says {rank} (r, or the rank_pattern entry that matches).")
    if A.shape != want_a or B.shape != want_b:
        raise AdapterMismatch(f"{where}: lora_A {A.shape} and lora_B {B.shape}, but this base "
                              f"model needs {want_a} and {want_b}; the adapter was made for "
                              "another model.")
    with np.errstate(over="ignore"):  # beyond float32: inf, which LoraAdapter refuses
        a = np.ascontiguousarray(A.astype("float32").T.reshape(inputs + (rank,)))
        b = np.ascontiguousarray(B.astype("float32").T.reshape((rank,) + outputs))
    return a, b


# ---- writing ---------------------------------------------------------------------


def from_adapter(adapter, config: GemmaConfig) -> PeftLora:
    """A LoraAdapter (fitting `config`) as PEFT holds it: per-head
    query/key/value pairs rewritten in PEFT's form at heads times their
    rank, with the alpha that keeps their scale; adapted projections the
    adapter leaves out in some blocks get zero pairs at its rank, so PEFT
    finds every factor it expects.

    Example:
    >>> write_peft("out/my-adapter", from_adapter(adapter, config))
    """
    kernels, alphas = {}, {}
    for key, (a, b) in adapter.kernels.items():
        alpha = float(adapter.alphas.get(key, adapter.alpha))
        if lora_targets.form_of(key[1], a) != lora_targets.PEFT_FORM \
                and key[1] in lora_targets.HEAD_TARGETS:
            scale = adapter.pair_scale(key)
            a, b = lora_targets.to_shared(a, b)
            rank = a.shape[-1]
            alpha = scale * (math.sqrt(rank) if adapter.use_rslora else rank)
        kernels[key] = (a, b)
        if alpha != adapter.alpha:
            alphas[key] = alpha
    for block in range(config.num_layers):
        for target in adapter.targets:
            if (block, target) not in kernels:
                kernels[(block, target)] = tuple(
                    np.zeros(shape, "float32") for shape in lora_targets.factor_shapes(
                        config, target, adapter.rank, lora_targets.PEFT_FORM))
    return PeftLora(rank=adapter.rank, alpha=float(adapter.alpha),
                    use_rslora=adapter.use_rslora, kernels=kernels, alphas=alphas)


def peft_files(lora: PeftLora, base_model_name_or_path: str | None = None) -> dict[str, bytes]:
    """`lora` as PEFT writes it for a Gemma causal LM: file name -> bytes
    (CONFIG_FILE and WEIGHTS_FILE), built in memory.

    Example:
    >>> files = peft_files(lora, base_model_name_or_path="google/gemma-2-2b")
    >>> sorted(files)
    ['adapter_config.json', 'adapter_model.safetensors']
    """
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for (block, target), (a, b) in sorted(lora.kernels.items()):
        name, rank = module_name(block, target), a.shape[-1]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(
            np.asarray(a, "float32").reshape(-1, rank).T)
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(
            np.asarray(b, "float32").reshape(rank, -1).T)
        # Full module names: each matches its own module only.
        if rank != lora.rank:
            rank_pattern[name] = int(rank)
        if (block, target) in lora.alphas:
            alpha_pattern[name] = float(lora.alphas[(block, target)])
    targets = {target for _, target in lora.kernels}
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora.rank), "lora_alpha": float(lora.alpha),
        "use_rslora": bool(lora.use_rslora),
        "target_modules": [lora_targets.PEFT_MODULES[t].split(".")[1]
                           for t in lora_targets.TARGETS if t in targets],
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "bias": "none", "lora_bias": False, "use_dora": False, "fan_in_fan_out": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "lora_dropout": 0.0, "init_lora_weights": True, "inference_mode": True,
        "revision": None,
    }
    return {CONFIG_FILE: (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode(),
            WEIGHTS_FILE: safetensors.numpy.save(tensors, metadata={"format": "pt"})}


def write_peft(directory: str | os.PathLike, lora: PeftLora,
               base_model_name_or_path: str | None = None) -> None:
    """Writes `peft_files` in `directory` (created if missing), each under a
    temporary name and renamed, so neither is ever seen half-written.

    Example:
    >>> write_peft("out/my-adapter", lora, base_model_name_or_path="google/gemma-2-2b")
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The weights first: a directory whose config is there is a whole one.
    for name, payload in sorted(peft_files(lora, base_model_name_or_path).items(),
                                key=lambda item: item[0] == CONFIG_FILE):
        _replace(directory / name, payload)


def _replace(path: pathlib.Path, payload: bytes) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    try:
        temporary.write_bytes(payload)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
