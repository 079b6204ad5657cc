"""PEFT adapter directories: what transformers + peft computed for each
fixture adapter, files written as PEFT writes them, and every setting that
is not plain LoRA refused by name."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import safetensors.numpy

from fixture_support import FIXTURES, reference, reference_inputs
from gemma_core import (AdapterMismatch, GemmaBackbone, LoraAdapter, LoraSlotTable,
                        MalformedAdapter, PresetError, UnsupportedAdapter)

FIXTURE = "hf_gemma2_tiny_peft"
ADAPTERS = ["peft_all", "peft_qv", "peft_rs"]
# The config fields that change what an adapter computes or where it goes.
FIELDS = ["peft_type", "r", "lora_alpha", "use_rslora", "bias", "fan_in_fan_out", "task_type",
          "base_model_name_or_path", "rank_pattern", "alpha_pattern", "use_dora",
          "modules_to_save", "lora_bias", "layers_to_transform"]


@pytest.fixture(scope="module")
def base():
    return GemmaBackbone.from_preset(FIXTURES / FIXTURE)


def fresh(base):
    model = GemmaBackbone.from_config(base.get_config())
    model.set_weights(base.get_weights())
    return model


def valid(array, ref):
    return np.asarray(array, "float32")[ref["padding_mask"].astype(bool)]


def hidden(model):
    return np.asarray(model(reference_inputs(FIXTURE)))


@pytest.mark.parametrize("name", ADAPTERS)
def test_each_adapter_reproduces_transformers_and_peft(base, name):
    ref = reference(FIXTURE)
    model = fresh(base)
    model.load_lora_weights(FIXTURES / FIXTURE / name)
    states = hidden(model)
    np.testing.assert_allclose(valid(states, ref), valid(ref[f"hidden_states_{name}"], ref),
                               atol=1e-4, rtol=0)
    np.testing.assert_allclose(valid(model.logits(states), ref),
                               valid(ref[f"logits_{name}"], ref), atol=1e-4, rtol=0)
    # The adapter must matter, or this test would prove nothing.
    assert np.abs(valid(ref[f"hidden_states_{name}"], ref)
                  - valid(ref["hidden_states"], ref)).max() > 1e-2


def test_what_the_fixture_adapters_hold(base):
    adapters = {name: LoraAdapter.from_peft(FIXTURES / FIXTURE / name, base.config)
                for name in ADAPTERS}
    assert adapters["peft_all"].targets == ("query", "key", "value", "attention_output",
                                            "ffw_gating", "ffw_gating_2", "ffw_linear")
    assert adapters["peft_qv"].targets == ("query", "value")
    assert adapters["peft_rs"].targets == ("query", "value", "attention_output", "ffw_linear")
    assert adapters["peft_rs"].use_rslora
    assert adapters["peft_rs"].scale == pytest.approx(16 / np.sqrt(8))
    assert adapters["peft_all"].scale == 2.0


@pytest.mark.parametrize("name", ADAPTERS)
def test_write_then_read_is_the_same_adapter_in_the_same_layout(base, name, tmp_path):
    source = FIXTURES / FIXTURE / name
    adapter = LoraAdapter.from_peft(source, base.config)
    adapter.write_peft(tmp_path, base.config, base_model_name_or_path="hf_gemma2_tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json",
                                                          "adapter_model.safetensors"]
    theirs = safetensors.numpy.load_file(source / "adapter_model.safetensors")
    ours = safetensors.numpy.load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype
        np.testing.assert_array_equal(ours[key], value)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = json.loads((source / "adapter_config.json").read_text())
    assert {f: written.get(f) for f in FIELDS} == {f: expected.get(f) for f in FIELDS}
    assert sorted(written["target_modules"]) == sorted(expected["target_modules"])
    first, again = fresh(base), fresh(base)
    adapter.apply_to(first)
    LoraAdapter.from_peft(tmp_path, base.config).apply_to(again)
    np.testing.assert_array_equal(hidden(again), hidden(first))


def edited_copy(tmp_path, name="peft_all", **changes):
    """A copy of a fixture adapter with config fields changed (None: removed)."""
    target = tmp_path / name
    shutil.copytree(FIXTURES / FIXTURE / name, target)
    path = target / "adapter_config.json"
    settings = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    path.write_text(json.dumps(settings))
    return target


@pytest.mark.parametrize("changes, error, words", [
    ({"use_dora": True}, UnsupportedAdapter, "use_dora"),
    ({"bias": "lora_only"}, UnsupportedAdapter, "bias is 'lora_only'"),
    ({"lora_bias": True}, UnsupportedAdapter, "lora_bias"),
    ({"modules_to_save": ["lm_head"]}, UnsupportedAdapter, "modules_to_save"),
    ({"fan_in_fan_out": True}, UnsupportedAdapter, "fan_in_fan_out"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, UnsupportedAdapter, "embed_tokens"),
    ({"target_modules": ["lm_head", "v_proj"]}, UnsupportedAdapter, "lm_head"),
    ({"target_modules": "model.*embed_tokens|.*q_proj"}, UnsupportedAdapter, "embedding"),
    ({"target_modules": ["q_proj", "c_attn"]}, UnsupportedAdapter, "c_attn"),
    ({"peft_type": "LOHA"}, UnsupportedAdapter, "peft_type"),
    ({"auto_mapping": {"base_model_class": "LlamaForCausalLM"}}, UnsupportedAdapter,
     "LlamaForCausalLM"),
    ({"task_type": "SEQ_CLS"}, UnsupportedAdapter, "task_type"),
    ({"init_lora_weights": "pissa"}, UnsupportedAdapter, "init_lora_weights"),
    ({"trainable_token_indices": [1, 2]}, UnsupportedAdapter, "trainable_token_indices"),
    ({"a_future_setting": {"on": True}}, UnsupportedAdapter, "a_future_setting"),
    ({"r": 3}, MalformedAdapter, "rank 4 but the config says 3"),
    ({"rank_pattern": {"down_proj": 8}}, MalformedAdapter, "rank_pattern"),
    ({"rank_pattern": {"down_proj": "8"}}, MalformedAdapter, "rank_pattern"),
    ({"lora_alpha": -8}, MalformedAdapter, "lora_alpha"),
    ({"target_modules": ["q_proj", "k_proj"]}, MalformedAdapter, "does not name"),
])
def test_settings_other_than_plain_lora_are_refused_by_name(base, tmp_path, changes, error,
                                                            words):
    directory = edited_copy(tmp_path, **changes)
    model = fresh(base)
    with pytest.raises(error, match=words) as raised:
        model.load_lora_weights(directory)
    assert isinstance(raised.value, ValueError)
    # Refused before anything changed.
    assert not any("lora" in v.path for v in model.weights)


def test_off_values_and_harmless_settings_are_accepted(base, tmp_path):
    directory = edited_copy(tmp_path, use_dora=None, modules_to_save=[], lora_dropout=0.1,
                            init_lora_weights="gaussian", target_modules="all-linear",
                            layers_to_transform=[0, 1, 2])
    LoraAdapter.from_peft(directory, base.config)


def test_alpha_pattern_scales_its_modules(base, tmp_path):
    """alpha_pattern {down_proj: 16} doubles down_proj's scale: the same as
    doubling its lora_B."""
    patterned = edited_copy(tmp_path, alpha_pattern={"down_proj": 16.0})
    doubled = tmp_path / "doubled"
    shutil.copytree(FIXTURES / FIXTURE / "peft_all", doubled)
    tensors = safetensors.numpy.load_file(doubled / "adapter_model.safetensors")
    tensors = {k: v * 2 if "down_proj.lora_B" in k else v for k, v in tensors.items()}
    safetensors.numpy.save_file(tensors, doubled / "adapter_model.safetensors")
    adapter = LoraAdapter.from_peft(patterned, base.config)
    assert adapter.pair_scale((0, "ffw_linear")) == 4.0
    assert adapter.pair_scale((0, "ffw_gating")) == 2.0
    first, second = fresh(base), fresh(base)
    adapter.apply_to(first)
    second.load_lora_weights(doubled)
    np.testing.assert_allclose(hidden(first), hidden(second), atol=1e-6)


def rewrite_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    safetensors.numpy.save_file(edit(safetensors.numpy.load_file(path)), path)


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("edit, error, words", [
    (lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": t[A0]},
     UnsupportedAdapter, "embed_tokens"),
    (lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                t[A0][0]}, UnsupportedAdapter, "DoRA"),
    (lambda t: {**t, "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": t[A0]},
     MalformedAdapter, "unexpected tensor"),
    (lambda t: {**t, "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight": t[A0]},
     UnsupportedAdapter, "qkv_proj"),
    (lambda t: {k: v for k, v in t.items() if k != A0}, MalformedAdapter, "only lora_B"),
    (lambda t: {**t, A0: t[A0][:, :50]}, AdapterMismatch, "another model"),
    (lambda t: {**t, A0: t[A0][:3]}, MalformedAdapter, "do not make a LoRA pair"),
    (lambda t: {**t, A0: t[A0].astype("int32")}, MalformedAdapter, "int32"),
    (lambda t: {**t, A0.replace("layers.0.", "layers.3."): t[A0],
                A0.replace("layers.0.", "layers.3.").replace("lora_A", "lora_B"):
                t[A0.replace("lora_A", "lora_B")]}, AdapterMismatch, "layer 3 is out of range"),
    (lambda t: {**t, A0.replace("layers.0.", "layers.00."): t[A0]}, MalformedAdapter,
     "unexpected tensor"),
    (lambda t: {**t, A0: np.full_like(t[A0], np.nan)}, MalformedAdapter, "NaN"),
])
def test_malformed_factor_files_are_refused(base, tmp_path, edit, error, words):
    directory = edited_copy(tmp_path)
    rewrite_tensors(directory, edit)
    with pytest.raises(error, match=words):
        LoraAdapter.from_peft(directory, base.config)


def test_missing_files_and_other_models(base, tmp_path):
    directory = edited_copy(tmp_path)
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(PresetError, match="adapter_model.safetensors is missing"):
        LoraAdapter.from_peft(directory, base.config)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(PresetError, match="adapter_config.json is missing"):
        base.load_lora_weights(directory)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(PresetError, match="not valid JSON"):
        LoraAdapter.from_peft(directory, base.config)
    source = FIXTURES / FIXTURE / "peft_all"
    two_layers = dataclasses.replace(base.config, num_layers=2)
    with pytest.raises(AdapterMismatch, match="layer 2 is out of range"):
        LoraAdapter.from_peft(source, two_layers)
    wider = dataclasses.replace(base.config, hidden_dim=64)
    with pytest.raises(AdapterMismatch, match="another model"):
        LoraAdapter.from_peft(source, wider)


def test_keras_hub_files_hold_query_and_value_only(base, tmp_path):
    all_linear = LoraAdapter.from_peft(FIXTURES / FIXTURE / "peft_all", base.config)
    with pytest.raises(AdapterMismatch, match="query and value only"):
        all_linear.write_lora_file(tmp_path / "x.lora.h5", base.config)
    model = fresh(base)
    all_linear.apply_to(model)
    with pytest.raises(AdapterMismatch, match="query and value only"):
        model.save_lora_weights(tmp_path / "x.lora.h5")
    assert not (tmp_path / "x.lora.h5").exists()
    narrow = LoraSlotTable(base.config, num_slots=2, max_rank=64, targets=("query", "value"))
    with pytest.raises(ValueError, match="adapts .*attention_output"):
        narrow.slot_values(all_linear)
    with pytest.raises(ValueError, match="raise --max-adapter-rank"):
        LoraSlotTable(base.config, num_slots=2, max_rank=2).slot_values(all_linear)


def test_one_batch_mixes_every_kind_of_adapter(base, tmp_path):
    """Rows of the three PEFT adapters (all-linear, q/v, rsLoRA with rank and
    alpha patterns), a keras_hub .lora.h5 adapter and the base model in one
    batch: each row equals its adapter alone (1e-5) and transformers + peft
    (1e-4)."""
    ref = reference(FIXTURE)
    inputs = reference_inputs(FIXTURE)
    qv_h5 = tmp_path / "qv.lora.h5"
    LoraAdapter.from_peft(FIXTURES / FIXTURE / "peft_qv", base.config).write_lora_file(
        qv_h5, base.config)
    adapters = {name: LoraAdapter.from_peft(FIXTURES / FIXTURE / name, base.config)
                for name in ADAPTERS}
    adapters["lora_h5"] = LoraAdapter.from_lora_file(qv_h5, base.config)
    expected = {**{name: ref[f"hidden_states_{name}"] for name in ADAPTERS},
                "lora_h5": ref["hidden_states_peft_qv"], "base": ref["hidden_states"]}
    names = list(adapters) + ["base"]
    table = LoraSlotTable(base.config, num_slots=len(adapters) + 1, max_rank=16)
    tables = table.zeros()
    for slot, name in enumerate(adapters, start=1):
        tables = table.write(tables, slot, table.slot_values(adapters[name]))
    rows = len(inputs["token_ids"])
    slots = np.repeat(np.array([names.index(n) + 1 if n != "base" else 0 for n in names],
                               "int32"), rows)
    ids = np.tile(inputs["token_ids"], (len(names), 1))
    mask = np.tile(inputs["padding_mask"], (len(names), 1))
    last = np.array([base.num_layers], "int32")
    mixed = np.asarray(base.selected_hidden_states(ids, mask, last, lora=(tables, slots)))[0]
    for i, name in enumerate(names):
        got = mixed[i * rows:(i + 1) * rows]
        alone_tables = table.zeros()
        if name != "base":
            alone_tables = table.write(alone_tables, 1, table.slot_values(adapters[name]))
        alone = np.asarray(base.selected_hidden_states(
            inputs["token_ids"], inputs["padding_mask"], last,
            lora=(alone_tables, np.full(rows, int(name != "base"), "int32"))))[0]
        np.testing.assert_allclose(valid(got, ref), valid(alone, ref), atol=1e-5, rtol=0)
        np.testing.assert_allclose(valid(got, ref), valid(expected[name], ref), atol=1e-4,
                                   rtol=0, err_msg=name)


def test_a_query_value_peft_adapter_converts_exactly_to_keras_hub_form(base, tmp_path):
    """PEFT's q/v pairs rewritten per head (rank 4 heads x 2) give the same
    outputs as a .lora.h5 file and in a served adapter slot."""
    ref = reference(FIXTURE)
    expected = valid(ref["hidden_states_peft_qv"], ref)
    qv = LoraAdapter.from_peft(FIXTURES / FIXTURE / "peft_qv", base.config)
    keras_hub_form = qv.as_keras_hub()
    assert keras_hub_form.rank == 8 and keras_hub_form.alpha == 8.0
    qv.write_lora_file(tmp_path / "qv.lora.h5", base.config)
    model = fresh(base)
    model.load_lora_weights(tmp_path / "qv.lora.h5")
    np.testing.assert_allclose(valid(hidden(model), ref), expected, atol=1e-4, rtol=0)
    table = LoraSlotTable(base.config, num_slots=2, max_rank=8)
    tables = table.write(table.zeros(), 1, table.slot_values(keras_hub_form))
    inputs = reference_inputs(FIXTURE)
    served = np.asarray(base.selected_hidden_states(
        inputs["token_ids"], inputs["padding_mask"], np.array([base.num_layers], "int32"),
        lora=(tables, np.ones(2, "int32"))))[0]
    np.testing.assert_allclose(valid(served, ref), expected, atol=1e-4, rtol=0)
