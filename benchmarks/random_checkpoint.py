"""A random-weight Hugging Face checkpoint of any Gemma architecture, on disk.

For benchmarks at real size without downloading gated weights: the files are
what a Hugging Face Gemma checkpoint holds (config.json with the real
hyper-parameters, bfloat16 safetensors shards with their index, a
SentencePiece `tokenizer.model`), the values are random. Both gemma_core
(`Backbone.from_preset(dir)`) and transformers (`AutoModel.from_pretrained`)
load it.

Written one tensor at a time, in chunks of rows, by this module's own
safetensors writer (the format is an 8-byte header length, a JSON header of
names, dtypes, shapes and byte offsets, then the bytes), so writing a 27B
checkpoint needs a few hundred MB, never the model. Values are normal with
std 0.02 (Hugging Face's initializer range), small enough that activations
stay finite in bfloat16; every tensor has its own seed, so a checkpoint is
the same whenever it is written. The directory is built under a temporary
name and renamed when complete, with `random_checkpoint.json` (what was
written) last: `ensure_checkpoint` reuses a directory only when that file
matches.

Example:
>>> from gemma_core import GEMMA_PRESETS
>>> path = ensure_checkpoint("~/.cache/gemma-serve-bench", "gemma2_2b_en",
...                          GEMMA_PRESETS["gemma2_2b_en"]["config"])
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from gemma_core.gemma_config import GemmaConfig

FORMAT_VERSION = 1
MARKER = "random_checkpoint.json"
STD = 0.02
CHUNK_ELEMENTS = 1 << 24  # rows generated at a time: 64 MB of float32
DEFAULT_SHARD_BYTES = 2 * 10**9
TOKENIZER = pathlib.Path(__file__).resolve().parent.parent / "gemma_core" / "assets" / \
    "default_tokenizer.spm"


def model_type(config: GemmaConfig) -> str:
    """'gemma2' or 'gemma': the Hugging Face family that represents `config`.

    Raises ValueError for an architecture neither represents (Hugging Face's
    Gemma has no post norms, caps or window; its Gemma 2 always has both post
    norms)."""
    gemma2_features = (config.use_post_attention_norm, config.use_post_ffw_norm)
    if all(gemma2_features):
        return "gemma2"
    if any(gemma2_features) or config.attention_logit_soft_cap or \
            config.final_logit_soft_cap or config.use_sliding_window_attention or \
            not config.query_head_dim_normalize:
        raise ValueError("this architecture is neither Hugging Face's Gemma (no post norms, "
                         "caps or window) nor its Gemma 2 (both post norms)")
    return "gemma"


def hf_config(config: GemmaConfig, dtype: str = "bfloat16") -> dict:
    """config.json of a Hugging Face checkpoint of `config`."""
    kind = model_type(config)
    out = {
        "architectures": ["Gemma2ForCausalLM" if kind == "gemma2" else "GemmaForCausalLM"],
        "model_type": kind,
        "vocab_size": config.vocabulary_size,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.intermediate_dim // 2,  # per branch
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_query_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.layer_norm_epsilon,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rope_theta": 10000.0,  # what transformers before 5 reads
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": STD,
        "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,  # the older name of the same field
    }
    if kind == "gemma":
        out.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh")
        return out
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=(config.head_dim if config.query_head_dim_normalize
                               else config.hidden_dim // config.num_query_heads),
        attn_logit_softcapping=config.attention_logit_soft_cap,
        final_logit_softcapping=config.final_logit_soft_cap,
        sliding_window=(config.sliding_window_size if config.use_sliding_window_attention
                        else None),
        layer_types=[("sliding_attention" if config.is_sliding_window_layer(i)
                      else "full_attention") for i in range(config.num_layers)],
        cache_implementation="hybrid",
    )
    return out


def tensor_shapes(config: GemmaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, Hugging Face names and layouts, in file order."""
    d, hd, V = config.hidden_dim, config.head_dim, config.vocabulary_size
    H, K, F = config.num_query_heads, config.num_key_value_heads, config.intermediate_dim // 2
    norms = ["input_layernorm", "post_attention_layernorm"]
    if model_type(config) == "gemma2":
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    shapes = [("model.embed_tokens.weight", (V, d))]
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes += [(prefix + "self_attn.q_proj.weight", (H * hd, d)),
                   (prefix + "self_attn.k_proj.weight", (K * hd, d)),
                   (prefix + "self_attn.v_proj.weight", (K * hd, d)),
                   (prefix + "self_attn.o_proj.weight", (d, H * hd)),
                   (prefix + "mlp.gate_proj.weight", (F, d)),
                   (prefix + "mlp.up_proj.weight", (F, d)),
                   (prefix + "mlp.down_proj.weight", (d, F))]
        shapes += [(prefix + norm + ".weight", (d,)) for norm in norms]
    shapes.append(("model.norm.weight", (d,)))
    return shapes


def _chunks(shape: tuple[int, ...], seed: tuple[int, int]) -> Iterator[np.ndarray]:
    """The tensor's bfloat16 values, a block of rows at a time."""
    rng = np.random.default_rng(seed)
    rows = shape[0]
    row_elements = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // row_elements)
    for start in range(0, rows, step):
        block = (min(step, rows - start),) + tuple(shape[1:])
        values = rng.standard_normal(block, dtype=np.float32)
        values *= STD
        yield values.astype(ml_dtypes.bfloat16)


def _write_shard(path: pathlib.Path, tensors: list[tuple[int, str, tuple[int, ...]]],
                 seed: int) -> None:
    """One safetensors file holding `tensors` ((index, name, shape)), bf16."""
    header, offset = {}, 0
    for _, name, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for index, _, shape in tensors:
            for block in _chunks(shape, (seed, index)):
                handle.write(block.tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def write_checkpoint(directory: str | os.PathLike, config: GemmaConfig, seed: int = 0,
                     shard_bytes: int = DEFAULT_SHARD_BYTES) -> pathlib.Path:
    """Writes the checkpoint into `directory` (which must not exist)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True)
    shapes = tensor_shapes(config)
    count = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in shapes)
    if count != config.num_parameters():
        raise AssertionError(f"wrote {count} parameters, the config has "
                             f"{config.num_parameters()}")
    shards, current, size = [], [], 0
    for index, (name, shape) in enumerate(shapes):
        nbytes = int(np.prod(shape, dtype=np.int64)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((index, name, shape))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for number, tensors in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(directory / file, tensors, seed)
        weight_map.update({name: file for _, name, _ in tensors})
    index = {"metadata": {"total_size": 2 * count}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    shutil.copyfile(TOKENIZER, directory / "tokenizer.model")
    return directory


def _marker(config: GemmaConfig, seed: int) -> dict:
    return {"format_version": FORMAT_VERSION, "config": config.to_kwargs(), "seed": seed,
            "std": STD, "dtype": "bfloat16", "weights": "random (benchmarks only)"}


def ensure_checkpoint(workdir: str | os.PathLike, name: str, config: GemmaConfig,
                      seed: int = 0, shard_bytes: int = DEFAULT_SHARD_BYTES,
                      log=print) -> pathlib.Path:
    """The checkpoint `<workdir>/<name>-random-bf16-seed<seed>`, written if it
    is missing or was written differently (or half: a crash leaves only a
    temporary directory, removed here)."""
    workdir = pathlib.Path(workdir).expanduser()
    target = workdir / f"{name}-random-bf16-seed{seed}"
    marker = _marker(config, seed)
    try:
        if json.loads((target / MARKER).read_text()) == marker:
            return target
    except (OSError, ValueError):
        pass
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob(f"{target.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    partial = workdir / f"{target.name}.partial-{os.getpid()}"
    gigabytes = 2 * config.num_parameters() / 1e9
    log(f"writing a random-weight checkpoint ({config.num_parameters():,} parameters, "
        f"{gigabytes:.2f} GB bf16) to {target} ...")
    write_checkpoint(partial, config, seed, shard_bytes)
    (partial / MARKER).write_text(json.dumps(marker, indent=2))
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target
