"""A LoRA adapter as plain arrays: what the registry stores and workers load.

keras_hub's `enable_lora` puts rank-r factors on each block's query and
value projections; the effective kernel is `kernel + (alpha / r) * a @ b`.
An adapter here is those factors for every block, independent of any model
instance, so it can be checked against a config, written to disk, sent to
a worker and written into an adapter slot.
"""

from __future__ import annotations

import dataclasses
import os
from typing import BinaryIO, Mapping

import ml_dtypes
import numpy as np

from gemma_core import gemma_lora
from gemma_core.errors import AdapterMismatch, PresetError
from gemma_core.gemma_config import GemmaConfig

# (block index, "query" | "value") -> (a (heads, d, r), b (r, head_dim))
Kernels = Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]

# The largest magnitude allowed for an entry of a, of (alpha / rank) * b
# and of the update (alpha / rank) * a @ b; trained updates are around 1e-2.
# A projection's input is RMS-normalized, so each entry of x @ a and of the
# LoRA output is at most hidden_dim * (1 + the norm's largest scale) times
# this: about 5e7 times that scale for the largest presets. Attention mixes
# such values, the output projection sums a few thousand into the residual
# stream, and every block normalizes its input again, so hidden states (and
# the squares the norms take) stay many orders of magnitude below float32's
# and bfloat16's 3.4e38. A factor or alpha of 3e38 overflows at once.
MAX_LORA_MAGNITUDE = 1e4


class MalformedAdapter(AdapterMismatch):
    """The adapter is wrong in itself, whatever model it is meant for: a rank
    or alpha that is not a positive number, factors that do not pair up,
    NaN or infinite values, tensors of the wrong names or element types."""


def _is_index(text: str) -> bool:
    """A block index as `tensor_name` writes it: ASCII digits, no leading zero
    (so no two names can mean the same block)."""
    return text.isascii() and text.isdigit() and (text == "0" or not text.startswith("0"))


def tensor_name(block: int, target: str, factor: str) -> str:
    """The adapter's safetensors key, e.g. `blocks.3.query.lora_a`."""
    return f"blocks.{block}.{target}.lora_{factor}"


@dataclasses.dataclass(frozen=True, eq=False)
class LoraAdapter:
    """LoRA factors for some of the query/value projections of a backbone.

    Attributes:
        rank: r, the inner size of every pair.
        alpha: the update is scaled by `alpha / rank` (keras_hub: alpha = r).
        kernels: (block, target) -> (a, b), float32; a is (heads, d, r) with
            the query or key/value head count, b is (r, head_dim). Blocks or
            targets absent from the map are not adapted.

    Example:
    >>> adapter = LoraAdapter.from_backbone(lora_enabled_backbone)
    >>> adapter.check_fits(backbone.config)
    """

    rank: int
    alpha: float
    kernels: Kernels

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)) \
                or self.rank < 1:
            raise MalformedAdapter(f"LoRA rank must be a positive integer, got {self.rank!r}.")
        if not np.isfinite(self.alpha) or self.alpha <= 0:
            raise MalformedAdapter(f"LoRA alpha must be a positive number, got {self.alpha!r}.")
        if not self.kernels:
            raise MalformedAdapter("the adapter has no LoRA kernels.")
        for (block, target), (a, b) in self.kernels.items():
            if target not in gemma_lora.LORA_TARGETS:
                raise MalformedAdapter(f"LoRA target {target!r} of block {block} is not one "
                                       f"of {gemma_lora.LORA_TARGETS}.")
            if a.ndim != 3 or b.ndim != 2 or a.shape[-1] != self.rank \
                    or b.shape[0] != self.rank:
                raise MalformedAdapter(
                    f"block {block} {target}: factors of shapes {a.shape} and {b.shape} do "
                    f"not make a rank-{self.rank} pair ((heads, d, r) and (r, head_dim)).")
            for factor in (a, b):
                if not np.all(np.isfinite(factor)):
                    raise MalformedAdapter(f"block {block} {target}: the factors hold NaN or "
                                           "infinite values.")
            self._check_magnitude(block, target, a, b)

    def _check_magnitude(self, block: int, target: str, a: np.ndarray, b: np.ndarray) -> None:
        """Refuses factors that could overflow the served model (see
        MAX_LORA_MAGNITUDE). Every entry of scale * a @ b is at most
        scale * sum_k max|a[..., k]| * max|b[k, :]|, an upper bound that
        needs no product formed; in float64, so it cannot overflow itself."""
        a_max = np.max(np.abs(a), axis=(0, 1), initial=0).astype("float64")
        b_max = np.max(np.abs(b), axis=1, initial=0).astype("float64") * self.scale
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
        return float(self.alpha) / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in gemma_lora.LORA_TARGETS
                     if any(target == t for _, target in self.kernels))

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(sorted({block for block, _ in self.kernels}))

    def num_parameters(self) -> int:
        return sum(a.size + b.size for a, b in self.kernels.values())

    def check_fits(self, config: GemmaConfig) -> None:
        """Raises AdapterMismatch unless every pair fits `config`'s shapes."""
        for (block, target), (a, b) in sorted(self.kernels.items()):
            if not 0 <= block < config.num_layers:
                raise AdapterMismatch(
                    f"the adapter adapts block {block} but the base model has "
                    f"{config.num_layers} blocks; it was made for another model.")
            want_a, want_b = gemma_lora.factor_shapes(config, target, self.rank)
            if a.shape != want_a or b.shape != want_b:
                raise AdapterMismatch(
                    f"block {block} {target}: the adapter's factors are {a.shape} and "
                    f"{b.shape} but this base model needs {want_a} and {want_b}; it was "
                    "made for another model.")

    @classmethod
    def random(cls, config: GemmaConfig, rank: int, alpha: float | None = None,
               seed: int = 0, std: float = 0.2, targets=gemma_lora.LORA_TARGETS,
               blocks=None, b_std: float | None = None) -> "LoraAdapter":
        """An adapter with random factors (b too, so it changes outputs):
        for tests, benchmarks and load generators, not for training (a
        trained adapter starts with b = 0). a ~ N(0, std^2), b ~ N(0,
        b_std^2) (b_std defaults to std).

        Example:
        >>> adapter = LoraAdapter.random(backbone.config, rank=8, seed=1)
        """
        rng = np.random.default_rng(seed)
        kernels = {}
        for block in (range(config.num_layers) if blocks is None else blocks):
            for target in targets:
                a_shape, b_shape = gemma_lora.factor_shapes(config, target, rank)
                kernels[(block, target)] = (
                    rng.normal(0, std, a_shape).astype("float32"),
                    rng.normal(0, std if b_std is None else b_std, b_shape).astype("float32"))
        return cls(rank=rank, alpha=float(rank if alpha is None else alpha), kernels=kernels)

    # ---- conversions ---------------------------------------------------------

    def tensors(self) -> dict[str, np.ndarray]:
        """Flat name -> float32 array map, for safetensors."""
        out = {}
        for (block, target), (a, b) in sorted(self.kernels.items()):
            out[tensor_name(block, target, "a")] = np.ascontiguousarray(a, "float32")
            out[tensor_name(block, target, "b")] = np.ascontiguousarray(b, "float32")
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], rank: int,
                     alpha: float) -> "LoraAdapter":
        """The inverse of `tensors`; raises MalformedAdapter on unknown or
        duplicate names, unpaired factors, or elements that are not floats
        (bfloat16, float16 and float64 are cast to float32; values that
        overflow it are refused as infinite)."""
        pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        for name, value in tensors.items():
            parts = name.split(".")
            if (len(parts) != 4 or parts[0] != "blocks" or not _is_index(parts[1])
                    or parts[2] not in gemma_lora.LORA_TARGETS
                    or parts[3] not in ("lora_a", "lora_b")):
                raise MalformedAdapter(f"unexpected tensor {name!r}; adapter tensors are named "
                                       "blocks.<i>.<query|value>.lora_<a|b>, <i> a block "
                                       "index without leading zeros.")
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
        return cls(rank=int(rank), alpha=float(alpha), kernels=kernels)

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
        adapter.check_fits(config)
        return adapter

    def write_lora_file(self, path: str | os.PathLike | BinaryIO, config: GemmaConfig) -> None:
        """Writes a keras_hub `.lora.h5` file, to a path or a binary file
        object. keras_hub has no alpha (it is the rank there), so
        `alpha / rank` is folded into each b."""
        self.check_fits(config)
        if isinstance(path, (str, os.PathLike)) and not os.fspath(path).endswith(".lora.h5"):
            raise PresetError(f"LoRA files end in '.lora.h5', got {path}.")
        # keras_hub reads a pair for every query and value layer, so the ones
        # this adapter leaves alone are written as zero updates.
        kernels = {}
        for block, target in gemma_lora.file_layout(config).values():
            a_shape, b_shape = gemma_lora.factor_shapes(config, target, self.rank)
            a, b = self.kernels.get((block, target), (np.zeros(a_shape, "float32"),
                                                      np.zeros(b_shape, "float32")))
            kernels[(block, target)] = (a, (b * self.scale).astype("float32"))
        gemma_lora.write_lora_file(path, self.rank, gemma_lora.to_file_kernels(kernels, config))

    @classmethod
    def from_backbone(cls, backbone, alpha: float | None = None) -> "LoraAdapter":
        """The LoRA factors of a backbone after `enable_lora` (and training)."""
        rank = backbone._lora_rank
        if rank is None:
            raise ValueError("LoRA is not enabled on this backbone; call enable_lora first.")
        kernels = {(block, target): (np.asarray(layer.lora_kernel_a.numpy(), "float32"),
                                     np.asarray(layer.lora_kernel_b.numpy(), "float32"))
                   for block, target, layer in backbone._lora_layers()
                   if getattr(layer, "lora_enabled", False)}
        return cls(rank=rank, alpha=float(rank if alpha is None else alpha), kernels=kernels)

    def apply_to(self, backbone) -> None:
        """Enables LoRA on `backbone` (rank `self.rank`) and sets these factors,
        `alpha / rank` folded into b; projections the adapter leaves out get
        zero factors. The model then computes exactly this adapter."""
        self.check_fits(backbone.config)
        if backbone._lora_rank is None:
            backbone.enable_lora(self.rank)
        elif backbone._lora_rank != self.rank:
            raise AdapterMismatch(f"the backbone has LoRA rank {backbone._lora_rank} enabled; "
                                  f"this adapter has rank {self.rank}.")
        for block, target, layer in backbone._lora_layers():
            a, b = self.kernels.get((block, target), (None, None))
            if a is None:
                layer.lora_kernel_a.assign(np.zeros(layer.lora_kernel_a.shape, "float32"))
                layer.lora_kernel_b.assign(np.zeros(layer.lora_kernel_b.shape, "float32"))
            else:
                layer.lora_kernel_a.assign(a)
                layer.lora_kernel_b.assign(b * self.scale)
