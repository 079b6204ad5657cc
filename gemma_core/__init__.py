"""gemma_core: a Keras 3 (JAX) Gemma backbone library with keras_hub's API.

Imports neither Ray nor gRPC; usable on its own.
"""

import os as _os
import sys as _sys

# Keras picks its backend at import; this library is JAX-only, so choose JAX
# unless the user already chose, and refuse a Keras already bound elsewhere.
_os.environ.setdefault("KERAS_BACKEND", "jax")
if _os.environ["KERAS_BACKEND"] != "jax":
    raise ImportError(f"gemma_core runs on Keras' JAX backend, but KERAS_BACKEND="
                      f"{_os.environ['KERAS_BACKEND']!r}. Set KERAS_BACKEND=jax.")
if "keras" in _sys.modules:
    import keras as _keras
    if _keras.backend.backend() != "jax":
        raise ImportError("Keras was imported with the "
                          f"{_keras.backend.backend()!r} backend before gemma_core; "
                          "set KERAS_BACKEND=jax before importing keras.")

from gemma_core.backbone import Backbone, read_preset_config
from gemma_core.default_preset import DEFAULT_PRESET
from gemma_core.errors import (AdapterMismatch, MalformedAdapter, PresetError, TokenIdError,
                               UnsupportedAdapter)
from gemma_core.fine_tune_config import FineTuneConfig
from gemma_core.gemma_backbone import GemmaBackbone
from gemma_core.gemma_config import GemmaConfig
from gemma_core.gemma_presets import GEMMA_PRESETS
from gemma_core.gemma_tokenizer import GemmaTokenizer
from gemma_core.layer_indices import LayerIndexError, normalize_layer_index, normalize_layers
from gemma_core.lora_adapter import LoraAdapter
from gemma_core.lora_slot_table import LoraSlotTable
from gemma_core.lora_targets import PEFT_MODULES as LORA_PEFT_MODULES
from gemma_core.lora_targets import TARGETS as LORA_PROJECTIONS
from gemma_core.lora_trainer import (LoraTrainer, causal_lm_loss, iterate_batches,
                                     make_batches, total_steps)
from gemma_core.mesh_axes import MESH_AXES

__all__ = ["AdapterMismatch", "Backbone", "DEFAULT_PRESET", "FineTuneConfig", "GEMMA_PRESETS",
           "GemmaBackbone", "GemmaConfig", "GemmaTokenizer", "LORA_PEFT_MODULES",
           "LORA_PROJECTIONS", "LayerIndexError", "LoraAdapter", "LoraSlotTable", "LoraTrainer",
           "MESH_AXES", "MalformedAdapter", "PresetError", "TokenIdError", "UnsupportedAdapter",
           "causal_lm_loss", "iterate_batches", "make_batches", "normalize_layer_index",
           "normalize_layers", "read_preset_config", "total_steps"]
