"""Loading holds one copy of the weights plus one tensor, not two copies."""

import json
import shutil
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from fixture_support import FIXTURES
from gemma_core import GemmaBackbone, PresetError
from gemma_core.hf_format import HuggingFaceWeights
from gemma_core.safetensors_file import SafetensorsFile

# ~100 MB of float32 weights: large against the interpreter's own footprint.
CONFIG = dict(vocabulary_size=8192, num_layers=6, num_query_heads=8, num_key_value_heads=2,
              hidden_dim=512, intermediate_dim=4096, head_dim=64)

# Peak RSS while loading argv[1], above the RSS just before it: VmHWM, reset
# through clear_refs, counts file pages mapped into the process as well as
# anonymous memory, as users' tools do. argv[2] is loaded first to warm up
# imports, the allocator and XLA: assigning compiles a small program per new
# shape and dtype, a fixed cost that would swamp a 100 MB model.
PROBE = textwrap.dedent("""
    import ctypes, gc, os, sys, json
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from gemma_core import GemmaBackbone

    def status(field):
        with open("/proc/self/status") as file:
            line = next(line for line in file if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    GemmaBackbone.from_preset(sys.argv[2])
    gc.collect()
    # Memory the warm-up freed but glibc kept would otherwise be reused or
    # released by the load, hiding its growth.
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # Resets VmHWM to the current RSS.
    before = status("VmRSS")
    backbone = GemmaBackbone.from_preset(sys.argv[1])
    weights = sum(np.asarray(v.value).nbytes for v in backbone.weights)
    print(json.dumps({"peak_growth": status("VmHWM") - before, "weights": weights}))
""")


def _peak_growth(checkpoint, warm_up):
    out = subprocess.run([sys.executable, "-c", PROBE, str(checkpoint), str(warm_up)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["peak_growth"], result["weights"]


@pytest.mark.slow
def test_peak_memory_of_loading_is_one_copy(tmp_path):
    save = ("import os; os.environ['KERAS_BACKEND'] = 'jax'\n"
            "import sys, json\nfrom gemma_core import GemmaBackbone\n"
            "GemmaBackbone(**json.loads(sys.argv[1])).save_to_preset(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", save, json.dumps(CONFIG), str(tmp_path)], check=True)
    growth, weights = _peak_growth(tmp_path, FIXTURES / "gemma1_tiny")
    assert weights > 90e6
    # One copy of the model plus its largest tensor (the 16 MB embedding) and
    # slack; two full copies would be 2x.
    assert growth < 1.5 * weights, (growth, weights)


def _write_hf_gemma2_bf16(directory, layers, vocab=8192, hidden=512, heads=8,
                          kv_heads=2, head_dim=64, intermediate=4096):
    """A Hugging Face gemma2 checkpoint in bfloat16, 15 MB a layer plus an 8 MB
    embedding, random weights. The largest tensor is small against the model,
    as in real checkpoints, so "one copy plus a tensor" is near 1x."""
    config = json.loads((FIXTURES / "hf_gemma2_tiny" / "config.json").read_text())
    config.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim, intermediate_size=intermediate,
                  query_pre_attn_scalar=head_dim, dtype="bfloat16",
                  layer_types=[("sliding_attention", "full_attention")[i % 2]
                               for i in range(layers)])
    (directory / "config.json").write_text(json.dumps(config))
    shapes = {"embed_tokens.weight": (vocab, hidden), "norm.weight": (hidden,)}
    for i in range(layers):
        layer = f"layers.{i}."
        shapes.update({layer + name: (hidden,) for name in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")})
        shapes.update({
            layer + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            layer + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            layer + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            layer + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            layer + "mlp.gate_proj.weight": (intermediate, hidden),
            layer + "mlp.up_proj.weight": (intermediate, hidden),
            layer + "mlp.down_proj.weight": (hidden, intermediate),
        })
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    save_file({"model." + name: (0.02 * rng.standard_normal(shape, np.float32))
               .astype(ml_dtypes.bfloat16) for name, shape in shapes.items()},
              directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
def test_peak_memory_of_loading_hugging_face_bf16_is_one_copy(tmp_path):
    """The safetensors pages read must not stay in the process's RSS (as an
    mmap of the file would keep them) on top of the loaded weights."""
    checkpoint, warm_up = tmp_path / "checkpoint", tmp_path / "warm_up"
    checkpoint.mkdir()
    warm_up.mkdir()
    _write_hf_gemma2_bf16(checkpoint, layers=7)
    _write_hf_gemma2_bf16(warm_up, layers=1)  # The same shapes, a fifth of the size.
    growth, weights = _peak_growth(checkpoint, warm_up)
    assert weights > 90e6
    # One copy plus the largest tensor (the 8 MB embedding) and slack; the
    # mmap reader added the whole file on top, about 2x.
    assert growth < 1.5 * weights, (growth, weights)


# The reader that replaced safetensors' mmap (gemma_core/safetensors_file.py):
# the same arrays, and a damaged file is a PresetError before any allocation.

def test_reads_what_safetensors_reads(tmp_path):
    from safetensors.numpy import load_file, save_file
    rng = np.random.default_rng(0)
    tensors = {dtype: (100 * rng.standard_normal((3, 5))).astype(dtype)
               for dtype in ("float16", "float32", "float64", "int8", "uint8", "int16",
                             "uint16", "int32", "uint32", "int64", "uint64", "bool")}
    tensors["bfloat16"] = rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16)
    tensors["scalar"] = np.array(1.5, np.float32)
    tensors["empty"] = np.zeros((0, 7), np.float32)
    save_file(tensors, tmp_path / "all.safetensors", metadata={"format": "pt"})
    file = SafetensorsFile(tmp_path / "all.safetensors")
    try:
        expected = load_file(tmp_path / "all.safetensors")
        assert file.keys() == sorted(expected)
        for name, array in expected.items():
            ours = file.read(name)
            assert ours.dtype == array.dtype and ours.shape == array.shape, name
            assert ours.tobytes() == array.tobytes(), name
    finally:
        file.close()


def _with_header(edit):
    """A corruption that rewrites the JSON header (data left as it was)."""
    def corrupt(data):
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        edit(header)
        new = json.dumps(header).encode()
        return len(new).to_bytes(8, "little") + new + data[8 + length:]
    return corrupt


def _first(header):
    return header[min(name for name in header if name != "__metadata__")]


@pytest.mark.parametrize("corrupt", [
    lambda data: b"",
    lambda data: data[:5],
    lambda data: data[: len(data) // 2],  # Truncated: the last tensors lie past the end.
    lambda data: (2 ** 63).to_bytes(8, "little") + data[8:],
    lambda data: data[:8] + b"\xff" * int.from_bytes(data[:8], "little"),
    _with_header(lambda h: _first(h).update(dtype="F8_E4M3")),
    _with_header(lambda h: _first(h).update(shape=[-1])),
    _with_header(lambda h: _first(h).update(shape=[True, 2])),
    _with_header(lambda h: _first(h).update(data_offsets=[0])),
    # Claims 4 PB: must fail on the offsets, not try to allocate them.
    _with_header(lambda h: _first(h).update(shape=[10 ** 15], dtype="F32",
                                            data_offsets=[0, 4 * 10 ** 15])),
    _with_header(lambda h: _first(h).update(shape=[1, 1])),  # Size and offsets disagree.
    _with_header(lambda h: h.update(oops=[1, 2])),
], ids=["empty", "short", "truncated", "huge-header-length", "header-not-utf8",
        "unknown-dtype", "negative-shape", "bool-shape", "one-offset", "beyond-the-file",
        "size-mismatch", "entry-not-an-object"])
def test_damaged_safetensors_is_a_preset_error(tmp_path, corrupt):
    shutil.copytree(FIXTURES / "hf_gemma_tiny", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(PresetError, match="model.safetensors is not a readable safetensors"):
        GemmaBackbone.from_preset(tmp_path / "hf")


def test_file_truncated_after_opening_is_a_preset_error(tmp_path):
    shutil.copytree(FIXTURES / "hf_gemma_tiny", tmp_path / "hf")
    weights = HuggingFaceWeights(tmp_path / "hf")
    try:
        with open(tmp_path / "hf" / "model.safetensors", "r+b") as file:
            file.truncate(1000)
        with pytest.raises(PresetError, match="not a readable safetensors file.*ends"):
            weights.read("embed_tokens.weight")
    finally:
        weights.close()
