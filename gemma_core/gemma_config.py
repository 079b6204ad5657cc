"""The architecture of a Gemma backbone as one frozen value."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Architecture hyper-parameters of a Gemma backbone.

    Field names and defaults are the constructor arguments of
    `GemmaBackbone` (and of keras_hub's), so a config and a backbone's
    `get_config()` convert into each other without renaming.

    Example:
    >>> cfg = GemmaConfig(vocabulary_size=256, num_layers=2, num_query_heads=4,
    ...                   num_key_value_heads=1, hidden_dim=64,
    ...                   intermediate_dim=128, head_dim=16)
    >>> cfg.num_parameters()
    61760
    """

    vocabulary_size: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    hidden_dim: int
    intermediate_dim: int
    head_dim: int
    query_head_dim_normalize: bool = True
    use_post_ffw_norm: bool = False
    use_post_attention_norm: bool = False
    attention_logit_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    use_sliding_window_attention: bool = False
    sliding_window_size: int = 4096
    layer_norm_epsilon: float = 1e-6
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocabulary_size", "num_layers", "num_query_heads",
                     "num_key_value_heads", "hidden_dim", "intermediate_dim",
                     "head_dim", "sliding_window_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"GemmaConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_query_heads % self.num_key_value_heads:
            raise ValueError(
                "GemmaConfig.num_query_heads must be a multiple of "
                f"num_key_value_heads, got {self.num_query_heads} query heads "
                f"and {self.num_key_value_heads} key/value heads.")
        if self.intermediate_dim % 2:
            raise ValueError(
                "GemmaConfig.intermediate_dim counts both feed-forward branches "
                f"(keras_hub convention) and must be even, got "
                f"{self.intermediate_dim}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GemmaConfig.dropout must be in [0, 1), got {self.dropout}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(
                f"GemmaConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}.")
        for name in ("attention_logit_soft_cap", "final_logit_soft_cap"):
            cap = getattr(self, name)
            if cap is not None and cap <= 0:
                raise ValueError(f"GemmaConfig.{name} must be > 0 or None, got {cap}.")

    @property
    def query_scale(self) -> float:
        """The factor applied to queries before the dot product with keys."""
        if self.query_head_dim_normalize:
            return 1.0 / math.sqrt(self.head_dim)
        return 1.0 / math.sqrt(self.hidden_dim // self.num_query_heads)

    def is_sliding_window_layer(self, index: int) -> bool:
        """Gemma 2 alternates: even layers are local, odd layers global."""
        return self.use_sliding_window_attention and index % 2 == 0

    def num_parameters(self) -> int:
        """Exact parameter count, from the shapes alone."""
        d, hd = self.hidden_dim, self.head_dim
        attention = d * hd * (2 * self.num_query_heads + 2 * self.num_key_value_heads)
        feed_forward = 3 * d * (self.intermediate_dim // 2)
        norms = d * (2 + self.use_post_attention_norm + self.use_post_ffw_norm)
        per_layer = attention + feed_forward + norms
        return self.vocabulary_size * d + self.num_layers * per_layer + d

    def to_kwargs(self) -> dict[str, Any]:
        """The constructor arguments of `GemmaBackbone` for this config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "GemmaConfig":
        """Builds a config from constructor arguments, ignoring Keras ones
        (name, dtype, trainable) and rejecting unknown names."""
        fields = {f.name for f in dataclasses.fields(cls)}
        ignored = {"name", "dtype", "trainable"}
        unknown = set(kwargs) - fields - ignored
        if unknown:
            raise ValueError(
                f"Unknown Gemma config keys {sorted(unknown)}; expected some of "
                f"{sorted(fields)}.")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in kwargs]
        if missing:
            raise ValueError(f"Gemma config is missing required keys {missing}.")
        return cls(**{k: v for k, v in kwargs.items() if k in fields})
