"""GemmaTokenizer on a SentencePiece model trained here, Gemma's special ids."""

import io

import pytest
import sentencepiece

from gemma_core import GemmaTokenizer, PresetError

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a gemma backbone serves many tenants at once",
    "hidden states stream back over grpc in small chunks",
    "low rank adapters are hot swapped into running workers",
] * 20


@pytest.fixture(scope="module")
def spm_bytes():
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=48,
        model_type="unigram", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        minloglevel=2)
    return model.getvalue()


def test_tokenize_detokenize_and_special_ids(spm_bytes):
    tokenizer = GemmaTokenizer(spm_bytes)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, 1, 2)
    assert tokenizer.vocabulary_size() == 48
    ids = tokenizer.tokenize("the lazy dog", add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1
    assert all(0 <= i < 48 for i in ids)
    assert tokenizer.detokenize(ids) == "the lazy dog"
    batch = tokenizer.tokenize(["the fox", "many tenants"])
    assert tokenizer.detokenize_batch(batch) == ["the fox", "many tenants"]
    assert tokenizer.id_to_token(tokenizer.token_to_id("<bos>")) == "<bos>"


def test_loads_from_keras_hub_and_hugging_face_layouts(tmp_path, spm_bytes):
    GemmaTokenizer(spm_bytes).save_to_preset(tmp_path / "kh")
    assert (tmp_path / "kh" / "assets" / "tokenizer" / "vocabulary.spm").is_file()
    assert (tmp_path / "kh" / "tokenizer.json").is_file()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.model").write_bytes(spm_bytes)
    for directory in (tmp_path / "kh", tmp_path / "hf"):
        tokenizer = GemmaTokenizer.from_preset(directory)
        assert tokenizer.tokenize("quick brown fox") == GemmaTokenizer(spm_bytes).tokenize(
            "quick brown fox")


def test_tokenizer_config_is_keras_hub_format(tmp_path, spm_bytes):
    """keras_hub's own tokenizer needs tensorflow-text, which is not installed
    here; check the config it reads names its class and the asset."""
    import json
    GemmaTokenizer(spm_bytes).save_to_preset(tmp_path)
    config = json.loads((tmp_path / "tokenizer.json").read_text())
    assert config["registered_name"] == "keras_hub>GemmaTokenizer"
    assert config["config"]["config_file"] == "tokenizer.json"


def test_missing_and_bad_tokenizers(tmp_path):
    with pytest.raises(PresetError, match="No tokenizer"):
        GemmaTokenizer.from_preset(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(PresetError, match="Not a SentencePiece model"):
        GemmaTokenizer.from_preset(tmp_path)
