"""kaggle:// and hf:// resolve through the real kagglehub and huggingface_hub
caches, and fail at once with a useful message when nothing can be fetched."""

import shutil

import numpy as np
import pytest
from huggingface_hub import constants as hf_constants

from fixture_support import FIXTURES, reference, reference_inputs
from gemma_core import GemmaBackbone, GemmaTokenizer, PresetError


@pytest.fixture()
def no_kaggle_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub-cache"))


def test_builtin_name_without_credentials_fails_with_instructions(no_kaggle_credentials):
    with pytest.raises(PresetError) as error:
        GemmaBackbone.from_preset("gemma2_2b_en")
    message = str(error.value)
    assert "gemma2_2b_en" in message and "kaggle://keras/gemma2/keras/gemma2_2b_en/2" in message
    assert "KAGGLE_USERNAME" in message and "from_preset('/path/to/preset')" in message


def test_kaggle_handle_served_from_the_kagglehub_cache(no_kaggle_credentials):
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    handle = parse_model_handle("keras/gemma/keras/gemma_2b_en/3")
    cache = Cache()
    shutil.copytree(FIXTURES / "gemma1_tiny", cache.get_path(handle))
    cache.mark_as_complete(handle)
    for preset in ("kaggle://keras/gemma/keras/gemma_2b_en/3", "gemma_2b_en"):
        backbone = GemmaBackbone.from_preset(preset)  # the tiny stand-in
        ref = reference("gemma1_tiny")
        valid = ref["padding_mask"].astype(bool)
        np.testing.assert_allclose(np.asarray(backbone(reference_inputs("gemma1_tiny")))[valid],
                                   ref["hidden_states"][valid], atol=1e-4)


def test_bad_kaggle_handle(no_kaggle_credentials):
    with pytest.raises(PresetError, match="not a Kaggle model handle"):
        GemmaBackbone.from_preset("kaggle://just-one-part")


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_repo_served_from_the_hugging_face_cache(hf_cache):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--tiny-org--gemma2-tiny"
    shutil.copytree(FIXTURES / "hf_gemma2_tiny", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    backbone = GemmaBackbone.from_preset("hf://tiny-org/gemma2-tiny")
    ref = reference("hf_gemma2_tiny")
    valid = ref["padding_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(backbone(reference_inputs("hf_gemma2_tiny")))[valid],
                               ref["hidden_states"][valid], atol=1e-4)


def test_hf_repo_offline_and_not_cached_fails_with_instructions(hf_cache):
    with pytest.raises(PresetError, match=r"hf://google/gemma-2b.*HF_HUB_OFFLINE.*from_preset"):
        GemmaBackbone.from_preset("hf://google/gemma-2b")
    with pytest.raises(PresetError, match="HF_HUB_OFFLINE"):
        GemmaTokenizer.from_preset("hf://google/gemma-2b")


def test_malformed_hf_reference(hf_cache):
    with pytest.raises(PresetError, match="expected hf://org/name"):
        GemmaBackbone.from_preset("hf://no-slash")
