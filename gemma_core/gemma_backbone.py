"""GemmaBackbone: Gemma 1 and 2 decoder stacks with keras_hub's interface."""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any, Sequence

import jax
import keras
import numpy as np
from keras import ops

from gemma_core import gemma_layout, gemma_lora, gemma_weight_names, lora_targets
from gemma_core.backbone import Backbone, weights_will_be_loaded
from gemma_core.errors import PresetError, TokenIdError
from gemma_core.gemma_config import GemmaConfig
from gemma_core.gemma_decoder_block import GemmaDecoderBlock
from gemma_core.gemma_presets import GEMMA_PRESETS
from gemma_core.layer_indices import normalize_layers
from gemma_core.lora_adapter import LoraAdapter
from gemma_core.lora_slot_table import LoraSlotTable
from gemma_core.mesh_axes import DATA_AXIS, MODEL_AXIS
from gemma_core.reversible_embedding import ReversibleEmbedding
from gemma_core.rms_normalization import RMSNormalization


class _class_or_instance_method:
    """Binds to the instance when there is one, else to the class: keras_hub
    calls `get_layout_map` on the class, but an instance knows its shapes."""

    def __init__(self, function):
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner):
        return functools.partial(self.function, owner if instance is None else instance)


@keras.saving.register_keras_serializable(package="gemma_core")
class GemmaBackbone(Backbone):
    """Gemma decoder backbone: token ids and padding mask to hidden states.

    Same constructor, weights, presets and methods as keras_hub's
    `GemmaBackbone`, with every argument honoured (keras_hub ignores
    `query_head_dim_normalize=False`).

    Args:
        vocabulary_size: number of tokens.
        num_layers: number of decoder blocks.
        num_query_heads: H.
        num_key_value_heads: K, dividing H (1 is multi-query attention).
        hidden_dim: d.
        intermediate_dim: both feed-forward branches together (2x Hugging
            Face's `intermediate_size`).
        head_dim: size of each attention head.
        query_head_dim_normalize: scale queries by 1/sqrt(head_dim) if True,
            else by 1/sqrt(hidden_dim // num_query_heads).
        use_post_ffw_norm, use_post_attention_norm: Gemma 2's extra norms.
        attention_logit_soft_cap, final_logit_soft_cap: tanh caps or None.
        use_sliding_window_attention: even layers attend locally.
        sliding_window_size: the local window.
        layer_norm_epsilon: epsilon of every RMS norm.
        dropout: rate on attention probabilities and attention output.
        dtype: a dtype policy name ("float32", "bfloat16", "mixed_bfloat16")
            or `keras.DTypePolicy`; norms and softmax always run in float32.

    Example:
    >>> backbone = GemmaBackbone(vocabulary_size=256, num_layers=2,
    ...     num_query_heads=4, num_key_value_heads=1, hidden_dim=64,
    ...     intermediate_dim=128, head_dim=16)
    >>> hidden = backbone({"token_ids": np.ones((1, 8), "int32"),
    ...                    "padding_mask": np.ones((1, 8), "int32")})  # (1, 8, 64)
    """

    presets = GEMMA_PRESETS
    weight_names = gemma_weight_names
    keras_hub_module = "keras_hub.src.models.gemma.gemma_backbone"

    def __init__(self, vocabulary_size, num_layers, num_query_heads,
                 num_key_value_heads, hidden_dim, intermediate_dim, head_dim,
                 query_head_dim_normalize=True, use_post_ffw_norm=False,
                 use_post_attention_norm=False, attention_logit_soft_cap=None,
                 final_logit_soft_cap=None, use_sliding_window_attention=False,
                 sliding_window_size=4096, layer_norm_epsilon=1e-6, dropout=0,
                 dtype=None, **kwargs):
        config = GemmaConfig(
            vocabulary_size=vocabulary_size, num_layers=num_layers,
            num_query_heads=num_query_heads, num_key_value_heads=num_key_value_heads,
            hidden_dim=hidden_dim, intermediate_dim=intermediate_dim,
            head_dim=head_dim, query_head_dim_normalize=query_head_dim_normalize,
            use_post_ffw_norm=use_post_ffw_norm,
            use_post_attention_norm=use_post_attention_norm,
            attention_logit_soft_cap=attention_logit_soft_cap,
            final_logit_soft_cap=final_logit_soft_cap,
            use_sliding_window_attention=use_sliding_window_attention,
            sliding_window_size=sliding_window_size,
            layer_norm_epsilon=layer_norm_epsilon, dropout=dropout)
        # === Layers ===
        kernel_initializer = ("zeros" if weights_will_be_loaded() else
                              keras.initializers.VarianceScaling(
                                  scale=1.0, mode="fan_in", distribution="untruncated_normal"))
        self.token_embedding = ReversibleEmbedding(
            vocabulary_size, hidden_dim, logit_soft_cap=final_logit_soft_cap,
            embeddings_initializer=kernel_initializer, dtype=dtype, name="token_embedding")
        self.transformer_layers = [
            GemmaDecoderBlock(
                hidden_dim=hidden_dim, intermediate_dim=intermediate_dim,
                num_query_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads, head_dim=head_dim,
                query_scale=config.query_scale, use_post_ffw_norm=use_post_ffw_norm,
                use_post_attention_norm=use_post_attention_norm,
                attention_logit_soft_cap=attention_logit_soft_cap,
                sliding_window_size=(sliding_window_size
                                     if config.is_sliding_window_layer(i) else None),
                layer_norm_epsilon=layer_norm_epsilon, dropout=dropout,
                kernel_initializer=kernel_initializer, dtype=dtype,
                name=f"decoder_block_{i}")
            for i in range(num_layers)]
        self.layer_norm = RMSNormalization(
            layer_norm_epsilon, dtype=dtype, name="final_normalization")

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self._embed(token_ids)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask)
        outputs = self.layer_norm(x)
        super().__init__(inputs={"token_ids": token_ids, "padding_mask": padding_mask},
                         outputs=outputs, dtype=dtype, **kwargs)
        # Functional models drop `dtype`; keep it so get_config round-trips.
        self._dtype_policy = keras.dtype_policies.get(dtype)

        # === Config ===
        self.config = config
        for key, value in config.to_kwargs().items():
            setattr(self, key, value)
        self._lora_rank = None
        # Variables added later (LoRA) must land on the same mesh.
        self._distribution = keras.distribution.distribution()

    def _embed(self, token_ids):
        x = self.token_embedding(token_ids)
        # sqrt(d) is rounded to the compute dtype first, as the references do.
        return x * ops.cast(math.sqrt(self.token_embedding.output_dim), x.dtype)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), **self.config.to_kwargs()}

    # ---- forward passes ---------------------------------------------------------

    def call(self, inputs, training=None, mask=None):
        if isinstance(inputs, dict):
            self.validate_token_ids(inputs.get("token_ids"))
        return super().call(inputs, training=training, mask=mask)

    def validate_token_ids(self, token_ids) -> None:
        """Raises TokenIdError for concrete ids outside [0, vocabulary_size).

        Traced values (inside jit) are not checked: XLA would clamp them, so
        callers that jit validate before (as the service does).
        """
        if token_ids is None or isinstance(token_ids, jax.core.Tracer):
            return
        if keras.backend.is_keras_tensor(token_ids):
            return
        ids = np.asarray(token_ids)
        if ids.ndim != 2:
            raise TokenIdError(f"token_ids must be (batch, length), got shape {ids.shape}.")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocabulary_size):
            bad = ids[(ids < 0) | (ids >= self.vocabulary_size)]
            raise TokenIdError(
                f"token_ids must be in [0, {self.vocabulary_size}); got {bad[:5].tolist()}"
                f"{' ...' if bad.size > 5 else ''}. Tokenize with this model's tokenizer.")

    def normalize_layer_indices(self, layers: Sequence[int]) -> list[int]:
        """Maps indices in [-(L+1), L] to [0, L] (see `hidden_states`).

        Raises:
            LayerIndexError (a ValueError): an index that is not an integer
                or is out of range.
        """
        return normalize_layers(layers, self.num_layers)

    def hidden_states(self, inputs, layers: Sequence[int] = (-1,), training=False):
        """Hidden states after chosen layers, stopping after the last needed.

        Indices follow Hugging Face's `output_hidden_states`: 0 is the scaled
        embedding, i in 1..L-1 is the output of decoder block i-1, and L (or
        -1) is the backbone output (last block, then final norm).

        Args:
            inputs: {"token_ids": (B, T) int, "padding_mask": (B, T) 0/1}.
            layers: indices in [-(L+1), L], any order, repeats allowed.

        Returns:
            A list of (B, T, hidden_dim) tensors, one per requested index.

        Example:
        >>> first, last = backbone.hidden_states(inputs, layers=[1, -1])
        """
        wanted = self.normalize_layer_indices(layers)
        self.validate_token_ids(inputs["token_ids"])
        padding_mask = inputs["padding_mask"]
        x = self._embed(ops.convert_to_tensor(inputs["token_ids"], "int32"))
        found = {0: x}
        for i, block in enumerate(self.transformer_layers[: max(wanted)]):
            x = block(x, padding_mask=padding_mask, training=training)
            found[i + 1] = x
        if self.num_layers in wanted:
            found[self.num_layers] = self.layer_norm(x)
        return [found[i] for i in wanted]

    def selected_hidden_states(self, token_ids, padding_mask, layer_ids, lora=None):
        """Hidden states at layer indices given as data, not as Python ints.

        For serving: one compiled function serves every choice of layers and
        of adapters, because the layer indices and the per-row adapter slots
        are arrays traced by jit. Every block runs.

        Args:
            token_ids, padding_mask: (B, T).
            layer_ids: (K,) int32 in [0, num_layers] (see `hidden_states`);
                repeats allowed (padding slots).
            lora: optional (tables, slot_ids): a `LoraSlotTable`'s tables and
                (B,) int32 slot per row (0 = base model), so each row runs
                with its own adapter.

        Returns:
            (K, B, T, hidden_dim) in the compute dtype.
        """
        layer_ids = ops.convert_to_tensor(layer_ids, "int32")
        x = self._embed(ops.convert_to_tensor(token_ids, "int32"))
        selected = ops.zeros((layer_ids.shape[0],) + tuple(x.shape), x.dtype)

        def keep(selected, index, state):
            hit = ops.reshape(layer_ids == index, (-1, 1, 1, 1))
            return ops.where(hit, ops.expand_dims(state, 0), selected)

        selected = keep(selected, 0, x)
        for i, block in enumerate(self.transformer_layers):
            rows = None if lora is None else LoraSlotTable.rows(lora[0], i, lora[1])
            x = block(x, padding_mask=padding_mask, lora=rows)
            if i + 1 < self.num_layers:
                selected = keep(selected, i + 1, x)
        return keep(selected, self.num_layers, self.layer_norm(x))

    def logits(self, hidden_states):
        """Next-token logits (float32) from backbone outputs: the tied
        embedding transposed, then `final_logit_soft_cap` if set."""
        return self.token_embedding(hidden_states, reverse=True)

    def bound_to(self, variable_values):
        """A scope in which the variables read `variable_values` (in the order
        of `self.variables`): how a forward becomes a pure function for
        `jax.jit`, the values passed as arguments instead of captured."""
        return keras.StatelessScope(state_mapping=list(zip(self.variables, variable_values)))

    def stateless_hidden_states(self, variable_values, inputs, layers=(-1,)):
        """`hidden_states` as a pure function of the variables' values, for
        `jax.jit`: pass `[v.value for v in backbone.variables]`."""
        with self.bound_to(variable_values):
            return self.hidden_states(inputs, layers)

    def make_forward_fn(self, layers: Sequence[int] = (-1,)):
        """A jitted `fn(token_ids, padding_mask) -> list of hidden states`.

        It reads the current variable values at each call (so later weight
        or LoRA assignments take effect) and compiles once per input shape;
        `fn.num_compilations()` says how many shapes it has compiled.
        """
        layers = tuple(self.normalize_layer_indices(layers))
        jitted = jax.jit(lambda values, ids, mask: self.stateless_hidden_states(
            values, {"token_ids": ids, "padding_mask": mask}, layers))

        def forward(token_ids, padding_mask):
            self.validate_token_ids(token_ids)
            return jitted([v.value for v in self.variables], token_ids, padding_mask)

        forward.num_compilations = jitted._cache_size
        return forward

    # ---- LoRA -----------------------------------------------------------------

    def _lora_layers(self, targets: Sequence[str] = lora_targets.TARGETS):
        """(block index, target, projection layer) for every block and target."""
        for index, block in enumerate(self.transformer_layers):
            for target in targets:
                owner = block.attention if target in lora_targets.ATTENTION_TARGETS else block
                yield index, target, getattr(owner, target)

    def enable_lora(self, rank: int, target_names: Sequence[str] | None = None,
                    form: str = lora_targets.KERAS_HUB_FORM) -> None:
        """Freezes every weight and adds rank-`rank` LoRA to the projections
        `target_names` of every block (default: keras_hub's query and value);
        then the LoRA kernels are the only trainable weights (alpha = rank,
        so the update is `a @ b` unscaled).

        Args:
            rank: r.
            target_names: among lora_targets.TARGETS (`query`, `key`,
                `value`, `attention_output`, `ffw_gating`, `ffw_gating_2`,
                `ffw_linear`), or PEFT's names (`q_proj`, ..., `down_proj`).
            form: how query/key/value factors are laid out: "keras_hub"
                (per-head a, what `.lora.h5` files hold) or "peft" (one a
                for all heads, what PEFT directories hold).

        Example:
        >>> backbone.enable_lora(8, ["q_proj", "v_proj", "down_proj"], form="peft")
        """
        targets = tuple(map(lora_targets.canonical_target,
                            target_names or gemma_lora.LORA_TARGETS))
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
        if form not in lora_targets.FORMS:
            raise ValueError(f"LoRA form must be one of {lora_targets.FORMS}, got {form!r}.")
        self._enable_lora_layers({(block, target): (rank, form)
                                  for block in range(self.num_layers) for target in targets},
                                 rank)

    def _enable_lora_layers(self, plan, rank: int) -> None:
        """Enables LoRA as `plan` says, (block, target) -> (rank, form);
        `rank` is the one `LoraAdapter.from_backbone` reports."""
        if self._lora_rank is not None:
            raise ValueError(f"LoRA is already enabled with rank {self._lora_rank}.")
        self.trainable = True
        for layer in self._flatten_layers(include_self=False):
            layer.trainable = False
        scope = (self._distribution.scope() if self._distribution is not None
                 else contextlib.nullcontext())
        with scope:
            for block, target, layer in self._lora_layers():
                if (block, target) in plan:
                    layer_rank, form = plan[(block, target)]
                    layer.trainable = True
                    layer.enable_lora(layer_rank, shared_input=(
                        form == lora_targets.PEFT_FORM and target in lora_targets.HEAD_TARGETS))
        self._lora_rank = rank

    def save_lora_weights(self, filepath: str | os.PathLike) -> None:
        """Writes the LoRA kernels as a keras_hub `.lora.h5` file (query and
        value only: LoRA on other projections is refused, see
        `LoraAdapter.write_peft` for those)."""
        if self._lora_rank is None:
            raise ValueError("LoRA is not enabled; call enable_lora(rank) first.")
        if not os.fspath(filepath).endswith(".lora.h5"):
            raise ValueError(f"LoRA files end in '.lora.h5', got {filepath}.")
        LoraAdapter.from_backbone(self).write_lora_file(filepath, self.config)

    def load_lora_weights(self, filepath: str | os.PathLike) -> None:
        """Reads a keras_hub `.lora.h5` file, or a PEFT adapter directory
        (`LoraAdapter.from_peft`), enabling LoRA at its rank on its targets
        if needed.

        Example:
        >>> backbone.load_lora_weights("adapters/my-peft-adapter")
        """
        if os.path.isdir(filepath):
            LoraAdapter.from_peft(filepath, self.config).apply_to(self)
            return
        rank, kernels = gemma_lora.read_lora_file(filepath)
        if self._lora_rank is not None and self._lora_rank != rank:
            raise PresetError(f"{filepath} has LoRA rank {rank} but this model has "
                              f"rank {self._lora_rank} enabled.")
        # Check everything before changing the model, so a wrong file leaves
        # it as it was.
        expected = gemma_lora.file_layout(self.config)
        if set(kernels) != set(expected):
            raise PresetError(
                f"{filepath} holds LoRA for layer indices {sorted(kernels)} but this "
                f"model expects {sorted(expected)}; it was made for another "
                "architecture.")
        for index, (block, target) in expected.items():
            shapes = gemma_lora.factor_shapes(self.config, target, rank)
            for name, value, shape in zip(("lora_kernel_a", "lora_kernel_b"), kernels[index],
                                          shapes):
                if tuple(value.shape) != shape:
                    raise PresetError(
                        f"{filepath}: lora/{index} {name} has shape {value.shape}, expected "
                        f"{shape} for block {block} {target}.")
        layers = list(self._lora_layers(gemma_lora.LORA_TARGETS))
        if self._lora_rank is not None and any(
                not layer.lora_enabled or layer.lora_shared_input or layer.lora_rank != rank
                for _, _, layer in layers):
            raise PresetError(f"{filepath} has keras_hub LoRA of rank {rank} on every query and "
                              "value projection, but this model's LoRA there is of another "
                              "rank or form.")
        if self._lora_rank is None:
            self.enable_lora(rank)
        by_place, _ = gemma_lora.from_file_kernels(kernels, self.config)
        for block, target, layer in layers:
            a, b = by_place[(block, target)]
            layer.lora_kernel_a.assign(a)
            layer.lora_kernel_b.assign(b)

    # ---- sharding ---------------------------------------------------------------

    @_class_or_instance_method
    def get_layout_map(owner, device_mesh, model_parallel_dim_name=MODEL_AXIS,
                       data_parallel_dim_name=DATA_AXIS, *, config=None):
        """A `keras.distribution.LayoutMap` placing every weight on `device_mesh`.

        An axis is sharded only where the mesh axis divides it, so the map is
        valid on any mesh. Called on an instance, it fits that instance's
        architecture. Called on the class, pass `config` (a GemmaConfig,
        constructor kwargs, or a built-in preset name) to fit one
        architecture, which any custom config needs; without it the map is
        valid for every built-in preset at once. The axis names default to
        those of `MESH_AXES`, which are also keras_hub's defaults.

        Example:
        >>> mesh = keras.distribution.DeviceMesh((1, 8), list(gemma_core.MESH_AXES),
        ...                                      keras.distribution.list_devices())
        >>> layout_map = GemmaBackbone.get_layout_map(mesh, config="gemma_2b_en")
        >>> with keras.distribution.ModelParallel(
        ...         layout_map=layout_map, batch_dim_name=gemma_core.MESH_AXES[0]).scope():
        ...     backbone = GemmaBackbone.from_preset("gemma_2b_en")
        """
        if config is None and not isinstance(owner, type):
            config = owner.config
        if config is None:
            configs = [p["config"] for p in GEMMA_PRESETS.values()]
        elif isinstance(config, GemmaConfig):
            configs = [config]
        elif isinstance(config, str):
            if config not in GEMMA_PRESETS:
                raise PresetError(f"Unknown built-in preset {config!r}.")
            configs = [GEMMA_PRESETS[config]["config"]]
        else:
            configs = [GemmaConfig.from_kwargs(config)]
        axis_sizes = dict(zip(device_mesh.axis_names, device_mesh.shape))
        placements = gemma_layout.choose_placements(
            configs, axis_sizes, model_parallel_dim_name, data_parallel_dim_name)
        layout_map = keras.distribution.LayoutMap(device_mesh)
        for pattern, placement in placements.items():
            layout_map[pattern] = placement
        return layout_map
