"""Real-size benchmark: gemma_core, transformers and the service on one checkpoint.

Measures, in one run, on a random-weight checkpoint of the exact gemma2_2b
architecture (or, with --config, any built-in preset's, or the small `mid`
/ `mid2` configs for a quick look):

* the checkpoint: written once in Hugging Face format (config.json with the
  real hyper-parameters, bfloat16 safetensors shards, the repo's bundled
  SentencePiece model as tokenizer.model) under --workdir, one tensor at a
  time (random_checkpoint.py), and reused by later runs;
* in-process forward, for each dtype (bfloat16, float32) and shape (batch x
  tokens: 8x128, 1x32, 1x2048): gemma_core as a worker builds and runs it
  (`ShardedBackbone.run`, the jitted function the service runs, mesh 1x1, in
  the environment Ray gives a worker) and transformers' `AutoModel` (the base
  model without LM head, torch, `inference_mode`, as many threads as XLA
  gets: one per core) on the same files. Each case is its own process
  (real_size_inproc.py), so resident memory is per case and only one model
  is in memory at a time; the first call (with JAX: the compilation) is
  reported apart, then --warmup untimed calls, then --repeats timed calls.
  The cases run in --rounds rounds, each round every case once, the two
  libraries side by side and their order swapped each round, so that
  background load on a shared machine hits both alike; the median over all
  rounds' calls is the figure. tokens/s = batch x tokens / median seconds;
  `vs peer` = gemma_core tokens/s / transformers tokens/s (same dtype and
  shape). Memory: VmHWM after loading (the loading peak), VmHWM at the end
  (the peak) and VmRSS at the end (steady), next to the bytes of the weights
  in that dtype and, for gemma_core, `plan_memory`'s estimate for that
  shape (weights + adapter slots + activations);
* a sanity check: the final hidden states of one fixed 1x32 input from both
  libraries, max |difference| in each dtype (float32 should agree to ~1e-5);
* the service (--cases service): `gemma-serve --preset <dir> --workers 1
  --mesh 1x1 --port 0 --dtype <dtype>` as a subprocess on a fresh data
  directory (cold: nothing compiled, nothing cached), the time from start to
  its ready line; then 1 and 16 concurrent clients (AsyncGemmaClient, one
  channel each, back to back) sending --service-requests requests each of
  one 128-token sequence; tokens/s, p50/p99, the slowest request over its
  pass's median (a compilation after ready shows there), the ratio to the
  in-process gemma_core rate on the batch the worker pads C rows to
  (batch_bucket(C) x length_bucket(128), timed as an extra in-process case),
  and the worker's resident memory (pid from GetModelInfo, /proc) against
  what `gemma-serve plan` computes for it (called as a library; with
  --largest-bucket one request first fills the largest bucket the plan counts,
  so the peak includes those activations); then a second start on the same
  data directory (warm) and its time to ready, and one 1-client pass.

torch runs with OMP_WAIT_POLICY=PASSIVE unless the environment sets it: its
OpenMP threads otherwise spin between parallel regions, and on a shared
machine a spinning thread that loses its core stalls every region (see
benchmarks/README.md for what that costs).

It prints the environment (CPU model, cores, flags that matter for bf16,
versions, XLA_FLAGS, threads), one table per part, and the issue's targets
as PASS/MISS lines with the measured ratio (SKIP where this run did not
measure it); --json writes everything, raw samples included. A report, not
a test: it exits 0 unless a case failed.

    make bench-real                                   # installs .[bench], then runs this
    .venv/bin/python benchmarks/real_size.py --config mid --repeats 3
    .venv/bin/python benchmarks/real_size.py --cases inproc --shapes 8x128,1x32 --repeats 3
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "jax"
# This process only plans and orchestrates; the cases get their own platform.
_USER_JAX_PLATFORMS = os.environ.get("JAX_PLATFORMS")
os.environ["JAX_PLATFORMS"] = "cpu"

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from gemma_core import GEMMA_PRESETS, GemmaConfig  # noqa: E402
from proc_memory import mem_available  # noqa: E402  (benchmarks/, beside this file)
from random_checkpoint import ensure_checkpoint  # noqa: E402

LIBRARIES = ("gemma_core", "transformers")
DTYPES = ("bfloat16", "float32")
ITEMSIZE = {"bfloat16": 2, "float32": 4}
GB = 1e9
# The issue's targets.
SPEED_TARGET = 1.0          # gemma_core / transformers tokens/s at 8x128, same dtype
LATENCY_TARGET = 1.5        # gemma_core / transformers latency at 1x32
MEMORY_TARGET = 1.3         # worker peak / (weights + largest-bucket activations)
STALL_TARGET = 2.0          # slowest request after ready / its pass's median
SERVICE_TARGET = 0.9          # service tokens/s at the most clients / in-process, same batch shape
RESTART_TARGET = 1 / 3      # warm time to ready / cold


def small_configs() -> dict[str, GemmaConfig]:
    """`mid`: forward_throughput.py's config (Gemma 1 style); `mid2`: the same
    sizes with Gemma 2's post norms, caps and a 1024-token window."""
    mid = dict(vocabulary_size=32000, num_layers=8, num_query_heads=8,
               num_key_value_heads=1, hidden_dim=512, intermediate_dim=4096, head_dim=64)
    return {"mid": GemmaConfig(**mid),
            "mid2": GemmaConfig(**mid, use_post_attention_norm=True, use_post_ffw_norm=True,
                                attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0,
                                use_sliding_window_attention=True, sliding_window_size=1024)}


def resolve_config(name: str, layers: int | None) -> GemmaConfig:
    configs = small_configs()
    if name in configs:
        config = configs[name]
    elif name in GEMMA_PRESETS:
        config = GEMMA_PRESETS[name]["config"]
    else:
        raise SystemExit(f"unknown --config {name!r}: use mid, mid2 or a built-in preset "
                         f"({', '.join(sorted(GEMMA_PRESETS))})")
    if layers:
        config = GemmaConfig(**{**config.to_kwargs(), "num_layers": layers})
    return config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="gemma2_2b_en",
                   help="a built-in preset name (its architecture, random weights), or mid "
                        "/ mid2 (small, for a quick look); default %(default)s")
    p.add_argument("--layers", type=int, default=None, help="override the config's layers")
    p.add_argument("--workdir", default="~/.cache/gemma-serve-bench",
                   help="where the checkpoint, logs and service data dirs live "
                        "(default %(default)s)")
    p.add_argument("--cases", default="inproc,service",
                   help="comma-separated: inproc, service (default %(default)s)")
    p.add_argument("--libraries", default=",".join(LIBRARIES),
                   help="in-process libraries (default %(default)s)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="default %(default)s")
    p.add_argument("--shapes", default="8x128,1x32,1x2048",
                   help="in-process batch x tokens (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case and round")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed calls after the first one (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1,
                   help="times every case runs, in its own process each time")
    p.add_argument("--gemma-fn", choices=("worker", "library"), default="worker",
                   help="gemma_core's timed function: ShardedBackbone.run (what the service "
                        "runs) or backbone.make_forward_fn(layers=[-1])")
    p.add_argument("--clients", default="1,16", help="service concurrency levels")
    p.add_argument("--service-requests", type=int, default=4,
                   help="requests per client and pass (default %(default)s)")
    p.add_argument("--service-length", type=int, default=128, help="tokens per request")
    p.add_argument("--largest-bucket", action="store_true",
                   help="after the cold start's passes, one request filling the largest "
                        "bucket that `gemma-serve plan` plans for (16 x 1024 tokens by "
                        "default: minutes at real size on a CPU), so the worker's peak "
                        "includes the activations the plan counts")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads for both libraries and the worker (default: one "
                        "per core this process may use)")
    p.add_argument("--gpus", action="store_true",
                   help="gemma_core on JAX_PLATFORMS=cuda, torch on cuda if it has it, "
                        "gemma-serve --gpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-timeout", type=float, default=7200.0, help="seconds per process")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.cases = _listed(args.cases, ("inproc", "service"), "--cases")
    args.libraries = _listed(args.libraries, LIBRARIES, "--libraries")
    args.dtypes = _listed(args.dtypes, DTYPES, "--dtypes")
    args.clients = [int(c) for c in args.clients.split(",") if c]
    try:
        args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")
                       if s]
    except ValueError:
        p.error(f"--shapes takes BATCHxTOKENS,..., got {args.shapes!r}")
    if any(len(s) != 2 or min(s) < 1 for s in args.shapes):
        p.error(f"--shapes takes BATCHxTOKENS,..., got {args.shapes!r}")
    if args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--repeats and --rounds must be >= 1, --warmup >= 0")
    args.threads = args.threads or len(os.sched_getaffinity(0))
    return args


def _listed(text, allowed, flag):
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = set(items) - set(allowed)
    if unknown:
        raise SystemExit(f"{flag}: unknown {sorted(unknown)}; choose from {', '.join(allowed)}")
    return items


def shape_name(shape) -> str:
    return "x".join(map(str, shape))


# ---- environment ------------------------------------------------------------------


def cpu_description() -> tuple[str, list[str]]:
    """(model name, the flags that matter for bf16 and wide matmuls)."""
    model, flags = platform.processor() or "?", []
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
              "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
    return model, [f for f in wanted if f in flags]


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(args, gemma_env, transformers_env) -> dict:
    model, flags = cpu_description()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": model, "cpu_flags": flags, "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        "mem_available_gb": mem_available() / GB, "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in
                     ("jax", "jaxlib", "keras", "numpy", "ml_dtypes", "torch", "transformers",
                      "safetensors")},
        "gemma_core_env": {k: gemma_env.get(k) for k in
                           ("JAX_PLATFORMS", "XLA_FLAGS", "PJRT_NPROC")},
        "transformers_env": {k: transformers_env.get(k) for k in
                             ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
        "threads": args.threads,
    }


def print_environment(env: dict) -> None:
    v = env["versions"]
    print(f"{env['date']}  {env['cpu']}  {env['cores']} cores ({env['cores_usable']} usable)  "
          f"{env['mem_total_gb']:.1f} GB, {env['mem_available_gb']:.1f} available  "
          f"load {', '.join(f'{x:.1f}' for x in env['load_average'])}")
    print(f"cpu flags: {' '.join(env['cpu_flags']) or '(none of avx2/avx512/amx)'}")
    print(f"python {env['python']}  jax {v['jax']} (jaxlib {v['jaxlib']})  keras {v['keras']}  "
          f"torch {v['torch']}  transformers {v['transformers']}  numpy {v['numpy']}")
    g = env["gemma_core_env"]
    print(f"gemma_core: JAX_PLATFORMS={g['JAX_PLATFORMS']} XLA_FLAGS={g['XLA_FLAGS']!r} "
          f"PJRT_NPROC={g['PJRT_NPROC'] or '(unset: a thread per core)'}")
    print(f"transformers: torch threads {env['threads']}, OMP_WAIT_POLICY="
          f"{env['transformers_env']['OMP_WAIT_POLICY']}")


# ---- in-process cases -------------------------------------------------------------


def gemma_environment(args) -> dict:
    """The variables a worker actor starts with (worker.actor_options),
    on top of this process's, without the ones that would steer JAX here."""
    from worker.worker_config import WorkerSpec
    from worker.actor_options import actor_options

    spec = WorkerSpec(preset="unused", mesh_shape=(1, 1), use_gpus=args.gpus,
                      cpus=args.threads if args.threads != len(os.sched_getaffinity(0))
                      else None)
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "PJRT_NPROC")}
    env.update(actor_options(spec)["runtime_env"]["env_vars"])
    if args.gpus:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # memory as used
    elif _USER_JAX_PLATFORMS and _USER_JAX_PLATFORMS != "cpu":
        print(f"note: JAX_PLATFORMS={_USER_JAX_PLATFORMS} is ignored without --gpus")
    return env


def plan_cases(args) -> list[dict]:
    """Every round's cases in order: per shape and dtype the two libraries
    side by side (order swapped every round), then gemma_core alone on the
    shapes the service's passes are compared with."""
    cases = []
    baseline = service_shapes(args) if "service" in args.cases else []
    for round_index in range(args.rounds):
        libraries = args.libraries if round_index % 2 == 0 else args.libraries[::-1]
        if "inproc" in args.cases:
            for shape in args.shapes:
                for dtype in args.dtypes:
                    cases += [dict(library=lib, dtype=dtype, shape=shape, round=round_index)
                              for lib in libraries]
        for shape in baseline:
            if "inproc" in args.cases and shape in args.shapes and \
                    "gemma_core" in args.libraries:
                continue
            cases += [dict(library="gemma_core", dtype=dtype, shape=shape, round=round_index)
                      for dtype in args.dtypes]
    if "inproc" in args.cases:  # one parity output per library and dtype, in round 0
        parity_shape = (1, 32) if (1, 32) in args.shapes else args.shapes[0]
        for case in cases:
            case["parity"] = case["round"] == 0 and case["shape"] == parity_shape
    return cases


def service_shapes(args) -> list[tuple[int, int]]:
    from worker.worker_config import BatchingConfig

    batching = BatchingConfig()
    length = batching.length_bucket(args.service_length)
    return [(batching.batch_bucket(c), length) for c in args.clients]


def run_case(case, args, checkpoint, workdir, envs, log) -> dict:
    name = f"{case['library']}-{case['dtype']}-{shape_name(case['shape'])}-r{case['round']}"
    parity = str(workdir / "parity" / f"{case['library']}-{case['dtype']}.npy") \
        if case.get("parity") else None
    spec = dict(library=case["library"], dtype=case["dtype"], shape=list(case["shape"]),
                preset=str(checkpoint), warmup=args.warmup, repeats=args.repeats,
                seed=args.seed, gpus=args.gpus, threads=args.threads, parity=parity,
                fn=args.gemma_fn)
    log_path = workdir / "logs" / f"{name}.log"
    log(f"[{name}] start (MemAvailable {mem_available() / GB:.1f} GB)")
    started = time.perf_counter()
    with open(log_path, "w") as out:
        try:
            proc = subprocess.run([sys.executable, str(HERE / "real_size_inproc.py"),
                                   json.dumps(spec)], env=envs[case["library"]], stdout=out,
                                  stderr=subprocess.STDOUT, timeout=args.case_timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    text = log_path.read_text()
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        tail = "\n    ".join(text.splitlines()[-15:])
        log(f"[{name}] FAILED (exit {code}) after {time.perf_counter() - started:.0f}s; "
            f"{log_path}:\n    {tail}")
        return {**case, "error": f"exit {code}", "log": str(log_path)}
    result = json.loads(lines[-1][len("RESULT "):])
    median = statistics.median(result["times"])
    log(f"[{name}] load {result['load_s']:.1f}s, first call {result['first_s']:.2f}s, "
        f"median {median:.3f}s/call, peak {result['mem_end']['VmHWM'] / GB:.2f} GB "
        f"({time.perf_counter() - started:.0f}s)")
    return {**case, **result, "parity_file": parity}


def summarize_inproc(results, config) -> list[dict]:
    """One row per (library, dtype, shape): every round's calls pooled."""
    from gemma_core.memory_plan import plan_memory
    from worker.worker_config import BatchingConfig, WorkerSpec

    rows = {}
    for r in results:
        if "error" in r:
            continue
        key = (r["library"], r["dtype"], tuple(r["shape"]))
        rows.setdefault(key, []).append(r)
    out = []
    for (library, dtype, shape), runs in rows.items():
        times = [t for r in runs for t in r["times"]]
        median = statistics.median(times)
        row = dict(library=library, dtype=dtype, shape=shape, runs=len(runs), calls=len(times),
                   seconds=median, tokens_per_s=shape[0] * shape[1] / median,
                   load_s=statistics.median(r["load_s"] for r in runs),
                   first_s=statistics.median(r["first_s"] for r in runs),
                   base=statistics.median(r["mem_base"]["VmRSS"] for r in runs),
                   load_peak=max(r["mem_loaded"]["VmHWM"] for r in runs),
                   peak=max(r["mem_end"]["VmHWM"] for r in runs),
                   steady=statistics.median(r["mem_end"]["VmRSS"] for r in runs),
                   weights=config.num_parameters() * ITEMSIZE[dtype],
                   finite=all(r["finite"] for r in runs),
                   device_peak=max((r["device_peak"] or 0) for r in runs) or None,
                   describe=runs[0]["describe"])
        if library == "gemma_core":
            plan = plan_memory(config, (1, 1), dtype, rows=shape[0], length=shape[1],
                               layer_slots=BatchingConfig().layer_slots,
                               max_adapters=WorkerSpec.max_adapters,
                               max_adapter_rank=WorkerSpec.max_adapter_rank)
            row["plan"] = plan.total_bytes
        out.append(row)
    for row in out:
        peer = next((p for p in out if p["library"] == "transformers"
                     and p["dtype"] == row["dtype"] and p["shape"] == row["shape"]), None)
        if row["library"] == "gemma_core" and peer:
            row["vs_peer"] = row["tokens_per_s"] / peer["tokens_per_s"]
    # By dtype, then shapes in the order they ran (as asked, then the
    # service's baselines), the peer under each gemma_core row.
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in results))
    order = {lib: i for i, lib in enumerate(LIBRARIES)}
    out.sort(key=lambda r: (r["dtype"], shapes.index(r["shape"]), order[r["library"]]))
    return out


def print_inproc(rows, args) -> None:
    print()
    print(f"in-process forward: median seconds per call over {args.rounds} round(s) x "
          f"{args.repeats} calls, after the first call and {args.warmup} warm-up call(s); "
          f"memory in GB (1e9 bytes) from /proc")
    head = (f"{'library':<13}{'dtype':<10}{'shape':>7}{'load s':>8}{'first s':>9}"
            f"{'s/call':>9}{'tokens/s':>10}{'vs peer':>8}{'weights':>9}{'base':>6}{'load pk':>9}"
            f"{'peak':>7}{'steady':>8}{'pk/w':>6}{'plan':>7}{'pk/plan':>8}")
    print(head)
    for r in rows:
        plan = r.get("plan")
        vs_peer = f"{r['vs_peer']:.2f}" if "vs_peer" in r else "-"
        plan_text = f"{plan / GB:.2f}" if plan else "-"
        per_plan = f"{r['peak'] / plan:.2f}" if plan else "-"
        print(f"{r['library']:<13}{r['dtype']:<10}{shape_name(r['shape']):>7}"
              f"{r['load_s']:>8.1f}{r['first_s']:>9.2f}{r['seconds']:>9.3f}"
              f"{r['tokens_per_s']:>10.1f}{vs_peer:>8}"
              f"{r['weights'] / GB:>9.2f}{r['base'] / GB:>6.2f}{r['load_peak'] / GB:>9.2f}"
              f"{r['peak'] / GB:>7.2f}"
              f"{r['steady'] / GB:>8.2f}{r['peak'] / r['weights']:>6.2f}"
              f"{plan_text:>7}{per_plan:>8}" + ("" if r["finite"] else "  NOT FINITE"))
    devices = {f"{r['library']}: {r['describe']}" for r in rows}
    for line in sorted(devices):
        print(f"  {line}")
    if any(r["device_peak"] for r in rows):
        for r in rows:
            if r["device_peak"]:
                print(f"  device peak {r['library']} {r['dtype']} {shape_name(r['shape'])}: "
                      f"{r['device_peak'] / GB:.2f} GB")


def parity(results) -> list[dict]:
    files = {(r["library"], r["dtype"]): r["parity_file"] for r in results
             if r.get("parity_file") and "error" not in r}
    out = []
    for dtype in DTYPES:
        if all((lib, dtype) in files for lib in LIBRARIES):
            a, b = (np.load(files[(lib, dtype)]) for lib in LIBRARIES)
            out.append(dict(dtype=dtype, max_abs_diff=float(np.abs(a - b).max()),
                            mean_abs_diff=float(np.abs(a - b).mean()),
                            max_abs_value=float(np.abs(b).max())))
    return out


# ---- service ----------------------------------------------------------------------


def run_service(args, checkpoint, config, workdir, inproc_rows, log) -> list[dict]:
    from coordinator import plan_cli
    from real_size_service import serve_session

    sessions = []
    for dtype in args.dtypes:
        data_dir = workdir / f"serve-data-{dtype}"
        shutil.rmtree(data_dir, ignore_errors=True)
        plan_args = plan_cli.parse_args(["--preset", str(checkpoint), "--dtype", dtype])
        plan_config, plan_dtype, _ = plan_cli.resolve(plan_args.preset, plan_args.dtype)
        # What `gemma-serve plan` prints as total (its _plan, the same defaults).
        plan = plan_cli._plan(plan_args, plan_config, plan_args.mesh, plan_dtype)
        for start in ("cold", "warm"):
            log(f"[service {dtype} {start}] starting gemma-serve (MemAvailable "
                f"{mem_available() / GB:.1f} GB)")
            try:
                session = serve_session(
                    checkpoint, data_dir, dtype, gpus=args.gpus,
                    log_path=workdir / "logs" / f"serve-{dtype}-{start}.log",
                    clients=args.clients if start == "cold" else args.clients[:1],
                    requests_each=args.service_requests, length=args.service_length,
                    vocabulary_size=config.vocabulary_size, seed=args.seed,
                    timeout_s=args.case_timeout, progress=log,
                    cpus=args.threads if args.threads != len(os.sched_getaffinity(0))
                    else None,
                    largest=(plan.rows, plan.length) if args.largest_bucket and
                    start == "cold" else None)
            except Exception as error:  # noqa: BLE001 - reported, the run goes on
                log(f"[service {dtype} {start}] FAILED: {error}\n{traceback.format_exc()}")
                sessions.append(dict(dtype=dtype, start=start, error=str(error)))
                break
            session.update(dtype=dtype, start=start, plan=plan.total_bytes,
                           plan_weights=plan.weight_bytes,
                           plan_activations=plan.activation_bytes,
                           plan_batch=f"{plan.rows}x{plan.length}")
            for p in session["passes"]:
                lat = p["latencies"]
                p["p50"], p["p99"] = float(np.median(lat)), float(np.percentile(lat, 99))
                p["slowest_over_p50"] = max(lat) / p["p50"]
                p["slowest_sent_at_s"] = p["sent_at_s"][int(np.argmax(lat))]
                shape = service_shapes(args)[args.clients.index(p["clients"])]
                base = next((r for r in inproc_rows if r["library"] == "gemma_core"
                             and r["dtype"] == dtype and r["shape"] == shape), None)
                p["inproc_shape"] = shape
                if base:
                    rate = p["clients"] * args.service_length / base["seconds"]
                    p["inproc_tokens_per_s"], p["ratio"] = rate, p["tokens_per_s"] / rate
            sessions.append(session)
    return sessions


def print_service(sessions, args) -> None:
    print()
    print(f"service: gemma-serve, 1 worker, mesh 1x1; each request 1 x {args.service_length} "
          f"tokens, layers [-1], mean pooling; {args.service_requests} requests per client; "
          "worker memory from /proc (GB)")
    print(f"{'dtype':<10}{'start':<6}{'ready s':>8}{'clients':>8}{'reqs':>6}{'tokens/s':>10}"
          f"{'p50 ms':>9}{'p99 ms':>9}{'max/p50':>8}{'in-proc':>9}{'in-proc t/s':>12}"
          f"{'ratio':>7}{'worker':>8}{'peak':>7}{'plan':>7}{'pk/plan':>8}")
    for s in sessions:
        if "error" in s:
            print(f"{s['dtype']:<10}{s['start']:<6}  FAILED: {s['error'].splitlines()[0]}")
            continue
        for i, p in enumerate(s["passes"]):
            ready = f"{s['ready_s']:.1f}" if i == 0 else ""
            mem = p["worker_mem"] or {}
            ratio = f"{p['ratio']:.2f}" if "ratio" in p else "-"
            rate = f"{p['inproc_tokens_per_s']:.1f}" if "inproc_tokens_per_s" in p else "-"
            print(f"{s['dtype']:<10}{s['start']:<6}{ready:>8}{p['clients']:>8}"
                  f"{p['requests']:>6}{p['tokens_per_s']:>10.1f}{1e3 * p['p50']:>9.0f}"
                  f"{1e3 * p['p99']:>9.0f}{p['slowest_over_p50']:>8.2f}"
                  f"{shape_name(p['inproc_shape']):>9}{rate:>12}{ratio:>7}"
                  f"{mem.get('VmRSS', 0) / GB:>8.2f}{mem.get('VmHWM', 0) / GB:>7.2f}"
                  f"{s['plan'] / GB:>7.2f}{mem.get('VmHWM', 0) / s['plan']:>8.2f}")
        compiled = [p["compiled_functions"] for p in s["passes"]]
        print(f"{'':<16}compiled functions: {s['compiled_at_ready']} at ready, "
              f"{' -> '.join(map(str, compiled))} after the passes; plan for "
              f"{s['plan_batch']}: weights {s['plan_weights'] / GB:.2f} + activations "
              f"{s['plan_activations'] / GB:.2f} GB (+ adapter slots)")
        if "largest" in s:
            big = s["largest"]
            print(f"{'':<16}largest bucket {shape_name(big['shape'])}: one request, "
                  f"{big['seconds']:.1f}s; worker peak after it "
                  f"{(big['worker_mem'] or {}).get('VmHWM', 0) / GB:.2f} GB")


# ---- targets ----------------------------------------------------------------------


def targets(rows, sessions, args) -> list[dict]:
    out = []

    def add(name, value, bound, better, where=""):
        if value is None:
            out.append(dict(name=name, verdict="SKIP", text=f"{name}: not measured in this run"))
            return
        ok = value >= bound if better == "higher" else value <= bound
        sign = ">=" if better == "higher" else "<="
        out.append(dict(name=name, verdict="PASS" if ok else "MISS", value=value, bound=bound,
                        text=f"{name}: {value:.2f} (target {sign} {bound:.2f}){where}"))

    def row(library, dtype, shape):
        return next((r for r in rows if r["library"] == library and r["dtype"] == dtype
                     and r["shape"] == shape), None)

    for dtype in args.dtypes:
        g, t = row("gemma_core", dtype, (8, 128)), row("transformers", dtype, (8, 128))
        add(f"in-process {dtype} 8x128 tokens/s, gemma_core / transformers",
            g["tokens_per_s"] / t["tokens_per_s"] if g and t else None, SPEED_TARGET, "higher")
    for dtype in args.dtypes:
        g, t = row("gemma_core", dtype, (1, 32)), row("transformers", dtype, (1, 32))
        add(f"in-process {dtype} 1x32 latency, gemma_core / transformers",
            g["seconds"] / t["seconds"] if g and t else None, LATENCY_TARGET, "lower")
    for dtype in args.dtypes:
        served = [s for s in sessions if s["dtype"] == dtype and "error" not in s]
        if served:
            mems = [p["worker_mem"] for s in served for p in s["passes"]]
            mems += [s["largest"]["worker_mem"] for s in served if "largest" in s]
            peak = max((m or {}).get("VmHWM", 0) for m in mems)
            ran = any("largest" in s for s in served)
            add(f"worker memory {dtype}, peak / plan (weights + largest-bucket activations)",
                peak / served[0]["plan"], MEMORY_TARGET, "lower",
                f"; {peak / GB:.2f} GB / {served[0]['plan'] / GB:.2f} GB"
                + ("" if ran else "; the largest bucket was not run (--largest-bucket)"))
            continue
        mine = [r for r in rows if r["library"] == "gemma_core" and r["dtype"] == dtype]
        if mine:  # no service run: the in-process worker function as a stand-in
            r = max(mine, key=lambda r: r["peak"])
            add(f"worker memory {dtype}, peak / plan (in-process {shape_name(r['shape'])}, "
                "no service run)", r["peak"] / r["plan"], MEMORY_TARGET, "lower",
                f"; {r['peak'] / GB:.2f} GB / {r['plan'] / GB:.2f} GB")
        else:
            add(f"worker memory {dtype}", None, MEMORY_TARGET, "lower")
    passes = [(s, p) for s in sessions if "error" not in s for p in s["passes"]]
    if passes:
        s, p = max(passes, key=lambda sp: sp[1]["slowest_over_p50"])
        add("slowest request after ready / its pass's median", p["slowest_over_p50"],
            STALL_TARGET, "lower", f" (worst: {s['dtype']} {s['start']}, {p['clients']} "
            f"client(s), the request sent {p['slowest_sent_at_s']:.1f}s into the pass)")
    else:
        add("slowest request after ready / its pass's median", None, STALL_TARGET, "lower")
    for dtype in args.dtypes:  # issue 17's yardstick: the service at its busiest
        top = max(args.clients)
        rated = [p for s in sessions if s["dtype"] == dtype and "error" not in s
                 for p in s["passes"] if p["clients"] == top and "ratio" in p]
        add(f"service {dtype} at {top} clients / in-process on the same batch shape",
            max((p["ratio"] for p in rated), default=None), SERVICE_TARGET, "higher")
    for dtype in args.dtypes:
        starts = {s["start"]: s for s in sessions if s["dtype"] == dtype and "error" not in s}
        if {"cold", "warm"} <= set(starts):
            add(f"warm restart to ready / cold, {dtype}",
                starts["warm"]["ready_s"] / starts["cold"]["ready_s"], RESTART_TARGET, "lower",
                f" ({starts['warm']['ready_s']:.1f}s / {starts['cold']['ready_s']:.1f}s)")
        else:
            add(f"warm restart to ready / cold, {dtype}", None, RESTART_TARGET, "lower")
    return out


# ---- main -------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    config = resolve_config(args.config, args.layers)
    workdir = pathlib.Path(args.workdir).expanduser()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    (workdir / "parity").mkdir(exist_ok=True)
    if "transformers" in args.libraries and "inproc" in args.cases and \
            importlib.util.find_spec("transformers") is None:
        raise SystemExit("the transformers cases need the bench extra: .venv/bin/pip install "
                         "-c constraints.txt -e '.[bench]' (make bench-real does), or pass "
                         "--libraries gemma_core")

    def log(message):
        print(message, flush=True)

    gemma_env = gemma_environment(args)
    transformers_env = {k: v for k, v in os.environ.items()
                        if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "KERAS_BACKEND")}
    # libgomp's threads spin between parallel regions by default; on a shared
    # machine a spinning thread that loses its core stalls every region.
    transformers_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env = environment(args, gemma_env, transformers_env)
    print_environment(env)
    name = args.config + (f"-L{args.layers}" if args.layers else "")
    started = time.perf_counter()
    checkpoint = ensure_checkpoint(workdir, name, config, seed=args.seed, log=log)
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    print(f"checkpoint: {checkpoint} ({config.num_parameters():,} parameters, "
          f"{size / GB:.2f} GB of bf16 safetensors; ready in {time.perf_counter() - started:.1f}s)")
    print(f"architecture: {config}")

    results = []
    cases = plan_cases(args)
    envs = {"gemma_core": gemma_env, "transformers": transformers_env}
    for case in cases:
        results.append(run_case(case, args, checkpoint, workdir, envs, log))
    rows = summarize_inproc(results, config)
    sessions = run_service(args, checkpoint, config, workdir, rows, log) \
        if "service" in args.cases else []

    print()
    print_environment(env)
    print(f"checkpoint: {checkpoint.name}, {config.num_parameters():,} parameters; "
          f"load average now {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if rows:
        print_inproc(rows, args)
    checks = parity(results)
    for c in checks:
        print(f"sanity: final hidden states of a fixed 1x32 input, gemma_core vs transformers, "
              f"{c['dtype']}: max |diff| {c['max_abs_diff']:.3g} (mean {c['mean_abs_diff']:.3g}, "
              f"max |value| {c['max_abs_value']:.3g})")
    if sessions:
        print_service(sessions, args)
    verdicts = targets(rows, sessions, args)
    print()
    print("targets (issue 16):")
    for v in verdicts:
        print(f"{v['verdict']}: {v['text']}")
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED case: {r['library']} {r['dtype']} {shape_name(r['shape'])} round "
              f"{r['round']}: {r['error']} (log: {r['log']})")
    if args.json:
        payload = dict(environment=env, args={k: v for k, v in vars(args).items()},
                       checkpoint=str(checkpoint), config=config.to_kwargs(),
                       inproc=rows, parity=checks, service=sessions, targets=verdicts,
                       raw=results)
        pathlib.Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.json}")
    return 1 if failed or any("error" in s for s in sessions) else 0


if __name__ == "__main__":
    sys.exit(main())
