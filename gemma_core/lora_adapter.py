"""A LoRA adapter as plain arrays: what the registry stores and workers load.

An adapter holds rank-r factors (a, b) for some of the seven projections
(lora_targets) of some blocks, each adding `scale * a @ b` to its kernel,
scale = alpha / r (alpha / sqrt(r) with rsLoRA), independent of any model
instance: it can be checked against a config, converted between formats,
sent to a worker and written into an adapter slot. keras_hub adapts query
and value with per-head factors; PEFT adapters may adapt all seven, with
their own factor form for query, key and value and a rank and alpha per
module. The registry's safetensors, the served adapter slots and the
trainer hold any of them; keras_hub `.lora.h5` files hold only "keras_hub
form" (query and value, per-head factors, one rank and alpha), and
`as_keras_hub` rewrites what can be rewritten into it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import BinaryIO, Mapping

import ml_dtypes
import numpy as np

from gemma_core import gemma_lora, lora_model, lora_targets, peft_format
from gemma_core.errors import AdapterMismatch, MalformedAdapter, PresetError
from gemma_core.gemma_config import GemmaConfig
from gemma_core.lora_targets import HEAD_TARGETS, KERAS_HUB_FORM, PEFT_FORM, form_of

# (block index, target) -> (a, b); see lora_targets for the shapes.
Kernels = Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]

# The largest magnitude allowed for an entry of a, of scale * b and of the
# update scale * a @ b; trained updates are around 1e-2. A projection's
# input is RMS-normalized (or, for the output projections, computed from
# such an input in the same block), so each entry of x @ a and of the LoRA output is at most
# hidden_dim * (1 + the norm's largest scale) times this: about 5e7 times
# that scale for the largest presets. Attention mixes such values, the
# output projection sums a few thousand into the residual stream, and every
# block normalizes its input again, so hidden states (and the squares the
# norms take) stay many orders of magnitude below float32's and bfloat16's
# 3.4e38. A factor or alpha of 3e38 overflows at once.
MAX_LORA_MAGNITUDE = 1e4

# The (a, b) dimensionalities each target accepts, per form.
_NDIMS = {target: {KERAS_HUB_FORM: (3, 2), PEFT_FORM: (2, 3)} if target in HEAD_TARGETS
          else {KERAS_HUB_FORM: (3, 2) if target == "attention_output" else (2, 2)}
          for target in lora_targets.TARGETS}
_SHAPES_TEXT = {"query": "(heads, d, r) and (r, head_dim), or PEFT's (d, r) and "
                         "(r, heads, head_dim)",
                "attention_output": "(heads, head_dim, r) and (r, d)"}


def _is_index(text: str) -> bool:
    """A block index as `tensor_name` writes it: ASCII digits, no leading zero
    (so no two names can mean the same block)."""
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def tensor_name(block: int, target: str, factor: str) -> str:
    """The adapter's safetensors key, e.g. `blocks.3.query.lora_a`."""
    return f"blocks.{block}.{target}.lora_{factor}"


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """LoRA factors for some projections of some blocks of a backbone.

    Attributes:
        rank: r, the inner size of every pair not in `ranks`.
        alpha: every pair not in `alphas` is scaled by `alpha / rank`
            (keras_hub: alpha = r), or `alpha / sqrt(rank)` with rsLoRA.
        kernels: (block, target) -> (a, b), float32, target one of
            lora_targets.TARGETS. Query/key/value pairs are in keras_hub's
            per-head form (a (heads, d, r), b (r, head_dim)) or PEFT's (a
            (d, r), b (r, heads, head_dim)); the others are a (*in, r) and
            b (r, *out) (lora_targets.factor_shapes). Blocks or targets
            absent from the map are not adapted.
        ranks: (block, target) -> rank for pairs of another rank than
            `rank` (PEFT's rank_pattern).
        alphas: (block, target) -> alpha for pairs scaled by another alpha
            (PEFT's alpha_pattern).
        use_rslora: scale by alpha / sqrt(rank) instead of alpha / rank.

    Example:
    >>> adapter = LoraAdapter.from_backbone(lora_enabled_backbone)
    >>> adapter.check_fits(backbone.config)
    """

    rank: int
    alpha: float
    kernels: Kernels
    ranks: Mapping[tuple[int, str], int] = dataclasses.field(default_factory=dict)
    alphas: Mapping[tuple[int, str], float] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if not _positive_int(self.rank):
            raise MalformedAdapter(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise MalformedAdapter(f"LoRA alpha must be a positive number, got {self.alpha!r}.")
        if not self.kernels:
            raise MalformedAdapter("the adapter has no LoRA kernels.")
        if not isinstance(self.use_rslora, bool):
            raise MalformedAdapter(f"use_rslora must be True or False, got {self.use_rslora!r}.")
        for name, valid, what in (("ranks", _positive_int, "a positive integer"),
                                  ("alphas", lambda v: np.isfinite(v) and v > 0,
                                   "a positive number")):
            values = dict(getattr(self, name))
            for key, value in values.items():
                if key not in self.kernels or not valid(value):
                    raise MalformedAdapter(f"{name}[{key!r}] = {value!r}: it must be {what}, "
                                           "for a pair the adapter has.")
            # A copy, so later changes to the caller's map cannot bypass these
            # checks (a plain dict: adapters are pickled to workers).
            object.__setattr__(self, name, values)
        for (block, target), (a, b) in self.kernels.items():
            if target not in lora_targets.TARGETS:
                raise MalformedAdapter(f"LoRA target {target!r} of block {block} is not one "
                                       f"of {lora_targets.TARGETS}.")
            rank = self.pair_rank((block, target))
            if (a.ndim, b.ndim) not in _NDIMS[target].values() or a.shape[-1] != rank \
                    or b.shape[0] != rank:
                shapes = _SHAPES_TEXT.get("query" if target in HEAD_TARGETS else target,
                                          "(in, r) and (r, out)")
                raise MalformedAdapter(
                    f"block {block} {target}: factors of shapes {a.shape} and {b.shape} do "
                    f"not make a rank-{rank} pair ({shapes}).")
            for factor in (a, b):
                if not np.all(np.isfinite(factor)):
                    raise MalformedAdapter(f"block {block} {target}: the factors hold NaN or "
                                           "infinite values.")
            self._check_magnitude(block, target, a, b)

    def _check_magnitude(self, block: int, target: str, a: np.ndarray, b: np.ndarray) -> None:
        """Refuses factors that could overflow the served model (see
        MAX_LORA_MAGNITUDE). Every entry of scale * a @ b is at most
        scale * sum_k max|a[..., k]| * max|b[k, ...]|, an upper bound that
        needs no product formed; in float64, so it cannot overflow itself."""
        a_max = np.max(np.abs(a), axis=tuple(range(a.ndim - 1)), initial=0).astype("float64")
        b_max = (np.max(np.abs(b), axis=tuple(range(1, b.ndim)), initial=0).astype("float64")
                 * self.pair_scale((block, target)))
        for what, value in (("an entry of lora_a is {:.3g}", a_max.max(initial=0.0)),
                            ("an entry of (alpha / rank) * lora_b is {:.3g}",
                             b_max.max(initial=0.0)),
                            ("the update (alpha / rank) * a @ b may reach {:.3g}",
                             float(np.sum(a_max * b_max)))):
            if value > MAX_LORA_MAGNITUDE:
                raise MalformedAdapter(
                    f"block {block} {target}: {what.format(value)} in magnitude, above the "
                    f"limit of {MAX_LORA_MAGNITUDE:g} (trained LoRA updates are around "
                    "1e-2): values this large overflow the model. Check the factors and "
                    "alpha.")

    @property
    def scale(self) -> float:
        """The scale of every pair not in `ranks` or `alphas`."""
        if self.use_rslora:
            return float(self.alpha) / math.sqrt(self.rank)
        return float(self.alpha) / self.rank

    def pair_rank(self, key: tuple[int, str]) -> int:
        return int(self.ranks.get(key, self.rank))

    def pair_scale(self, key: tuple[int, str]) -> float:
        """The factor on pair `key`'s `a @ b`."""
        rank, alpha = self.pair_rank(key), float(self.alphas.get(key, self.alpha))
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)

    @property
    def largest_rank(self) -> int:
        """The largest rank of any pair (what an adapter slot must hold)."""
        return max(self.pair_rank(key) for key in self.kernels)

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in lora_targets.TARGETS
                     if any(target == t for _, target in self.kernels))

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(sorted({block for block, _ in self.kernels}))

    def num_parameters(self) -> int:
        return sum(a.size + b.size for a, b in self.kernels.values())

    def _not_keras_hub_form(self) -> str | None:
        """Why keras_hub `.lora.h5` files cannot hold this adapter as it is,
        or None if they can."""
        others = [t for t in self.targets if t not in gemma_lora.LORA_TARGETS]
        if others:
            return (f"it adapts {', '.join(others)}; keras_hub LoRA files hold query and "
                    "value only (write it as PEFT with write_peft)")
        if any(form_of(t, a) == PEFT_FORM for (_, t), (a, _) in self.kernels.items()):
            return ("its query/value factors are in PEFT's form (one a for all heads); "
                    "as_keras_hub() rewrites them in keras_hub's per-head form")
        if self.ranks or self.alphas or self.use_rslora:
            return ("it has a rank or alpha per module, or rsLoRA scaling; as_keras_hub() "
                    "folds them into one rank")
        return None

    def check_fits(self, config: GemmaConfig, keras_hub_form: bool = False) -> None:
        """Raises AdapterMismatch unless every pair fits `config`'s shapes
        and, with `keras_hub_form`, the adapter is in keras_hub form (module
        docstring), all that a `.lora.h5` file holds.

        Example:
        >>> adapter.check_fits(config)
        """
        for (block, target), (a, b) in sorted(self.kernels.items()):
            if not 0 <= block < config.num_layers:
                raise AdapterMismatch(
                    f"the adapter adapts block {block} but the base model has "
                    f"{config.num_layers} blocks; it was made for another model.")
            want_a, want_b = lora_targets.factor_shapes(
                config, target, self.pair_rank((block, target)), form_of(target, a))
            if a.shape != want_a or b.shape != want_b:
                raise AdapterMismatch(
                    f"block {block} {target}: the adapter's factors are {a.shape} and "
                    f"{b.shape} but this base model needs {want_a} and {want_b}; it was "
                    "made for another model.")
        problem = self._not_keras_hub_form() if keras_hub_form else None
        if problem:
            raise AdapterMismatch(f"the adapter is not in keras_hub's LoRA form: {problem}.")

    @classmethod
    def random(cls, config: GemmaConfig, rank: int, alpha: float | None = None,
               seed: int = 0, std: float = 0.2, targets=gemma_lora.LORA_TARGETS,
               blocks=None, b_std: float | None = None,
               form: str = KERAS_HUB_FORM) -> "LoraAdapter":
        """An adapter with random factors (b too, so it changes outputs):
        for tests, benchmarks and load generators, not for training (a
        trained adapter starts with b = 0). a ~ N(0, std^2), b ~ N(0,
        b_std^2) (b_std defaults to std); `targets` in our names or PEFT's,
        query/key/value factors in `form`.

        Example:
        >>> adapter = LoraAdapter.random(backbone.config, rank=8, seed=1)
        """
        rng = np.random.default_rng(seed)
        kernels = {}
        for block in (range(config.num_layers) if blocks is None else blocks):
            for target in map(lora_targets.canonical_target, targets):
                a_shape, b_shape = lora_targets.factor_shapes(config, target, rank, form)
                kernels[(block, target)] = (
                    rng.normal(0, std, a_shape).astype("float32"),
                    rng.normal(0, std if b_std is None else b_std, b_shape).astype("float32"))
        return cls(rank=rank, alpha=float(rank if alpha is None else alpha), kernels=kernels)

    # ---- the registry's safetensors ----------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        """Flat name -> float32 array map, for safetensors; with `metadata()`
        it is the whole adapter (each pair's rank and form are its shapes)."""
        out = {}
        for (block, target), (a, b) in sorted(self.kernels.items()):
            out[tensor_name(block, target, "a")] = np.ascontiguousarray(a, "float32")
            out[tensor_name(block, target, "b")] = np.ascontiguousarray(b, "float32")
        return out

    def metadata(self) -> dict[str, str]:
        """The scaling, as safetensors string metadata: `rank`, `alpha`, and
        where set `use_rslora` ("true"), `rank_pattern` and `alpha_pattern`
        (JSON, "<block>.<target>" -> the pair's rank or alpha)."""
        metadata = {"rank": str(self.rank), "alpha": repr(float(self.alpha))}
        if self.use_rslora:
            metadata["use_rslora"] = "true"
        for name, pattern, kind in (("rank_pattern", self.ranks, int),
                                    ("alpha_pattern", self.alphas, float)):
            if pattern:
                metadata[name] = json.dumps({f"{block}.{target}": kind(value)
                                             for (block, target), value in
                                             sorted(pattern.items())})
        return metadata

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str]) -> "LoraAdapter":
        """The inverse of `tensors` and `metadata`; raises MalformedAdapter on
        unknown or duplicate names, unpaired factors, elements that are not
        floats (bfloat16, float16 and float64 are cast to float32; values
        that overflow it are refused as infinite), or metadata that is not
        `metadata()`'s."""
        pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        for name, value in tensors.items():
            parts = name.split(".")
            if (len(parts) != 4 or parts[0] != "blocks" or not _is_index(parts[1])
                    or parts[2] not in lora_targets.TARGETS
                    or parts[3] not in ("lora_a", "lora_b")):
                raise MalformedAdapter(f"unexpected tensor {name!r}; adapter tensors are named "
                                       "blocks.<i>.<target>.lora_<a|b>, <i> a block index "
                                       "without leading zeros, <target> one of "
                                       f"{', '.join(lora_targets.TARGETS)}.")
            dtype = np.asarray(value).dtype
            if dtype.kind != "f" and dtype != ml_dtypes.bfloat16:
                raise MalformedAdapter(f"tensor {name!r} holds {dtype} values; LoRA factors "
                                       "are floating point (float32, or bfloat16, float16 "
                                       "or float64, which are cast to float32).")
            pairs.setdefault((int(parts[1]), parts[2]), {})[parts[3]] = value
        kernels = {}
        for key, pair in pairs.items():
            if set(pair) != {"lora_a", "lora_b"}:
                raise MalformedAdapter(f"block {key[0]} {key[1]} has only {sorted(pair)}; "
                                       "each adapted projection needs lora_a and lora_b.")
            with np.errstate(over="ignore"):  # float64 beyond float32: inf, refused below
                kernels[key] = (np.asarray(pair["lora_a"], "float32"),
                                np.asarray(pair["lora_b"], "float32"))
        rank, alpha, use_rslora, ranks, alphas = _scaling(metadata)
        return cls(rank=rank, alpha=alpha, kernels=kernels, ranks=ranks, alphas=alphas,
                   use_rslora=use_rslora)

    def as_keras_hub(self) -> "LoraAdapter":
        """The same updates in keras_hub form: PEFT-form query/value pairs
        rewritten per head (at heads times their rank), every pair's scale
        folded into its b, ranks zero-padded to the largest (alpha = that
        rank). Returns self if it is in that form already.

        Raises:
            AdapterMismatch: the adapter adapts projections other than query
                and value, which keras_hub form cannot hold.

        Example:
        >>> LoraAdapter.from_peft(path, config).as_keras_hub().write_lora_file(
        ...     "adapter.lora.h5", config)
        """
        problem = self._not_keras_hub_form()
        if problem is None:
            return self
        if any(t not in gemma_lora.LORA_TARGETS for t in self.targets):
            raise AdapterMismatch(f"the adapter cannot be written in keras_hub's LoRA form: "
                                  f"{problem}.")
        pairs = {}
        for key, (a, b) in self.kernels.items():
            b = (b * self.pair_scale(key)).astype("float32")
            pairs[key] = lora_targets.to_per_head(a, b) if form_of(key[1], a) == PEFT_FORM \
                else (a, b)
        rank = max(a.shape[-1] for a, _ in pairs.values())
        # Zero columns of a and zero rows of b add nothing to a @ b.
        padded = {key: (np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, rank - a.shape[-1])]),
                        np.pad(b, [(0, rank - b.shape[0]), (0, 0)]))
                  for key, (a, b) in pairs.items()}
        return LoraAdapter(rank=rank, alpha=float(rank), kernels=padded)

    @classmethod
    def from_lora_file(cls, path: str | os.PathLike, config: GemmaConfig) -> "LoraAdapter":
        """Reads a keras_hub `.lora.h5` file written for a model of `config`
        (keras_hub's alpha is the rank)."""
        rank, by_index = gemma_lora.read_lora_file(path)
        kernels, unknown = gemma_lora.from_file_kernels(by_index, config)
        if unknown:
            raise AdapterMismatch(
                f"{os.fspath(path)} holds LoRA for keras_hub layer indices {unknown}, which "
                "this base model does not have; it was made for another model.")
        adapter = cls(rank=rank, alpha=float(rank), kernels={
            place: (np.asarray(a, "float32"), np.asarray(b, "float32"))
            for place, (a, b) in kernels.items()})
        adapter.check_fits(config, keras_hub_form=True)
        return adapter

    def write_lora_file(self, path: str | os.PathLike | BinaryIO, config: GemmaConfig) -> None:
        """Writes a keras_hub `.lora.h5` file, to a path or a binary file
        object. keras_hub has no alpha (it is the rank there), so the scale
        is folded into each b; PEFT-form query/value pairs are rewritten
        per head (`as_keras_hub`).

        Raises:
            AdapterMismatch: the adapter adapts projections other than query
                and value (write it with `write_peft`), or does not fit
                `config`.
        """
        adapter = self.as_keras_hub()
        adapter.check_fits(config, keras_hub_form=True)
        if isinstance(path, (str, os.PathLike)) and not os.fspath(path).endswith(".lora.h5"):
            raise PresetError(f"LoRA files end in '.lora.h5', got {path}.")
        # keras_hub reads a pair for every query and value layer, so the ones
        # this adapter leaves alone are written as zero updates.
        kernels = {}
        for block, target in gemma_lora.file_layout(config).values():
            a_shape, b_shape = gemma_lora.factor_shapes(config, target, adapter.rank)
            a, b = adapter.kernels.get((block, target), (np.zeros(a_shape, "float32"),
                                                         np.zeros(b_shape, "float32")))
            kernels[(block, target)] = (a, (b * adapter.scale).astype("float32"))
        gemma_lora.write_lora_file(path, adapter.rank,
                                   gemma_lora.to_file_kernels(kernels, config))

    # ---- PEFT directories ---------------------------------------------------------

    @classmethod
    def from_peft(cls, directory: str | os.PathLike, config: GemmaConfig) -> "LoraAdapter":
        """Reads a PEFT LoRA directory (adapter_config.json and
        adapter_model.safetensors) made for a Gemma model of `config`.

        Raises:
            UnsupportedAdapter: anything but plain LoRA on the seven
                projections (DoRA, biases, modules_to_save, embedding LoRA,
                fan_in_fan_out, another peft_type or model type, ...).
            MalformedAdapter, AdapterMismatch, PresetError: see
                peft_format.read_peft.

        Example:
        >>> adapter = LoraAdapter.from_peft("my-peft-adapter", backbone.config)
        >>> adapter.apply_to(backbone)
        """
        lora = peft_format.read_peft(directory, config)
        ranks = {key: a.shape[-1] for key, (a, _) in lora.kernels.items()
                 if a.shape[-1] != lora.rank}
        adapter = cls(rank=lora.rank, alpha=lora.alpha, kernels=lora.kernels, ranks=ranks,
                      alphas=lora.alphas, use_rslora=lora.use_rslora)
        adapter.check_fits(config)
        return adapter

    def write_peft(self, directory: str | os.PathLike, config: GemmaConfig,
                   base_model_name_or_path: str | None = None) -> None:
        """Writes a PEFT LoRA directory for the Hugging Face model of
        `config`. Per-head query/key/value pairs are rewritten in PEFT's
        form at heads times their rank (with the rank_pattern and
        alpha_pattern entries that keeps); adapted projections the adapter
        leaves out in some blocks are written there as zero updates, so
        PEFT finds every factor it expects.

        Example:
        >>> adapter.write_peft("out/my-adapter", config, "google/gemma-2-2b")
        """
        self.check_fits(config)
        peft_format.write_peft(directory, peft_format.from_adapter(self, config),
                               base_model_name_or_path)

    def peft_files(self, config: GemmaConfig,
                   base_model_name_or_path: str | None = None) -> dict[str, bytes]:
        """What `write_peft` writes, file name -> bytes, built in memory."""
        self.check_fits(config)
        return peft_format.peft_files(peft_format.from_adapter(self, config),
                                      base_model_name_or_path)

    # ---- a Keras model -------------------------------------------------------------

    @classmethod
    def from_backbone(cls, backbone, alpha: float | None = None) -> "LoraAdapter":
        """The LoRA factors of a backbone after `enable_lora` (and training),
        or `apply_to`; every enabled projection is included.

        `alpha` (default: the rank) is recorded with the factors: the adapter
        then means `alpha / rank` times the update the model computes.

        Example:
        >>> backbone.enable_lora(8, ["q_proj", "v_proj", "down_proj"], form="peft")
        >>> ...  # train
        >>> LoraAdapter.from_backbone(backbone).write_peft("out/adapter", backbone.config)
        """
        rank, kernels, ranks = lora_model.read_factors(backbone)
        alpha = float(rank if alpha is None else alpha)
        # The model computes every pair's a @ b unscaled: a pair of another
        # rank gets the alpha that gives it the same scale as the others.
        alphas = {key: alpha * pair_rank / rank for key, pair_rank in ranks.items()}
        return cls(rank=rank, alpha=alpha, kernels=kernels, ranks=ranks, alphas=alphas)

    def apply_to(self, backbone) -> None:
        """Sets these factors in `backbone`, each pair's scale folded into b.
        A backbone without LoRA gets it enabled on the adapter's targets,
        each projection at its pair's rank and form; one with LoRA enabled
        must have it on every pair's projection at that rank and form.
        Enabled projections the adapter leaves out get zero factors. The
        model then computes exactly this adapter.

        Raises:
            AdapterMismatch: the adapter does not fit the backbone, or the
                backbone's LoRA is elsewhere or of another rank or form.

        Example:
        >>> LoraAdapter.from_peft("my-peft-adapter", backbone.config).apply_to(backbone)
        """
        self.check_fits(backbone.config)
        lora_model.set_factors(self, backbone)


def _scaling(metadata: Mapping[str, str]) -> tuple[int, float, bool, dict, dict]:
    """(rank, alpha, use_rslora, ranks, alphas) from `LoraAdapter.metadata()`'s
    form; the values themselves are checked by LoraAdapter (a pair whose
    shapes are not of its rank is refused there)."""
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        use_rslora = {"true": True, "false": False}[metadata.get("use_rslora", "false")]
        patterns = []
        for name, kind in (("rank_pattern", int), ("alpha_pattern", float)):
            pattern = {}
            for key, value in json.loads(metadata.get(name, "{}")).items():
                block, target = key.split(".")
                if not _is_index(block) or isinstance(value, bool) or \
                        (kind is int and not isinstance(value, int)):
                    raise ValueError(f"{name} entry {key!r}: {value!r}")
                pattern[(int(block), target)] = kind(value)
            patterns.append(pattern)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise MalformedAdapter(
            f"the adapter's metadata is not valid ({type(error).__name__}: {error}); it holds "
            "rank and alpha (numbers), and may hold use_rslora (\"true\" or \"false\"), "
            "rank_pattern and alpha_pattern (JSON mapping \"<block>.<target>\" to a "
            "number).") from None
    return rank, alpha, use_rslora, *patterns
