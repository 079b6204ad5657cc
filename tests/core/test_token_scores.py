"""Token scores against numpy on the fixtures' own reference logits
(transformers' for the Hugging Face fixtures, keras_hub's for the others),
with and without a PEFT adapter, Gemma and Gemma 2 (final soft cap on)."""

import numpy as np
import pytest

from fixture_support import FIXTURES, reference, reference_inputs
from gemma_core import GemmaBackbone, token_scores

CASES = [("hf_gemma_tiny", ""), ("gemma2_tiny", ""), ("hf_gemma2_tiny", ""),
         ("hf_gemma2_tiny_peft", "peft_all"), ("hf_gemma2_tiny_peft", "peft_rs")]


def numpy_log_softmax(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def models():
    return {}


def backbone_for(models, fixture, adapter):
    if (fixture, adapter) not in models:
        model = GemmaBackbone.from_preset(FIXTURES / fixture)
        if adapter:
            model.load_lora_weights(FIXTURES / fixture / adapter)
        models[(fixture, adapter)] = model
    return models[(fixture, adapter)]


@pytest.mark.parametrize("fixture, adapter", CASES)
def test_scores_equal_numpy_on_the_reference_logits(models, fixture, adapter):
    model = backbone_for(models, fixture, adapter)
    ref = reference(fixture)
    logits = ref[f"logits_{adapter}" if adapter else "logits"]
    want = numpy_log_softmax(logits)                                      # (B, T, V)
    cap = model.config.final_logit_soft_cap
    if cap:
        assert np.abs(logits).max() < cap                                 # the cap applied
    inputs = reference_inputs(fixture)
    ids, mask = inputs["token_ids"], inputs["padding_mask"]
    hidden = model(inputs)                                                # (B, T, d)
    got = np.asarray(token_scores.token_logprobs(model, hidden, ids))
    expected = np.take_along_axis(want[:, :-1], ids[:, 1:, None], -1)[..., 0]
    real = (mask[:, :-1] * mask[:, 1:]).astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)
    last = mask.sum(1) - 1
    positions = np.stack([last, np.zeros_like(last), last // 2], axis=1).astype("int32")
    top_ids, top_lp = map(np.asarray, token_scores.top_k(model, hidden, positions, 5))
    for b in range(len(ids)):
        for p, position in enumerate(positions[b]):
            order = np.argsort(-want[b, position], kind="stable")[:5]
            np.testing.assert_allclose(top_lp[b, p], want[b, position, order], atol=1e-4)
            # Ids agree wherever their log-probabilities are not tied.
            assert set(top_ids[b, p][:3]) == set(order[:3]) or \
                np.ptp(want[b, position, order[:4]]) < 1e-4
    candidate_ids = np.array([[3, 7, 11], [100, 5, 42]], "int32")
    chosen, probs = map(np.asarray, token_scores.candidates(model, hidden, last.astype("int32"),
                                                            candidate_ids))
    at_last = want[np.arange(len(ids)), last]                              # (B, V)
    expected_chosen = np.take_along_axis(at_last, candidate_ids, -1)
    np.testing.assert_allclose(chosen, expected_chosen, atol=1e-4, rtol=0)
    expected_probs = np.exp(expected_chosen) / np.exp(expected_chosen).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, expected_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_long_sequences_go_through_the_head_in_blocks(models, monkeypatch):
    """A block limit smaller than one row's logits gives the same answer."""
    model = backbone_for(models, "hf_gemma2_tiny", "")
    inputs = reference_inputs("hf_gemma2_tiny")
    hidden = model(inputs)
    whole = np.asarray(token_scores.token_logprobs(model, hidden, inputs["token_ids"]))
    monkeypatch.setattr(token_scores, "MAX_LOGITS_BYTES", 4 * 2 * 256 * 3)  # 3 positions
    blocked = np.asarray(token_scores.token_logprobs(model, hidden, inputs["token_ids"]))
    np.testing.assert_allclose(blocked, whole, atol=1e-6, rtol=0)


def test_they_run_under_jit_with_the_weights_as_arguments(models):
    import jax
    model = backbone_for(models, "gemma2_tiny", "")
    inputs = reference_inputs("gemma2_tiny")
    hidden = model(inputs)
    values = [v.value for v in model.variables]

    def scores(values, hidden, ids):
        with model.bound_to(values):
            return token_scores.token_logprobs(model, hidden, ids)

    jitted = np.asarray(jax.jit(scores)(values, hidden, inputs["token_ids"]))
    eager = np.asarray(token_scores.token_logprobs(model, hidden, inputs["token_ids"]))
    np.testing.assert_allclose(jitted, eager, atol=1e-6, rtol=0)


def test_nothing_to_pick_gives_empty_answers(models):
    """A one-token sequence has no token log-probabilities; no positions,
    no top-k; no rows, no candidates."""
    model = backbone_for(models, "gemma2_tiny", "")
    inputs = reference_inputs("gemma2_tiny")
    hidden = model({"token_ids": inputs["token_ids"][:, :1],
                    "padding_mask": inputs["padding_mask"][:, :1]})          # (2, 1, d)
    assert np.asarray(token_scores.token_logprobs(model, hidden,
                                                  inputs["token_ids"][:, :1])).shape == (2, 0)
    ids, log_probs = token_scores.top_k(model, hidden, np.zeros((2, 0), "int32"), 3)
    assert ids.shape == log_probs.shape == (2, 0, 3)
    chosen, probs = token_scores.candidates(model, hidden[:0], np.zeros(0, "int32"),
                                            np.zeros((0, 2), "int32"))
    assert chosen.shape == probs.shape == (0, 2)
