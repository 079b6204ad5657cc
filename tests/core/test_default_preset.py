"""The built-in default model is the same bytes wherever it is built."""

import numpy as np

from gemma_core import GemmaBackbone, GemmaTokenizer
from gemma_core.default_preset import DEFAULT_CONFIG, ensure_default_preset


def test_default_preset_is_deterministic_and_complete(tmp_path, monkeypatch):
    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("GEMMA_SERVE_CACHE", str(tmp_path / name))
        directory = ensure_default_preset()
        assert ensure_default_preset() == directory  # built once, then reused
        built.append(GemmaBackbone.from_preset("default"))
    for a, b in zip(built[0].weights, built[1].weights):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    assert built[0].get_config()["num_layers"] == DEFAULT_CONFIG.num_layers
    tokenizer = GemmaTokenizer.from_preset("default")
    assert tokenizer.vocabulary_size() == DEFAULT_CONFIG.vocabulary_size
    ids = tokenizer.tokenize("naïve café, 日本", add_bos=True)
    assert ids[0] == 2 and max(ids) < DEFAULT_CONFIG.vocabulary_size
    assert tokenizer.detokenize(ids) == "naïve café, 日本"  # byte fallback: no <unk>
