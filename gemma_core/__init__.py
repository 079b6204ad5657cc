"""gemma_core: a Keras 3 (JAX) Gemma backbone library with keras_hub's API.

Imports neither Ray nor gRPC; usable on its own.
"""

from gemma_core.backbone import Backbone
from gemma_core.errors import PresetError, TokenIdError
from gemma_core.gemma_backbone import GemmaBackbone
from gemma_core.gemma_config import GemmaConfig
from gemma_core.gemma_presets import GEMMA_PRESETS
from gemma_core.gemma_tokenizer import GemmaTokenizer

__all__ = ["Backbone", "GemmaBackbone", "GemmaConfig", "GemmaTokenizer",
           "GEMMA_PRESETS", "PresetError", "TokenIdError"]
