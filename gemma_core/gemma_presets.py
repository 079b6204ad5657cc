"""The built-in Gemma presets: architecture, size and where the weights live."""

from gemma_core.gemma_config import GemmaConfig

_GEMMA_2B = GemmaConfig(
    vocabulary_size=256000, num_layers=18, num_query_heads=8,
    num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32768, head_dim=256)
_GEMMA_7B = GemmaConfig(
    vocabulary_size=256000, num_layers=28, num_query_heads=16,
    num_key_value_heads=16, hidden_dim=3072, intermediate_dim=49152, head_dim=256)
_GEMMA2_COMMON = dict(
    vocabulary_size=256000, use_post_ffw_norm=True, use_post_attention_norm=True,
    attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
    use_sliding_window_attention=True, sliding_window_size=4096)
_GEMMA2_2B = GemmaConfig(
    num_layers=26, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
    intermediate_dim=18432, head_dim=256, **_GEMMA2_COMMON)
_GEMMA2_9B = GemmaConfig(
    num_layers=42, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584,
    intermediate_dim=28672, head_dim=256, **_GEMMA2_COMMON)
_GEMMA2_27B = GemmaConfig(
    num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
    intermediate_dim=73728, head_dim=128, query_head_dim_normalize=False,
    **_GEMMA2_COMMON)


def _preset(config, handle, description):
    return {
        "metadata": {"description": description,
                     "params": config.num_parameters(),
                     "path": "gemma"},
        "kaggle_handle": handle,
        "config": config,
    }


# name -> {"metadata": {description, params, path}, "kaggle_handle", "config"}
GEMMA_PRESETS = {
    "gemma_2b_en": _preset(_GEMMA_2B, "kaggle://keras/gemma/keras/gemma_2b_en/3",
                           "Gemma 1, 2B, 18 layers, pretrained (English)."),
    "gemma_instruct_2b_en": _preset(
        _GEMMA_2B, "kaggle://keras/gemma/keras/gemma_instruct_2b_en/3",
        "Gemma 1, 2B, 18 layers, instruction tuned."),
    "gemma_1.1_instruct_2b_en": _preset(
        _GEMMA_2B, "kaggle://keras/gemma/keras/gemma_1.1_instruct_2b_en/4",
        "Gemma 1.1, 2B, 18 layers, instruction tuned with RLHF updates."),
    "code_gemma_2b_en": _preset(
        _GEMMA_2B, "kaggle://keras/codegemma/keras/code_gemma_2b_en/2",
        "CodeGemma, 2B, 18 layers, code completion and fill-in-the-middle."),
    "code_gemma_1.1_2b_en": _preset(
        _GEMMA_2B, "kaggle://keras/codegemma/keras/code_gemma_1.1_2b_en/2",
        "CodeGemma 1.1, 2B, 18 layers, code completion and fill-in-the-middle."),
    "gemma_7b_en": _preset(_GEMMA_7B, "kaggle://keras/gemma/keras/gemma_7b_en/4",
                           "Gemma 1, 7B, 28 layers, pretrained (English)."),
    "gemma_instruct_7b_en": _preset(
        _GEMMA_7B, "kaggle://keras/gemma/keras/gemma_instruct_7b_en/4",
        "Gemma 1, 7B, 28 layers, instruction tuned."),
    "gemma_1.1_instruct_7b_en": _preset(
        _GEMMA_7B, "kaggle://keras/gemma/keras/gemma_1.1_instruct_7b_en/5",
        "Gemma 1.1, 7B, 28 layers, instruction tuned with RLHF updates."),
    "code_gemma_7b_en": _preset(
        _GEMMA_7B, "kaggle://keras/codegemma/keras/code_gemma_7b_en/3",
        "CodeGemma, 7B, 28 layers, code completion and fill-in-the-middle."),
    "code_gemma_instruct_7b_en": _preset(
        _GEMMA_7B, "kaggle://keras/codegemma/keras/code_gemma_instruct_7b_en/3",
        "CodeGemma, 7B, 28 layers, instruction tuned for code chat."),
    "code_gemma_1.1_instruct_7b_en": _preset(
        _GEMMA_7B, "kaggle://keras/codegemma/keras/code_gemma_1.1_instruct_7b_en/3",
        "CodeGemma 1.1, 7B, 28 layers, instruction tuned for code chat."),
    "gemma2_2b_en": _preset(_GEMMA2_2B, "kaggle://keras/gemma2/keras/gemma2_2b_en/2",
                            "Gemma 2, 2B, 26 layers, pretrained."),
    "gemma2_instruct_2b_en": _preset(
        _GEMMA2_2B, "kaggle://keras/gemma2/keras/gemma2_instruct_2b_en/2",
        "Gemma 2, 2B, 26 layers, instruction tuned."),
    "gemma2_9b_en": _preset(_GEMMA2_9B, "kaggle://keras/gemma2/keras/gemma2_9b_en/4",
                            "Gemma 2, 9B, 42 layers, pretrained."),
    "gemma2_instruct_9b_en": _preset(
        _GEMMA2_9B, "kaggle://keras/gemma2/keras/gemma2_instruct_9b_en/4",
        "Gemma 2, 9B, 42 layers, instruction tuned."),
    "gemma2_27b_en": _preset(_GEMMA2_27B, "kaggle://keras/gemma2/keras/gemma2_27b_en/3",
                             "Gemma 2, 27B, 46 layers, pretrained."),
    "gemma2_instruct_27b_en": _preset(
        _GEMMA2_27B, "kaggle://keras/gemma2/keras/gemma2_instruct_27b_en/3",
        "Gemma 2, 27B, 46 layers, instruction tuned."),
    "shieldgemma_2b_en": _preset(
        _GEMMA2_2B, "kaggle://google/shieldgemma/keras/shieldgemma_2b_en/2",
        "ShieldGemma, 2B on Gemma 2, safety-policy classifier."),
    "shieldgemma_9b_en": _preset(
        _GEMMA2_9B, "kaggle://google/shieldgemma/keras/shieldgemma_9b_en/2",
        "ShieldGemma, 9B on Gemma 2, safety-policy classifier."),
    "shieldgemma_27b_en": _preset(
        _GEMMA2_27B, "kaggle://google/shieldgemma/keras/shieldgemma_27b_en/2",
        "ShieldGemma, 27B on Gemma 2, safety-policy classifier."),
}
