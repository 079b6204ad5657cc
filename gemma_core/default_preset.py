"""The built-in default model: small, Gemma 2 shaped, with RANDOM weights.

It exists so that the service starts on a fresh machine with no downloads;
its outputs mean nothing. The weights come from a fixed seed per variable
path, so every process (every worker, on every node) that builds it gets
the same bytes, and the tokenizer is a small SentencePiece model bundled in
`assets/` (scripts/make_default_tokenizer.py made it).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import zlib

import numpy as np

from gemma_core.gemma_config import GemmaConfig

DEFAULT_PRESET = "default"
SEED = 20261126
TOKENIZER_ASSET = pathlib.Path(__file__).parent / "assets" / "default_tokenizer.spm"

DEFAULT_CONFIG = GemmaConfig(
    vocabulary_size=1024, num_layers=4, num_query_heads=4, num_key_value_heads=2,
    hidden_dim=128, intermediate_dim=512, head_dim=32, use_post_ffw_norm=True,
    use_post_attention_norm=True, attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0, use_sliding_window_attention=True,
    sliding_window_size=256)


def cache_root() -> pathlib.Path:
    """gemma-serve's cache directory on this machine: $GEMMA_SERVE_CACHE, else
    $XDG_CACHE_HOME/gemma-serve or ~/.cache/gemma-serve."""
    base = os.environ.get("GEMMA_SERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemma-serve")
    return pathlib.Path(base)


def _fingerprint() -> str:
    """Changes whenever the config, seed or tokenizer does."""
    text = repr((DEFAULT_CONFIG, SEED)).encode() + TOKENIZER_ASSET.read_bytes()
    return f"{zlib.crc32(text):08x}"


def default_preset_dir() -> pathlib.Path:
    """Where the default preset lives once built (it may not exist yet)."""
    return cache_root() / f"default-{_fingerprint()}"


def ensure_default_preset() -> pathlib.Path:
    """Builds the default preset directory if missing and returns it.

    Concurrent callers are safe: each builds in a private temporary
    directory and renames it into place; the first rename wins.
    """
    target = default_preset_dir()
    if (target / "config.json").is_file():
        return target
    # Imported here, not at the top: building the preset needs the model,
    # and the model's modules need this one (backbone -> preset_source ->
    # default_preset), so a top-level import would close a circle.
    # tests/test_layering.py keeps the module-level imports acyclic.
    from gemma_core.gemma_backbone import GemmaBackbone
    from gemma_core.gemma_tokenizer import GemmaTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    backbone = GemmaBackbone.from_config(DEFAULT_CONFIG.to_kwargs())
    for variable in backbone.weights:
        rng = np.random.default_rng([SEED, zlib.crc32(variable.path.encode())])
        fan_in = variable.shape[-2] if len(variable.shape) > 1 else 1
        if variable.path.endswith("/scale"):  # norm gains: (1 + scale) near 1
            value = rng.normal(0.0, 0.1, variable.shape)
        else:
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), variable.shape)
        variable.assign(value.astype("float32"))
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".default-", dir=target.parent))
    try:
        backbone.save_to_preset(staging)
        GemmaTokenizer(TOKENIZER_ASSET).save_to_preset(staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
