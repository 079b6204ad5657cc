"""LoRA adapters: one batch of many adapters against the base model and
against swapping one merged adapter in at a time.

On the mid-size benchmark config (the one forward_throughput.py and
service_throughput.py time; random weights, float32, CPU), loaded into
`worker.sharded_backbone.ShardedBackbone` on a 1 x 1 mesh from a preset
saved to a temporary directory (the object and jitted function a worker
serves with), with R concurrent requests of T tokens (default 8 x 32) and
rank-8 adapters, it measures:

1. mixed: the R rows use R different adapters (slots 1..R) in ONE call of
   `ShardedBackbone.run` (per-row slot ids, stacked factors);
2. base: the same R rows all on slot 0 through the same compiled function,
   and the plain base model (`selected_hidden_states(..., lora=None)`,
   jitted, no LoRA path at all); mixed / base throughput against both
   (target: >= 0.8);
3. swapping: the R requests one after another, as a single-adapter server
   would serve them: for each, merge its adapter into the query/value
   kernels (`kernel + scale * a @ b`, one jitted function over the base
   kernels, factors already on the device) and run that one request
   (1 x T) with the plain base forward; the whole round of R is timed.
   mixed / swapping throughput (target: >= 3);
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
worker. Correctness is asserted on the side: row i of the mixed batch equals
adapter i alone through the merged-kernel path within 1e-4, slot 0 equals
the plain base model, and every adapter actually changes the output.
This is a report: it prints PASS/MISS and exits 0 (1 only if a check fails).
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # JAX_PLATFORMS=cuda: on the GPU
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.pop("GEMMA_SERVE_API_KEYS", None)  # auth off for --service

import argparse  # noqa: E402
import datetime  # noqa: E402
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


# ---- adapters -------------------------------------------------------------------


def random_adapter(config, rank, alpha, rng):
    """A LoraAdapter on every block's query and value projections. a ~ N(0,
    1/d), b ~ N(0, 0.05^2): the update is a sizeable fraction of the kernel,
    so a wrong slot or a missing adapter shows far above the tolerance."""
    from gemma_core import LoraAdapter

    return LoraAdapter.random(config, rank, alpha, seed=int(rng.integers(2**31)),
                              std=1 / np.sqrt(config.hidden_dim), b_std=0.05)


def stacked_factors(adapter, num_layers):
    """(a_q (L, N, d, r), b_q (L, r, h), a_v (L, K, d, r), b_v (L, r, h)),
    unscaled, as numpy."""
    return tuple(np.stack([adapter.kernels[(block, target)][i] for block in range(num_layers)])
                 for target in ("query", "value") for i in (0, 1))


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

        def index_of(variable):
            return next(i for i, v in enumerate(backbone.variables) if v is variable)

        self.query_index = [index_of(block.attention.query.kernel)
                            for block in backbone.transformer_layers]
        self.value_index = [index_of(block.attention.value.kernel)
                            for block in backbone.transformer_layers]

        def merge(query_kernels, value_kernels, a_q, b_q, a_v, b_v, scale):
            """kernel + scale * a @ b on every block's query and value."""
            return ([k + scale * jnp.einsum("ndr,rh->ndh", a_q[i], b_q[i])
                     for i, k in enumerate(query_kernels)],
                    [k + scale * jnp.einsum("ndr,rh->ndh", a_v[i], b_v[i])
                     for i, k in enumerate(value_kernels)])

        self._merge = jax.jit(merge)
        self.base_query = [self.values[i] for i in self.query_index]
        self.base_value = [self.values[i] for i in self.value_index]

    def run(self, token_ids, padding_mask, slot_ids):
        """What the worker runs: (K, B, T, d) on the host."""
        return self.model.run(token_ids, padding_mask, self.layer_ids,
                              np.asarray(slot_ids, "int32"))

    def plain(self, token_ids, padding_mask, values=None):
        """The base model without any LoRA path, (K, B, T, d) on the host."""
        return np.asarray(self._plain(self.values if values is None else values,
                                      token_ids, padding_mask, self.layer_ids))

    def merged_values(self, device_factors, scale):
        """The variable values with one adapter merged into query/value."""
        query, value = self._merge(self.base_query, self.base_value, *device_factors,
                                   np.float32(scale))
        values = list(self.values)
        for i, kernel in zip(self.query_index, query):
            values[i] = kernel
        for i, kernel in zip(self.value_index, value):
            values[i] = kernel
        return values

    def swap_and_run(self, device_factors, scale, token_ids, padding_mask):
        """One single-adapter request: merge, then the plain forward."""
        return self.plain(token_ids, padding_mask, self.merged_values(device_factors, scale))


def throughput(bench, args, rng):
    """Cases 1-3 and the correctness checks; returns a dict of results."""
    jax = bench.jax
    cfg = bench.config
    R, T = args.rows, args.seq
    adapters = [random_adapter(cfg, args.rank, args.alpha, rng) for _ in range(R)]
    for slot, adapter in enumerate(adapters, start=1):
        bench.model.write_slot(slot, adapter)
    device_factors = [jax.device_put(stacked_factors(a, cfg.num_layers)) for a in adapters]
    token_ids = rng.integers(0, cfg.vocabulary_size, (R, T)).astype("int32")
    padding_mask = np.ones((R, T), "int32")
    mixed_slots = np.arange(1, R + 1, dtype="int32")
    base_slots = np.zeros((R,), "int32")

    # Correctness first (this also compiles every function used below).
    mixed = bench.run(token_ids, padding_mask, mixed_slots)
    slot0 = bench.run(token_ids, padding_mask, base_slots)
    plain = bench.plain(token_ids, padding_mask)
    alone = [bench.swap_and_run(device_factors[i], adapters[i].scale,
                                token_ids[i:i + 1], padding_mask[i:i + 1])
             for i in range(R)]
    row_error = max(float(np.max(np.abs(mixed[:, i] - alone[i][:, 0]))) for i in range(R))
    base_error = float(np.max(np.abs(slot0 - plain)))
    effect = min(float(np.max(np.abs(mixed[:, i] - plain[:, i]))) for i in range(R))
    checks = [
        (f"mixed row i == adapter i alone (merged kernels), max |diff| {row_error:.2e}",
         row_error <= TOLERANCE),
        (f"slot 0 == plain base model, max |diff| {base_error:.2e}", base_error <= TOLERANCE),
        (f"every adapter changes its row, min max |diff| vs base {effect:.2e}",
         effect > 100 * TOLERANCE),
    ]

    def mixed_call():
        bench.run(token_ids, padding_mask, mixed_slots)

    def slot0_call():
        bench.run(token_ids, padding_mask, base_slots)

    def plain_call():
        bench.plain(token_ids, padding_mask)

    def swap_round():
        for i in range(R):
            bench.swap_and_run(device_factors[i], adapters[i].scale,
                               token_ids[i:i + 1], padding_mask[i:i + 1])

    def merge_only():
        jax.block_until_ready(bench.merged_values(device_factors[0], adapters[0].scale))

    def plain_one_row():
        bench.plain(token_ids[:1], padding_mask[:1])

    names = ["mixed", "slot0", "plain", "swap_round", "merge", "plain_1row"]
    seconds = interleaved_seconds_per_call(
        [mixed_call, slot0_call, plain_call, swap_round, merge_only, plain_one_row],
        args.repeats, args.calls)
    return dict(zip(names, seconds)), checks


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
    error = 0.0
    for adapter, (out, again) in zip(adapters[2:], outputs):
        factors = bench.jax.device_put(stacked_factors(adapter, cfg.num_layers))
        reference = bench.swap_and_run(factors, adapter.scale, token_ids, padding_mask)
        error = max(error, float(np.max(np.abs(out - reference))),
                    float(np.max(np.abs(again - reference))))
    check = (f"each first result after write_slot == that adapter merged, max |diff| "
             f"{error:.2e}", error <= TOLERANCE)
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
        print(f"config: {cfg}, float32, random weights")
        print(f"{args.rows} requests x {args.seq} tokens; adapters rank {args.rank}, "
              f"alpha {args.alpha:g}, all {cfg['num_layers']} blocks' query+value; slot "
              f"table rank {args.max_rank}; repeats {args.repeats} x {args.calls} calls",
              flush=True)
        started = time.perf_counter()
        preset = os.path.join(workdir, "mid")
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
    rate = {k: R / secs[k] for k in ("mixed", "slot0", "plain", "swap_round")}
    rows = []

    def add(name, value, baseline, ratio, target, met, unit):
        rows.append((name, f"{value:.1f} {unit}", f"{baseline:.1f} {unit}", f"{ratio:.2f}",
                     target, "-" if met is None else ("PASS" if met else "MISS")))

    add("mixed vs base, same fn (slot 0)", rate["mixed"], rate["slot0"],
        rate["mixed"] / rate["slot0"], f">= {MIXED_VS_BASE_TARGET}",
        rate["mixed"] / rate["slot0"] >= MIXED_VS_BASE_TARGET, "req/s")
    add("mixed vs plain base (no LoRA)", rate["mixed"], rate["plain"],
        rate["mixed"] / rate["plain"], f">= {MIXED_VS_BASE_TARGET}",
        rate["mixed"] / rate["plain"] >= MIXED_VS_BASE_TARGET, "req/s")
    add("mixed vs swapping merged", rate["mixed"], rate["swap_round"],
        rate["mixed"] / rate["swap_round"], f">= {MIXED_VS_SWAP_TARGET:g}",
        rate["mixed"] / rate["swap_round"] >= MIXED_VS_SWAP_TARGET, "req/s")
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
    print(f"per call (median): mixed {R}x{args.seq} {1e3 * secs['mixed']:.1f} ms, slot 0 "
          f"{1e3 * secs['slot0']:.1f} ms, plain base {1e3 * secs['plain']:.1f} ms; swapping "
          f"round of {R} {1e3 * secs['swap_round']:.1f} ms (merge alone "
          f"{1e3 * secs['merge']:.1f} ms, plain 1x{args.seq} forward "
          f"{1e3 * secs['plain_1row']:.1f} ms)")
    ceiling = R * (secs["plain_1row"] + secs["merge"]) / secs["plain"]
    print(f"batching gain of the base model itself: {R} x (plain 1x{args.seq} + merge) / "
          f"plain {R}x{args.seq} = {ceiling:.2f}, the most mixed vs swapping can reach here")
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
