"""Forward-pass throughput of GemmaBackbone on CPU, against a matmul baseline.

Measures the jitted forward (`backbone.make_forward_fn()`) of a mid-size
Gemma (8 layers, d=512, 8 query heads, 1 key/value head, head_dim 64, two
2048-wide feed-forward branches) on a 4 x 256 batch and reports:

* tokens/s;
* the rate of *weight FLOPs*: 2 * tokens * (matmul weight parameters of the
  decoder blocks). The embedding lookup is a gather and is left out; the
  attention score/value FLOPs (4 * B * T^2 * H * hd per layer) are printed
  separately for information;
* the same rate for two plain `jnp.dot`s: the model's dominant shape
  (1024 x 512) @ (512 x 2048) and a large square 2048^3.

The baselines are timed in the same run, with the same method, interleaved
with the forward (repeat 1 of every case, then repeat 2, ...), because these
CPU machines are small, shared and noisy: background load can halve the
absolute GFLOP/s from one minute to the next, so only the ratio of forward
to matmul, measured under the same conditions, is meaningful. The baselines
use the model's dtype (float32 unless --dtype says otherwise).
The target is a forward weight-FLOP rate of at least 0.75x the model-shaped
matmul rate. This is a report, not a test: it always exits 0.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda: on the GPU

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gemma_core  # noqa: E402

TARGET = 0.75
CONFIG = dict(vocabulary_size=32000, num_layers=8, num_query_heads=8,
              num_key_value_heads=1, hidden_dim=512, intermediate_dim=4096,
              head_dim=64)


def interleaved_seconds_per_call(cases, repeats):
    """Median seconds per call of each `(fn, args, calls)` in `cases`.

    Each case is compiled and warmed first. Then, `repeats` times, every
    case in turn runs `calls` back-to-back calls (each blocked until
    ready); interleaving makes background load hit all cases alike.
    """
    for fn, args, _ in cases:
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    samples = [[] for _ in cases]
    for _ in range(repeats):
        for (fn, args, calls), times in zip(cases, samples):
            start = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - start) / calls)
    return [statistics.median(times) for times in samples]


def weight_flops(cfg, tokens):
    """2 * tokens * matmul weight parameters of all decoder blocks."""
    d, H, K, hd = (cfg["hidden_dim"], cfg["num_query_heads"],
                   cfg["num_key_value_heads"], cfg["head_dim"])
    F = cfg["intermediate_dim"] // 2
    per_layer = H * d * hd + 2 * K * d * hd + H * hd * d + 2 * d * F + F * d
    return 2 * tokens * per_layer * cfg["num_layers"]


def attention_flops(cfg, batch, seq):
    """Scores and weighted values, causal mask not discounted."""
    per_layer = 4 * batch * seq * seq * cfg["num_query_heads"] * cfg["head_dim"]
    return per_layer * cfg["num_layers"]


def matmul_case(m, k, n, dtype, calls):
    """A jitted `jnp.dot` of (m, k) @ (k, n), as `(fn, args, calls)`."""
    keys = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(keys[0], (m, k), dtype)
    b = jax.random.normal(keys[1], (k, n), dtype)
    return jax.jit(jnp.dot), (a, b), calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mid",
                        help="'mid' (above) or a built-in preset name, e.g. gemma2_9b_en: "
                             "its full-size architecture with random weights")
    parser.add_argument("--layers", type=int, default=None,
                        help="override the config's number of layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3, help="calls per repeat")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    cfg = dict(CONFIG) if args.config == "mid" else \
        gemma_core.GEMMA_PRESETS[args.config]["config"].to_kwargs()
    if args.layers:
        cfg["num_layers"] = args.layers
    tokens = args.batch * args.seq

    print(f"jax {jax.__version__}  devices: {jax.devices()}  "
          f"cpu cores: {os.cpu_count()}  dtype: {args.dtype}")
    print(f"config: {cfg}  batch {args.batch} x seq {args.seq} = {tokens} tokens")

    # Built as the worker builds it: every weight laid out by the layout map
    # over a (batch, model) mesh of all devices (1 x N).
    devices = jax.devices()
    mesh = keras.distribution.DeviceMesh((1, len(devices)), list(gemma_core.MESH_AXES),
                                         devices)
    layout_map = gemma_core.GemmaBackbone.get_layout_map(mesh, config=cfg)
    with keras.distribution.ModelParallel(layout_map=layout_map,
                                          batch_dim_name=gemma_core.MESH_AXES[0]).scope():
        backbone = gemma_core.GemmaBackbone(**{**cfg, "dtype": args.dtype})
    print(f"mesh 1x{len(devices)}; {backbone.count_params() / 1e9:.2f} B parameters")
    rng = np.random.default_rng(0)
    token_ids = jnp.asarray(rng.integers(0, cfg["vocabulary_size"],
                                         (args.batch, args.seq)), "int32")
    padding_mask = jnp.ones((args.batch, args.seq), "int32")
    d, F = cfg["hidden_dim"], cfg["intermediate_dim"] // 2  # dominant matmul shape
    names = [f"matmul {tokens}x{d}x{F}", "matmul 2048^3", "gemma forward (weight FLOPs)"]
    flops = [2.0 * tokens * d * F, 2.0 * 2048 ** 3, weight_flops(cfg, tokens)]
    cases = [matmul_case(tokens, d, F, args.dtype, calls=20),
             matmul_case(2048, 2048, 2048, args.dtype, calls=2),
             (backbone.make_forward_fn(), (token_ids, padding_mask), args.calls)]
    seconds = interleaved_seconds_per_call(cases, args.repeats)
    rows = list(zip(names, seconds, flops))

    forward_rate = flops[-1] / seconds[-1]
    print()
    print(f"{'case':<30} {'ms/call':>9} {'GFLOP/s':>9} {'fwd/this':>9}")
    for name, secs, flop in rows:
        rate = flop / secs
        print(f"{name:<30} {secs * 1e3:>9.2f} {rate / 1e9:>9.1f} "
              f"{forward_rate / rate:>9.2f}")
    attn = attention_flops(cfg, args.batch, args.seq)
    print()
    print(f"forward: {tokens / seconds[-1]:,.0f} tokens/s; weight FLOPs/call "
          f"{flops[-1] / 1e9:.2f} G; attention score/value FLOPs/call "
          f"{attn / 1e9:.2f} G (not counted above; with them "
          f"{(flops[-1] + attn) / seconds[-1] / 1e9:.1f} GFLOP/s)")
    ratio = forward_rate / (flops[0] / seconds[0])
    print(f"target: forward weight-FLOP rate >= {TARGET} x matmul rate")
    print(f"{'PASS' if ratio >= TARGET else 'MISS'}: forward / {rows[0][0]} = {ratio:.2f}")


if __name__ == "__main__":
    main()
