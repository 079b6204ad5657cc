"""Long-input forward of GemmaBackbone on CPU: time and memory per token.

Runs the jitted forward of the mid-size Gemma of forward_throughput.py (8
layers, d=512, 8 query heads, 1 key/value head, head_dim 64) made Gemma
2-like in its attention: GemmaConfig's layer pattern (even layers attend
within a sliding window of 1024 tokens, odd layers globally) and the logit
soft cap 50. One sequence of each length (512, 2048, 8192 by default) and
reports, cases interleaved (repeat 1 of every length, then repeat 2, ...):

* tokens/s and time per token, and that time relative to the shortest
  length's, measured in the same run (these CPU machines are shared and
  noisy; only the ratio is meaningful);
* the compiled program's temporary memory (`memory_analysis()`: every
  intermediate XLA keeps, i.e. the activation memory; weights and inputs
  are arguments, not temporaries);
* the growth of the process's peak resident memory during one call of the
  longest case (already compiled; its peak is reset just before).

Lengths up to `dot_product_attention.BLOCK_SIZE` take the plain attention
(every score materialized); longer ones the blocked one. `--plain 2048`
adds the plain attention at those lengths, for comparison (at 8192 tokens
it needs several GB).

Targets (issue 16): per-token time at 8192 tokens at most 2.5x that at 512;
activation memory for one 8192-token sequence under 1 GB. This is a report,
not a test: it always exits 0.
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda: on the GPU

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gemma_core  # noqa: E402
from gemma_core import dot_product_attention  # noqa: E402

TIME_TARGET = 2.5      # per-token time at the longest length / at the shortest
MEMORY_TARGET = 1e9    # bytes of activations for one sequence of the longest length
CONFIG = dict(vocabulary_size=32000, num_layers=8, num_query_heads=8,
              num_key_value_heads=1, hidden_dim=512, intermediate_dim=4096,
              head_dim=64, use_sliding_window_attention=True, sliding_window_size=1024,
              attention_logit_soft_cap=50.0)


@contextlib.contextmanager
def block_size(size):
    """Attention traced inside takes the blocked path above `size` tokens."""
    saved = dot_product_attention.BLOCK_SIZE
    dot_product_attention.BLOCK_SIZE = size
    try:
        yield
    finally:
        dot_product_attention.BLOCK_SIZE = saved


def compiled_forward(backbone, length, block):
    """The backbone's forward on one (1, length) sequence, compiled: returns
    (fn(values, ids, mask), compile seconds, temp bytes or None)."""
    fn = jax.jit(lambda values, ids, mask: backbone.stateless_hidden_states(
        values, {"token_ids": ids, "padding_mask": mask}))
    values = [v.value for v in backbone.variables]
    ids = jax.ShapeDtypeStruct((1, length), "int32")
    start = time.perf_counter()
    with block_size(block):
        compiled = fn.lower(values, ids, ids).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return compiled, seconds, getattr(memory, "temp_size_in_bytes", None)


def rss_bytes(field):
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_growth(fn, args):
    """How far one call of `fn` raises the resident memory above what it was
    before: the peak is reset first (Linux: clear_refs 5), else None."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return None
    before = rss_bytes("VmRSS")
    jax.block_until_ready(fn(*args))
    return rss_bytes("VmHWM") - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048,8192",
                        help="comma-separated sequence lengths, shortest first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=dot_product_attention.BLOCK_SIZE,
                        help="attention block size (default: the library's)")
    parser.add_argument("--plain", default="",
                        help="comma-separated lengths to also time with the plain attention")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    print(f"jax {jax.__version__}  devices: {jax.devices()}  "
          f"cpu cores: {os.cpu_count()}  dtype: {args.dtype}  block {args.block}")
    print(f"config: {CONFIG}")
    keras.utils.set_random_seed(0)
    backbone = gemma_core.GemmaBackbone(**{**CONFIG, "dtype": args.dtype})
    values = [v.value for v in backbone.variables]
    rng = np.random.default_rng(0)

    # (name, length, block) per case; a block above the length is the plain path.
    cases = [(f"1 x {n}" + (" plain" if n <= args.block else " blocked"), n, args.block)
             for n in lengths]
    cases += [(f"1 x {n} plain", int(n), int(n)) for n in args.plain.split(",") if n]
    rows = []
    for name, length, block in cases:
        fn, compile_s, temp = compiled_forward(backbone, length, block)
        ids = jnp.asarray(rng.integers(0, CONFIG["vocabulary_size"], (1, length)), "int32")
        call = (fn, (values, ids, jnp.ones((1, length), "int32")))
        jax.block_until_ready(fn(*call[1]))
        rows.append(dict(name=name, length=length, call=call, compile_s=compile_s,
                         temp=temp, samples=[]))
        print(f"compiled {name} in {compile_s:.1f} s", flush=True)

    longest = max(lengths)
    for row in rows:
        row["rss"] = (peak_rss_growth(*row["call"])
                      if row["length"] == longest else None)
    for _ in range(args.repeats):
        for row in rows:
            fn, call_args = row["call"]
            start = time.perf_counter()
            jax.block_until_ready(fn(*call_args))
            row["samples"].append(time.perf_counter() - start)

    def per_token(row):
        return statistics.median(row["samples"]) / row["length"]

    base = per_token(rows[0])
    mb = lambda n: "-" if n is None else f"{n / 2**20:,.0f}"  # noqa: E731
    print()
    print(f"{'case':<20} {'tokens/s':>9} {'us/token':>9} {'vs ' + str(rows[0]['length']):>7} "
          f"{'temp MiB':>9} {'peak RSS +MiB':>14} {'compile s':>10}")
    for row in rows:
        print(f"{row['name']:<20} {1 / per_token(row):>9,.0f} {per_token(row) * 1e6:>9,.0f} "
              f"{per_token(row) / base:>7.2f} {mb(row['temp']):>9} {mb(row['rss']):>14} "
              f"{row['compile_s']:>10.1f}")
    target = next(row for row in rows if row["length"] == longest)
    ratio = per_token(target) / base
    print()
    print(f"target: per-token time at {longest} <= {TIME_TARGET} x at {rows[0]['length']}")
    print(f"{'PASS' if ratio <= TIME_TARGET else 'MISS'}: {ratio:.2f}")
    print(f"target: activation memory at {longest} < {MEMORY_TARGET / 1e9:.0f} GB")
    if target["temp"] is None:
        print("n/a: this backend reports no memory analysis")
    else:
        print(f"{'PASS' if target['temp'] < MEMORY_TARGET else 'MISS'}: "
              f"{target['temp'] / 1e9:.2f} GB compiled temporaries"
              + ("" if target["rss"] is None else
                 f", peak RSS +{target['rss'] / 1e9:.2f} GB"))


if __name__ == "__main__":
    main()
