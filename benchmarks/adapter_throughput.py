"""LoRA adapters: one batch of many adapters against the base model and
against swapping one merged adapter in at a time.

On the mid-size benchmark config (the one forward_throughput.py and
service_throughput.py time; random weights, float32, CPU), loaded into
`worker.sharded_backbone.ShardedBackbone` on a 1 x 1 mesh from a preset
saved to a temporary directory (the object and jitted function a worker
serves with), with R concurrent requests of T tokens (default 8 x 32) and
rank-8 adapters, it measures:

1. mixed: the R rows use R different adapters (slots 1..R) in ONE call of
   `ShardedBackbone.run` (per-row slot ids, stacked factors), twice: with
   query/value adapters (keras_hub form), and with all-linear ones (all
   seven projections, PEFT's factor form, as users' PEFT adapters come).
   The worker's slots hold one set at a time: each set is written into
   slots 1..R once and its tables are swapped in by reference per call;
2. base: the same R rows all on slot 0 through the same compiled function,
   and the plain base model (`selected_hidden_states(..., lora=None)`,
   jitted, no LoRA path at all); each mixed / base throughput against both
   (target: >= 0.8);
3. swapping: the R requests one after another, as a single-adapter server
   would serve them: for each, merge its adapter into the kernels it
   adapts (`kernel + scale * a @ b`, one jitted function over the base
   kernels, factors already on the device) and run that one request
   (1 x T) with the plain base forward; the whole round of R is timed, for
   each adapter set. mixed / swapping throughput (target: >= 3);
4. adapter load to first served result: `write_slot` (host LoraAdapter ->
   device slot table) then the first 1 x T forward using that slot, result
   on the host; p50 and p99 over --loads distinct adapters (target: p50 <
   100 ms). With --service (default), also end to end through a real
   service (ServerThread, one worker on a 1 x 1 mesh, local Ray, auth off):
   `GemmaClient.forward(adapter_id=...)` on an uploaded, non-resident
   adapter (the worker loads it on demand) minus the same request again
   with the adapter resident.

Throughput cases are compiled and warmed first, then interleaved repeat by
repeat (the machines are shared and noisy; only ratios measured in the same
run mean anything); each call ends with its result on the host, as in the
worker. Correctness is asserted on the side: row i of each mixed batch
equals adapter i alone through the merged-kernel path within 1e-4, slot 0
equals the plain base model, and every adapter actually changes the output.
This is a report: it prints PASS/MISS and exits 0 (1 only if a check fails).
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda: on the GPU
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("GEMMA_SERVE_API_KEYS", None)  # auth off for --service

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The mid-size config of forward_throughput.py / service_throughput.py.
MID_CONFIG = dict(vocabulary_size=32000, num_layers=8, num_query_heads=8,
                  num_key_value_heads=1, hidden_dim=512, intermediate_dim=4096,
                  head_dim=64)
MIXED_VS_BASE_TARGET = 0.8     # mixed throughput / base throughput
MIXED_VS_SWAP_TARGET = 3.0     # mixed throughput / swapping throughput
LOAD_P50_TARGET_MS = 100.0     # adapter load to first served result
TOLERANCE = 1e-4               # mixed row i vs adapter i merged, max abs
BF16_TOLERANCE = 0.05          # the same for a bf16 --preset, relative to max |state|


# ---- adapters -------------------------------------------------------------------


def random_adapter(config, rank, alpha, rng, **options):
    """A LoraAdapter on every block's query and value projections (`options`:
    LoraAdapter.random's targets and form). a ~ N(0, 1/d), b ~ N(0, 0.05^2):
    the update is a sizeable fraction of the kernel, so a wrong slot or a
    missing adapter shows far above the tolerance."""
    from gemma_core import LoraAdapter

    return LoraAdapter.random(config, rank, alpha, seed=int(rng.integers(2**31)),
                              std=1 / np.sqrt(config.hidden_dim), b_std=0.05, **options)


# ---- timing ---------------------------------------------------------------------


def interleaved_seconds_per_call(cases, repeats, calls):
    """Median seconds per call of each no-argument callable in `cases`
    (each call ends with its result on the host). Each is warmed twice
    first; then, `repeats` times, every case in turn runs `calls` calls."""
    for fn in cases:
        fn()
        fn()
    samples = [[] for _ in cases]
    for _ in range(repeats):
        for fn, times in zip(cases, samples):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - start) / calls)
    return [statistics.median(times) for times in samples]


def percentile_ms(seconds, q):
    return 1e3 * float(np.percentile(seconds, q))


# ---- in-process measurements ----------------------------------------------------


class Bench:
    """The worker's ShardedBackbone plus the two baselines' functions."""

    def __init__(self, preset, args):
        import jax
        import jax.numpy as jnp

        from gemma_core import lora_targets
        from worker.sharded_backbone import ShardedBackbone
        from worker.worker_config import BatchingConfig, WorkerSpec

        self.jax = jax
        self.spec = WorkerSpec(preset=preset, mesh_shape=(1, 1),
                               max_adapters=max(args.rows, WorkerSpec.max_adapters),
                               max_adapter_rank=args.max_rank)
        self.model = ShardedBackbone(self.spec)
        backbone = self.model.backbone
        self.backbone = backbone
        self.config = backbone.config
        L = self.config.num_layers
        # The worker's output shape: BatchingConfig.layer_slots layer ids,
        # all the last layer here (as `layers=[-1]`).
        self.layer_ids = np.full((BatchingConfig().layer_slots,), L, "int32")

        def plain(values, token_ids, padding_mask, layer_ids):
            with backbone.bound_to(values):
                return backbone.selected_hidden_states(token_ids, padding_mask, layer_ids)

        self._plain = jax.jit(plain)
        self.values = [v.value for v in backbone.variables]

        # (block, target) -> the index of that projection's kernel in `values`.
        position = {id(v): i for i, v in enumerate(backbone.variables)}
        self.kernel_index = {
            (i, target): position[id(getattr(
                block.attention if target in lora_targets.ATTENTION_TARGETS else block,
                target).kernel)]
            for i, block in enumerate(backbone.transformer_layers)
            for target in lora_targets.TARGETS}

        def merge(kernels, factors):
            """kernel + a @ b (scale already in b) on every adapted kernel;
            a PEFT-form query/key/value pair is a (d, r), b (r, n, h)."""
            return {key: kernels[key] + (jnp.einsum("dr,rnh->ndh", a, b)
                                         if a.ndim == 2 and b.ndim == 3 else a @ b)
                    for key, (a, b) in factors.items()}

        self._merge = jax.jit(merge)

    def run(self, token_ids, padding_mask, slot_ids):
        """What the worker runs: (K, B, T, d) on the host."""
        return self.model.run(token_ids, padding_mask, self.layer_ids,
                              np.asarray(slot_ids, "int32"))

    def plain(self, token_ids, padding_mask, values=None):
        """The base model without any LoRA path, (K, B, T, d) on the host."""
        return np.asarray(self._plain(self.values if values is None else values,
                                      token_ids, padding_mask, self.layer_ids))

    def device_factors(self, adapter):
        """{(block, target): (a, scale * b)} on the device, ready to merge."""
        return self.jax.device_put({key: (a, b * adapter.pair_scale(key))
                                    for key, (a, b) in adapter.kernels.items()})

    def merged_values(self, device_factors):
        """The variable values with one adapter merged into its kernels."""
        merged = self._merge({key: self.values[self.kernel_index[key]]
                              for key in device_factors}, device_factors)
        values = list(self.values)
        for key, kernel in merged.items():
            values[self.kernel_index[key]] = kernel
        return values

    def swap_and_run(self, device_factors, token_ids, padding_mask):
        """One single-adapter request: merge, then the plain forward."""
        return self.plain(token_ids, padding_mask, self.merged_values(device_factors))


def tolerance_for(result, reference) -> float:
    """How far a result may be from its reference: float32, TOLERANCE; a
    bf16 checkpoint (--preset), its rounding, relative to the states' scale
    (a merged bf16 kernel rounds W + a @ b once more)."""
    if result.dtype == np.float32:
        return TOLERANCE
    return BF16_TOLERANCE * float(np.max(np.abs(np.asarray(reference, np.float32))))


def throughput(bench, args, rng):
    """Cases 1-3 and the correctness checks; returns a dict of results."""
    from gemma_core import lora_targets

    cfg = bench.config
    R, T = args.rows, args.seq
    sets = {"qv": [random_adapter(cfg, args.rank, args.alpha, rng) for _ in range(R)],
            "all": [random_adapter(cfg, args.rank, args.alpha, rng,
                                   targets=lora_targets.TARGETS, form="peft")
                    for _ in range(R)]}
    # Each set is written into slots 1..R once and its tables kept: the
    # worker's R slots hold one set at a time, and the calls alternate sets.
    tables, factors = {}, {}
    for name, adapters in sets.items():
        for slot, adapter in enumerate(adapters, start=1):
            bench.model.write_slot(slot, adapter)
        tables[name] = bench.model.lora_tables
        factors[name] = [bench.device_factors(a) for a in adapters]
    token_ids = rng.integers(0, cfg.vocabulary_size, (R, T)).astype("int32")
    padding_mask = np.ones((R, T), "int32")
    mixed_slots = np.arange(1, R + 1, dtype="int32")
    base_slots = np.zeros((R,), "int32")

    def mixed(name):
        bench.model.lora_tables = tables[name]  # that set in slots 1..R
        return bench.run(token_ids, padding_mask, mixed_slots)

    def swap_round(name):
        for i in range(R):
            bench.swap_and_run(factors[name][i], token_ids[i:i + 1], padding_mask[i:i + 1])

    def merge_only(name):
        bench.jax.block_until_ready(bench.merged_values(factors[name][0]))

    # Correctness first (this also compiles every function used below).
    slot0 = bench.run(token_ids, padding_mask, base_slots)
    plain = bench.plain(token_ids, padding_mask)
    exact = slot0.dtype == np.float32  # else a bf16 checkpoint: relative checks
    tolerance = tolerance_for(slot0, plain)
    slot0, plain = slot0.astype(np.float32), plain.astype(np.float32)
    base_error = float(np.max(np.abs(slot0 - plain)))
    checks = [(f"slot 0 == plain base model, max |diff| {base_error:.2e}",
               base_error <= tolerance)]
    for name, label in (("qv", "query/value"), ("all", "all-linear")):
        out = mixed(name).astype(np.float32)
        alone = [bench.swap_and_run(factors[name][i], token_ids[i:i + 1],
                                    padding_mask[i:i + 1]).astype(np.float32)
                 for i in range(R)]
        row_error = max(float(np.max(np.abs(out[:, i] - alone[i][:, 0]))) for i in range(R))
        effect = min(float(np.max(np.abs(out[:, i] - plain[:, i]))) for i in range(R))
        checks += [
            (f"{label} mixed row i == adapter i alone (merged kernels), max |diff| "
             f"{row_error:.2e}", row_error <= tolerance),
            (f"every {label} adapter changes its row, min max |diff| vs base {effect:.2e}",
             effect > (100 * TOLERANCE if exact else 2 * tolerance)),
        ]

    cases = {"slot0": lambda: bench.run(token_ids, padding_mask, base_slots),
             "plain": lambda: bench.plain(token_ids, padding_mask),
             "plain_1row": lambda: bench.plain(token_ids[:1], padding_mask[:1])}
    for name in sets:
        cases[f"mixed_{name}"] = functools.partial(mixed, name)
        cases[f"swap_round_{name}"] = functools.partial(swap_round, name)
        cases[f"merge_{name}"] = functools.partial(merge_only, name)
    seconds = interleaved_seconds_per_call(list(cases.values()), args.repeats, args.calls)
    return dict(zip(cases, seconds)), checks


def load_latency(bench, args, rng):
    """Case 4 in-process: write_slot then the first 1 x T forward on it."""
    cfg = bench.config
    T = args.seq
    num_slots = bench.spec.max_adapters
    adapters = [random_adapter(cfg, args.rank, args.alpha, rng) for _ in range(args.loads + 2)]
    token_ids = rng.integers(0, cfg.vocabulary_size, (1, T)).astype("int32")
    padding_mask = np.ones((1, T), "int32")
    for k in range(2):  # warm-up: the slot writer and the 1 x T shape compile
        bench.model.write_slot(1 + k, adapters[k])
        bench.run(token_ids, padding_mask, [1 + k])
    first, writes, warm, outputs = [], [], [], []
    for k, adapter in enumerate(adapters[2:]):
        slot = 1 + k % num_slots
        start = time.perf_counter()
        bench.model.write_slot(slot, adapter)  # blocks until the table is on the device
        written = time.perf_counter()
        out = bench.run(token_ids, padding_mask, [slot])  # result on the host
        done = time.perf_counter()
        again = bench.run(token_ids, padding_mask, [slot])
        warm.append(time.perf_counter() - done)
        first.append(done - start)
        writes.append(written - start)
        outputs.append((out, again))
    # Each first result is that adapter's (not a stale slot's): compare with
    # the merged-kernel path, outside the timing.
    excess = 0.0  # the largest error as a share of its own tolerance
    for adapter, (out, again) in zip(adapters[2:], outputs):
        reference = bench.swap_and_run(bench.device_factors(adapter), token_ids,
                                       padding_mask).astype(np.float32)
        error = max(float(np.max(np.abs(out.astype(np.float32) - reference))),
                    float(np.max(np.abs(again.astype(np.float32) - reference))))
        excess = max(excess, error / tolerance_for(out, reference))
    check = (f"each first result after write_slot == that adapter merged, max |diff| "
             f"{excess:.2f} of its tolerance", excess <= 1.0)
    return dict(first=first, writes=writes, warm=warm), check


# ---- through the service --------------------------------------------------------


def service_latency(spec, config, args, rng, workdir):
    """Case 4 end to end: first use of an uploaded adapter (on-demand slot
    load) minus the same request with the adapter resident."""
    from coordinator.client import GemmaClient
    from coordinator.server_thread import ServerThread
    from coordinator.service_config import ServiceConfig

    files = []
    for k in range(args.service_loads + 1):
        path = os.path.join(workdir, f"adapter-{k}.lora.h5")
        random_adapter(config, args.rank, args.alpha, rng).write_lora_file(path, config)
        files.append(path)
    ids = rng.integers(0, config.vocabulary_size, args.seq).tolist()

    started = time.perf_counter()
    service_config = ServiceConfig(worker=spec, num_workers=1, host="127.0.0.1", port=0,
                                   data_dir=os.path.join(workdir, "data"),
                                   api_keys_file=None)
    server = ServerThread(service_config)
    client = GemmaClient(server.address)
    try:
        names = [client.upload_adapter(f"bench-{k}", path)["adapter_id"]
                 for k, path in enumerate(files)]
        # Warm-up: compiles the 1 x length_bucket(T) forward and the slot
        # writer, and warms the channel, with adapter 0 (not measured).
        for _ in range(3):
            client.forward(token_ids=[ids], adapter_id=names[0], timeout=600)
        print(f"[service] started, {len(names)} adapters uploaded, warmed in "
              f"{time.perf_counter() - started:.1f}s ({server.address})", flush=True)
        loads_before = int(client.model_info()["workers"][0].get("adapter_loads", 0))
        first, warm = [], []
        for name in names[1:]:
            t0 = time.perf_counter()
            client.forward(token_ids=[ids], adapter_id=name, timeout=120)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.forward(token_ids=[ids], adapter_id=name, timeout=120)
            warm.append(time.perf_counter() - t0)
        worker = client.model_info()["workers"][0]
        loads = int(worker.get("adapter_loads", 0)) - loads_before
    finally:
        client.close()
        server.stop()
    check = (f"service: every measured first use loaded its adapter ({loads} loads for "
             f"{len(first)} first uses)", loads == len(first))
    return dict(first=first, warm=warm), check


# ---- main -----------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=MID_CONFIG["num_layers"])
    parser.add_argument("--rows", type=int, default=8,
                        help="concurrent requests = rows of the mixed batch = adapters")
    parser.add_argument("--seq", type=int, default=32, help="tokens per request")
    parser.add_argument("--rank", type=int, default=8, help="rank of every adapter")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--max-rank", type=int, default=None,
                        help="the slot table's rank (default: WorkerSpec's, 16)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3, help="calls per repeat")
    parser.add_argument("--loads", type=int, default=20,
                        help="adapter loads timed in-process")
    parser.add_argument("--service", action=argparse.BooleanOptionalAction, default=True,
                        help="also time first use through a real service (default on)")
    parser.add_argument("--preset", default=None, metavar="DIR",
                        help="a checkpoint to measure instead of the mid config (e.g. the "
                             "random gemma2_2b one real_size.py writes); its own dtype")
    parser.add_argument("--service-loads", type=int, default=20,
                        help="adapter first uses timed through the service")
    args = parser.parse_args()
    from worker.worker_config import WorkerSpec

    if args.max_rank is None:
        args.max_rank = WorkerSpec.max_adapter_rank
    if args.rank > args.max_rank:
        raise SystemExit(f"--rank {args.rank} exceeds --max-rank {args.max_rank}")

    workdir = tempfile.mkdtemp(prefix="gemma-serve-adapter-bench-")
    ray = None
    if args.service:
        import ray

        # Ray first: it forks its processes before JAX starts threads here.
        # address="local": always a private cluster, never one found here.
        # log_to_driver=False: the worker logs every forward at INFO.
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
        logging.getLogger("gemma_serve.server").setLevel(logging.ERROR)  # "no tokenizer"
    try:
        import jax

        import gemma_core

        cfg = {**MID_CONFIG, "num_layers": args.layers}
        print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  "
              f"cpu cores: {os.cpu_count()}  jax {jax.__version__} devices: {jax.devices()}")
        if args.preset:
            print(f"checkpoint: {args.preset} (its config and dtype)")
        else:
            print(f"config: {cfg}, float32, random weights")
        print(f"{args.rows} requests x {args.seq} tokens; adapters rank {args.rank}, "
              f"alpha {args.alpha:g}, on every block's query+value "
              f"(keras_hub form) or all seven projections (all-linear, PEFT form); slot "
              f"table rank {args.max_rank}; repeats {args.repeats} x {args.calls} calls",
              flush=True)
        started = time.perf_counter()
        preset = args.preset or os.path.join(workdir, "mid")
        if not args.preset:
            gemma_core.GemmaBackbone(**cfg).save_to_preset(preset)  # random weights
        bench = Bench(preset, args)
        rng = np.random.default_rng(0)
        print(f"model saved and loaded in {time.perf_counter() - started:.1f}s", flush=True)

        started = time.perf_counter()
        secs, checks = throughput(bench, args, rng)
        print(f"throughput cases done in {time.perf_counter() - started:.1f}s", flush=True)
        started = time.perf_counter()
        loads, check = load_latency(bench, args, rng)
        checks.append(check)
        print(f"in-process loads done in {time.perf_counter() - started:.1f}s", flush=True)
        service = None
        if args.service:
            started = time.perf_counter()
            service, check = service_latency(bench.spec, bench.config, args, rng, workdir)
            checks.append(check)
            print(f"service loads done in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        if ray is not None:
            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    R = args.rows
    rate = {k: R / secs[k] for k in secs}
    rows = []

    def add(name, value, baseline, ratio, target, met, unit):
        rows.append((name, f"{value:.1f} {unit}", f"{baseline:.1f} {unit}", f"{ratio:.2f}",
                     target, "-" if met is None else ("PASS" if met else "MISS")))

    for name, prefix in (("qv", ""), ("all", "all-linear ")):
        mixed = rate[f"mixed_{name}"]
        for what, baseline, target in (
                ("base, same fn (slot 0)", rate["slot0"], MIXED_VS_BASE_TARGET),
                ("plain base (no LoRA)", rate["plain"], MIXED_VS_BASE_TARGET),
                ("swapping merged", rate[f"swap_round_{name}"], MIXED_VS_SWAP_TARGET)):
            add(f"{prefix}mixed vs {what}", mixed, baseline, mixed / baseline,
                f">= {target:g}", mixed / baseline >= target, "req/s")
    warm50 = percentile_ms(loads["warm"], 50)
    for q in (50, 99):
        value = percentile_ms(loads["first"], q)
        baseline = percentile_ms(loads["warm"], q)
        add(f"load->first result p{q} (in-proc)", value, baseline, value / baseline,
            f"< {LOAD_P50_TARGET_MS:g} ms" if q == 50 else "",
            value < LOAD_P50_TARGET_MS if q == 50 else None, "ms")
    if service is not None:
        extra = np.subtract(service["first"], service["warm"])
        for q in (50, 99):
            value = float(np.percentile(extra, q)) * 1e3
            baseline = percentile_ms(service["warm"], q)
            add(f"service first use - warm p{q}", value, baseline, value / baseline,
                f"< {LOAD_P50_TARGET_MS:g} ms" if q == 50 else "",
                value < LOAD_P50_TARGET_MS if q == 50 else None, "ms")

    print()
    header = ("measurement", "value", "baseline", "ratio", "target", "met?")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{widths[i]}}}"
                     for i in range(len(header)))
    print(line.format(*header))
    for r in rows:
        print(line.format(*r))
    print()
    ms = {k: 1e3 * v for k, v in secs.items()}
    print(f"per call (median): slot 0 {R}x{args.seq} {ms['slot0']:.1f} ms, plain base "
          f"{ms['plain']:.1f} ms, plain 1x{args.seq} forward {ms['plain_1row']:.1f} ms")
    for name, label in (("qv", "query/value"), ("all", "all-linear")):
        ceiling = R * (secs["plain_1row"] + secs[f"merge_{name}"]) / secs["plain"]
        print(f"  {label}: mixed {ms[f'mixed_{name}']:.1f} ms; swapping round of {R} "
              f"{ms[f'swap_round_{name}']:.1f} ms (merge alone {ms[f'merge_{name}']:.1f} ms); "
              f"batching gain of the base model itself, {R} x (plain 1x{args.seq} + merge) / "
              f"plain {R}x{args.seq} = {ceiling:.2f}, the most mixed vs swapping can reach")
    print(f"in-process load: write_slot p50 {percentile_ms(loads['writes'], 50):.1f} ms, p99 "
          f"{percentile_ms(loads['writes'], 99):.1f} ms; warm 1x{args.seq} run p50 "
          f"{warm50:.1f} ms; {len(loads['first'])} loads into "
          f"{bench.spec.max_adapters} slots (rank-{args.max_rank} table)")
    if service is not None:
        print(f"service: first use p50 {percentile_ms(service['first'], 50):.1f} ms, p99 "
              f"{percentile_ms(service['first'], 99):.1f} ms; warm p50 "
              f"{percentile_ms(service['warm'], 50):.1f} ms; {len(service['first'])} loads "
              f"(one worker, 1x1 mesh, Ray worker niced, sharing the cores with the client)")
    print(f"note: {os.cpu_count()} CPU cores, jax devices {jax.devices()}; "
          "ratios are from the same run, absolute rates vary with machine load")
    failed = [text for text, ok in checks if not ok]
    for text, ok in checks:
        print(f"check {'ok' if ok else 'FAILED'}: {text}")
    if failed:
        raise AssertionError("the benchmark computed something wrong: " + "; ".join(failed))


if __name__ == "__main__":
    main()
