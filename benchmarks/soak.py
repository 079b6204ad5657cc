"""Load and soak: N clients for T seconds against a real `gemma-serve`.

Starts `gemma-serve` as a subprocess on 127.0.0.1 (port 0, its own private
local Ray, the built-in default model unless --preset, a temporary data
dir, auth on with three tenants from GEMMA_SERVE_API_KEYS) and, from this
process (the clients are threads here, not in the coordinator's process):

1. uploads --adapters-per-tenant rank-2..8 LoRA adapters per tenant (random
   factors, keras_hub `.lora.h5`); 3 tenants x 4 adapters = 12 adapters
   against 8 slots per worker, so slots are evicted and reloaded all along;
2. pre-warms: one request per (batch bucket, length bucket) the load can
   reach within the tenant token limit, from two tenants at once (so both
   workers tend to get each), then records a reference result of a fixed
   probe request for the base model and every adapter, one at a time;
3. runs --clients client threads (one GemmaClient each) for --seconds. The
   tenants: `acme` and `globex` get at most --tenant-max-requests clients
   each and a token limit their worst case fits in, so the service must
   never refuse them; `greedy` gets the remaining half of the clients,
   more than its call limit, so it is refused (RESOURCE_EXHAUSTED, with a
   retry hint the clients honour) on purpose. Each request: 1-4 sequences
   of 4-200 random token ids, or (one in four) 1-4 short English texts;
   the base model or a random adapter of the tenant (latest or pinned
   version); random pooling, dtype and 1-3 layers. Every response is
   checked (right count, layers, shapes, dtype, token ids, adapter, finite
   values) and one request in 20 is the probe, compared with its reference
   (a wrong adapter or a stale slot would show);
4. samples the VmRSS (and RssAnon) of the coordinator, of each worker (pids
   from GetModelInfo) and of the rest of the coordinator's descendants (Ray's
   own processes) from /proc: at start, after the pre-warm, every
   --sample-every seconds and at the end;
5. stops the server with SIGTERM and checks that it exits 0, says
   "gemma-serve stopped", and leaves none of its processes behind.

It prints requests served (by tenant), errors by status code (deliberate
RESOURCE_EXHAUSTED of `greedy` apart from everything else), p50/p99 latency
overall and per size class, throughput, the memory timeline and a memory
table (start, after warm-up, at --baseline-at seconds, max, end, growth from
--baseline-at to the end), and a last line: PASS if there was no error but the
deliberate RESOURCE_EXHAUSTED, every check held, the server stopped cleanly
and no coordinator or worker grew by --max-growth-mib or more AND by
--max-growth-pct or more of its size at --baseline-at (the first
--baseline-at seconds of load are warm-up: compilation, allocator pools,
adapter slots). Else "FAIL: ..." and exit status 1.

    .venv/bin/python benchmarks/soak.py --seconds 30      # a quick look
    .venv/bin/python benchmarks/soak.py                   # 300 s, 8 clients, 2 workers
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # gemma_core (adapter files) in this process
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coordinator.client import GemmaClient  # noqa: E402
from proc_memory import mem_available  # noqa: E402  (benchmarks/, beside this)
from proc_table import descendants, stat_fields  # noqa: E402

BIN = pathlib.Path(sys.executable).parent
GREEDY = "greedy"
POLITE = ("acme", "globex")
MAX_SEQUENCES, MIN_TOKENS, MAX_TOKENS = 4, 4, 200
TEXT_SHARE, PROBE_SHARE, BASE_SHARE = 0.25, 0.05, 0.3
PROBE_TOLERANCE = 1e-3      # max |probe - reference|, float32, mean pooling
REQUEST_TIMEOUT_S = 120
UNAVAILABLE_BACKOFF_S = 1.0
SIZE_CLASSES = ((64, "<= 64 tokens"), (256, "65-256 tokens"), (math.inf, "> 256 tokens"))
WORDS = ("the quick brown fox jumps over lazy dog a service streams hidden states back "
         "to many tenants at once while adapters swap in and out of their slots every "
         "batch mixes requests of different sizes and the workers keep serving under "
         "load for minutes without growing memory or losing a single answer").split()
MIB = 1 << 20
NOTABLE_LOG_WORDS = ("died", "is back", "OOM", "memory pressure", "Traceback", "ERROR")


# ---- process memory from /proc ---------------------------------------------------


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS and RssAnon in bytes, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            out[key] = int(value.split()[0]) * 1024
    return out if "VmRSS" in out else None


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a reused pid apart)."""
    stat = stat_fields(pid)
    return None if stat is None else int(stat[1][19])


@dataclasses.dataclass
class MemorySample:
    t: float                          # seconds since the load started (negative before)
    label: str
    rss: dict[str, int]               # process name -> VmRSS bytes
    anon: dict[str, int]              # process name -> RssAnon bytes
    worker_pids: dict[str, int]
    workers: list[dict] | None        # GetModelInfo's WorkerInfo dicts (full samples)
    available: int = 0                # the machine's MemAvailable


class Monitor:
    """Samples the server's processes' memory, and GetModelInfo."""

    def __init__(self, server_pid: int, admin: GemmaClient, metrics_url: str):
        self.server_pid = server_pid
        self.admin = admin
        self.metrics_url = metrics_url
        self.samples: list[MemorySample] = []   # full ones: printed, with GetModelInfo
        self.fine: list[MemorySample] = []      # every one, /proc only in between
        self.worker_names: list[str] = []
        self.pid_changes: list[str] = []
        self.seen_pids: dict[int, int | None] = {}   # every server process -> start time

    def sample(self, t: float, label: str, full: bool = True) -> MemorySample:
        if full:
            workers = self.admin.model_info(timeout=60)["workers"]
            operator = operator_counters(self.metrics_url)
            for worker in workers:  # a tenant's GetModelInfo hides others' adapter activity
                worker.update(operator.get(worker["worker_id"], {}))
            pids = {f"worker-{i}": int(w.get("pid", 0)) for i, w in enumerate(workers)}
        else:
            workers, pids = None, self.samples[-1].worker_pids
        if not self.worker_names:
            self.worker_names = list(pids)
        elif pids != self.samples[-1].worker_pids:
            self.pid_changes.append(f"at {t:.0f}s worker pids {self.samples[-1].worker_pids} "
                                    f"-> {pids}")
        rss, anon = {}, {}
        for name, pid in [("coordinator", self.server_pid), *pids.items()]:
            status = proc_status(pid) or {}
            rss[name], anon[name] = status.get("VmRSS", 0), status.get("RssAnon", 0)
        others = descendants(self.server_pid) - set(pids.values())
        for pid in {self.server_pid, *pids.values(), *others}:
            self.seen_pids.setdefault(pid, start_time(pid))
        statuses = [s for s in map(proc_status, others) if s]
        rss["ray (other)"] = sum(s["VmRSS"] for s in statuses)
        anon["ray (other)"] = sum(s.get("RssAnon", 0) for s in statuses)
        sample = MemorySample(t, label, rss, anon, pids, workers, mem_available())
        self.fine.append(sample)
        if full:
            self.samples.append(sample)
        return sample

    def names(self) -> list[str]:
        return ["coordinator", *self.worker_names, "ray (other)"]

    def print_line(self, sample: MemorySample) -> None:
        parts = "  ".join(f"{name} {sample.rss.get(name, 0) / MIB:7.1f}" for name in self.names())
        print(f"  memory {sample.label:>9} t={sample.t:6.1f}s  VmRSS MiB: {parts}", flush=True)


def operator_counters(metrics_url: str) -> dict[str, dict[str, float]]:
    """worker id -> the adapter counters GetModelInfo shows only to their
    tenant, from the operator's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"gemma_worker_adapter_loads_total": "adapter_loads",
             "gemma_worker_adapter_evictions_total": "adapter_evictions",
             "gemma_worker_max_adapters_in_a_batch": "max_adapters_in_a_batch"}
    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                found.setdefault(sample.labels["worker"], {})[names[sample.name]] = \
                    int(sample.value)
    return found


# ---- the server ------------------------------------------------------------------


def start_server(args, workdir: pathlib.Path, keys: dict[str, str], limits: dict):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "GEMMA_SERVE_LOG_LEVEL": "WARNING",
           "GEMMA_SERVE_API_KEYS": ",".join(f"{t}={k}" for t, k in keys.items())}
    for name in ("XLA_FLAGS", "GEMMA_SERVE_API_KEY", "KERAS_BACKEND", "JAX_PLATFORMS"):
        env.pop(name, None)
    command = [str(BIN / "gemma-serve"), "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "0", "--workers", str(args.workers), "--mesh", args.mesh,
               "--data-dir", str(workdir / "data"),
               "--ray-num-cpus", str(max(os.cpu_count() or 1, args.workers)),
               "--tenant-max-requests", str(limits["requests"]),
               "--tenant-max-tokens", str(limits["tokens"]),
               "--max-queued-sequences", str(limits["queued"]),
               "--shutdown-grace-s", str(args.shutdown_grace_s)]
    if args.preset:
        command += ["--preset", args.preset]
    log = open(workdir / "serve.log", "w")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log,
                               text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()

    def pump():  # keeps reading stdout so the pipe never fills
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, name="serve-stdout", daemon=True).start()
    try:
        ready = lines.get(timeout=args.start_timeout)
    except queue.Empty:
        ready = None
    if not ready or " ready on " not in ready:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
        tail = (workdir / "serve.log").read_text()[-4000:]
        raise SystemExit(f"gemma-serve did not become ready ({ready!r}); its log ends:\n{tail}")
    address = ready.split(" ready on ")[1].split()[0]
    return process, lines, address, ready, log


def stop_server(process, lines, monitor: Monitor, grace_s: float) -> tuple[list[str], float]:
    """SIGTERM; returns (problems, seconds to exit)."""
    problems = []
    sent = time.monotonic()
    os.kill(process.pid, signal.SIGTERM)
    try:
        code = process.wait(grace_s + 60)
    except subprocess.TimeoutExpired:
        problems.append(f"gemma-serve still running {grace_s + 60:.0f}s after SIGTERM; killed")
        os.killpg(process.pid, signal.SIGKILL)
        code = process.wait()
    took = time.monotonic() - sent
    if code != 0:
        problems.append(f"gemma-serve exited with status {code} after SIGTERM")
    said = []
    while True:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            break
        if line is None:
            break
        said.append(line)
    if "gemma-serve stopped" not in said:
        problems.append(f"gemma-serve did not print 'gemma-serve stopped' (stdout: {said})")
    deadline = time.monotonic() + 30
    while True:
        left = [pid for pid, started in monitor.seen_pids.items()
                if started is not None and start_time(pid) == started]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        problems.append(f"{len(left)} of the server's processes outlived it by 30s: {left}; "
                        "killed")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return problems, took


# ---- adapters --------------------------------------------------------------------


def random_adapter(config, rank: int, rng):
    """Query and value LoRA of every block; a ~ N(0, 1/d), b ~ N(0, 0.05^2):
    a sizeable change, so a wrong or stale adapter shows in the probe."""
    from gemma_core import LoraAdapter

    return LoraAdapter.random(config, rank, 2.0 * rank, seed=int(rng.integers(2**31)),
                              std=1 / np.sqrt(config.hidden_dim), b_std=0.05)


def upload_adapters(clients: dict[str, GemmaClient], config, count: int, workdir, rng):
    """tenant -> [(adapter name, resolved id, rank)]."""
    ranks = [int(r) for r in np.round(np.linspace(2, 8, count))] if count > 1 else [8]
    out = {}
    for tenant, client in clients.items():
        out[tenant] = []
        for k, rank in enumerate(ranks):
            name = f"{tenant}-a{k}-r{rank}"
            path = workdir / f"{name}.lora.h5"
            random_adapter(config, rank, rng).write_lora_file(path, config)
            adapter = client.upload_adapter(name, path, timeout=120)
            out[tenant].append((name, adapter["adapter_id"], rank))
    return out


# ---- requests --------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    kwargs: dict
    expected_adapter: str          # resolved "name@N" or ""
    sent_ids: list | None          # token ids sent, None for texts
    probe_key: str | None = None   # which reference a probe is compared with


@dataclasses.dataclass
class Outcome:
    tenant: str
    code: str                      # "OK", a grpc status name, or "CHECK:<what>"
    latency: float
    started: float                 # seconds since the load started
    sequences: int = 0
    tokens: int = 0
    message: str = ""


def normalize_layer(layer: int, num_layers: int) -> int:
    return layer if layer >= 0 else num_layers + 1 + layer


def make_request(rng, tenant_adapters, vocabulary_size, num_layers, probe_ids) -> Request:
    adapters = tenant_adapters
    choice = rng.random()
    if rng.random() < BASE_SHARE or not adapters:
        adapter_id, expected, key = "", "", "base"
    else:
        name, resolved, _ = adapters[rng.integers(len(adapters))]
        adapter_id = resolved if rng.random() < 0.5 else name
        expected, key = resolved, resolved
    if choice < PROBE_SHARE:
        return Request(dict(token_ids=[probe_ids], layers=[-1], pooling="mean",
                            dtype="float32", adapter_id=adapter_id), expected,
                       [probe_ids], probe_key=key)
    count = int(rng.integers(1, MAX_SEQUENCES + 1))
    all_layers = list(range(num_layers + 1))
    chosen = [int(x) for x in rng.choice(all_layers, size=int(rng.integers(1, 4)),
                                         replace=False)]
    layers = [x - num_layers - 1 if rng.random() < 0.3 else x for x in chosen]
    common = dict(layers=layers, pooling=str(rng.choice(["none", "last_token", "mean"])),
                  dtype=str(rng.choice(["float32", "bfloat16", "float16"])),
                  adapter_id=adapter_id)
    if rng.random() < TEXT_SHARE:
        texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 40))))
                 for _ in range(count)]
        return Request(dict(texts=texts, **common), expected, None)
    ids = [rng.integers(0, vocabulary_size, int(rng.integers(MIN_TOKENS, MAX_TOKENS + 1)))
           .tolist() for _ in range(count)]
    return Request(dict(token_ids=ids, **common), expected, ids)


def check(request: Request, result, num_layers: int, hidden_dim: int,
          references: dict, probe_errors: list) -> str:
    """"" when the result is right, else what is wrong."""
    kw = request.kwargs
    count = len(kw.get("texts") or kw.get("token_ids"))
    if len(result.hidden_states) != count or len(result.token_ids) != count:
        return f"{len(result.hidden_states)} sequences back for {count}"
    layers = [normalize_layer(x, num_layers) for x in kw["layers"]]
    if list(result.layers) != layers:
        return f"layers {result.layers} for {kw['layers']}"
    if result.adapter_id != request.expected_adapter:
        return f"adapter {result.adapter_id!r}, expected {request.expected_adapter!r}"
    dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[kw["dtype"]]
    for i, per_layer in enumerate(result.hidden_states):
        tokens = len(result.token_ids[i])
        if request.sent_ids is not None and result.token_ids[i].tolist() != request.sent_ids[i]:
            return f"sequence {i}: token ids differ from those sent"
        if request.sent_ids is None and not 2 <= tokens <= 2 * MAX_TOKENS:
            return f"text {i}: {tokens} tokens"
        shape = (tokens, hidden_dim) if kw["pooling"] == "none" else (hidden_dim,)
        if len(per_layer) != len(layers):
            return f"sequence {i}: {len(per_layer)} layers"
        for tensor in per_layer:
            if tensor.shape != shape or tensor.dtype.name != dtype:
                return f"sequence {i}: {tensor.dtype.name}{tensor.shape}, expected {dtype}{shape}"
            if not np.isfinite(tensor.astype("float32")).all():
                return f"sequence {i}: non-finite values ({kw['dtype']})"
    if request.probe_key is not None:
        reference = references[request.probe_key]
        diff = float(np.max(np.abs(result.hidden_states[0][0] - reference)))
        probe_errors.append(diff)
        if diff > PROBE_TOLERANCE:
            return f"probe {request.probe_key}: max |diff| {diff:.2e} from its reference"
    return ""


def tokens_of(request: Request, result=None) -> tuple[int, int]:
    if result is not None:
        return len(result.token_ids), sum(len(t) for t in result.token_ids)
    kw = request.kwargs
    if kw.get("token_ids"):
        return len(kw["token_ids"]), sum(len(t) for t in kw["token_ids"])
    return len(kw["texts"]), 0


def client_loop(index, tenant, address, key, adapters, model, deadline, t0, seed,
                references, outcomes, probe_errors, lock):
    rng = np.random.default_rng([seed, index])
    vocab, num_layers, hidden = model
    with GemmaClient(address, api_key=key) as client:
        while time.monotonic() < deadline:
            request = make_request(rng, adapters, vocab, num_layers, references["probe_ids"])
            started = time.monotonic()
            pause = 0.0
            try:
                result = client.forward(**request.kwargs, timeout=REQUEST_TIMEOUT_S)
                latency = time.monotonic() - started
                problem = check(request, result, num_layers, hidden, references, probe_errors)
                seqs, tokens = tokens_of(request, result)
                outcome = Outcome(tenant, "CHECK" if problem else "OK", latency,
                                  started - t0, seqs, tokens, problem)
            except grpc.RpcError as error:
                latency = time.monotonic() - started
                seqs, tokens = tokens_of(request)
                outcome = Outcome(tenant, error.code().name, latency, started - t0, seqs,
                                  tokens, (error.details() or "")[:160])
                if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    hint = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    pause = int(hint) / 1e3 if hint else 0.1
                elif error.code() == grpc.StatusCode.UNAVAILABLE:
                    pause = UNAVAILABLE_BACKOFF_S  # as a real client would
            except Exception as error:  # noqa: BLE001 - reported, the soak goes on
                latency = time.monotonic() - started
                outcome = Outcome(tenant, f"CLIENT:{type(error).__name__}", latency,
                                  started - t0, message=str(error)[:160])
            with lock:
                outcomes.append(outcome)
            if pause:
                time.sleep(pause)


# ---- warm-up ---------------------------------------------------------------------


def prewarm(clients: dict[str, GemmaClient], info: dict, token_limit: int, rng) -> int:
    """One request per (batch bucket, length bucket) reachable under the
    tenant token limit, from two tenants at once. Returns requests sent."""
    limits = info["limits"]
    vocab = int(limits["vocabulary_size"])
    length_buckets = [int(x) for x in limits.get("length_buckets", [])] or [32, 128, 512, 1024]
    batch_buckets = [int(x) for x in limits.get("batch_buckets", [])] or [1, 2, 4, 8, 16, 32]
    max_rows = int(limits.get("max_sequences_per_request", 64))
    max_batch_tokens = int(limits.get("max_batch_tokens", 16384))
    shapes = []  # (rows, tokens per row): the fewest of each that land in a bucket pair
    previous_length = 0
    for length_bucket in length_buckets:
        if previous_length > MAX_TOKENS:  # texts get <bos>: MAX_TOKENS + 1 is reachable
            break
        tokens = max(MIN_TOKENS, previous_length + 1)
        previous_rows = 0
        for rows_bucket in batch_buckets:
            rows = previous_rows + 1
            if (rows > max_rows or rows * tokens > token_limit
                    or rows_bucket * length_bucket > max_batch_tokens):
                break
            shapes.append((rows, tokens))
            previous_rows = rows_bucket
        previous_length = length_bucket
    two = [clients[t] for t in POLITE]
    errors = []

    def send(client, seed):
        rng = np.random.default_rng(seed)
        for rows, tokens in shapes:
            ids = rng.integers(0, vocab, (rows, tokens)).tolist()
            try:
                client.forward(token_ids=ids, layers=[-1], pooling="mean", timeout=600)
            except grpc.RpcError as error:
                errors.append(f"{rows}x{tokens}: {error.code().name} {error.details()}")

    threads = [threading.Thread(target=send, args=(c, rng.integers(1 << 31)))
               for c in two]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit("pre-warm failed: " + "; ".join(errors[:5]))
    return 2 * len(shapes)


# ---- report ----------------------------------------------------------------------


def pct_ms(values, q) -> str:
    return f"{1e3 * float(np.percentile(values, q)):8.1f}" if values else "       -"


def table(header, rows, left=1):
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) if i < left else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())


def nearest(samples, t):
    return min(samples, key=lambda s: abs(s.t - t))


def report(args, monitor: Monitor, outcomes, probe_errors, wall, clients_of, limits,
           prewarm_info, shutdown_problems, shutdown_s, preamble, log_path) -> list[str]:
    failures = []
    print()
    for line in preamble:
        print(line)

    served = [o for o in outcomes if o.code == "OK"]
    print()
    print(f"requests: {len(outcomes)} sent, {len(served)} served in {wall:.1f}s: "
          f"{len(served) / wall:.1f} req/s, {sum(o.sequences for o in served) / wall:.1f} "
          f"sequences/s, {sum(o.tokens for o in served) / wall:,.0f} tokens/s")
    print()
    rows = []
    for tenant in (*POLITE, GREEDY):
        mine = [o for o in outcomes if o.tenant == tenant]
        ok = [o.latency for o in mine if o.code == "OK"]
        refused = sum(o.code == "RESOURCE_EXHAUSTED" for o in mine)
        other = sum(o.code not in ("OK", "RESOURCE_EXHAUSTED") for o in mine)
        rows.append((tenant, clients_of[tenant], len(mine), len(ok), f"{len(ok) / wall:.1f}",
                     refused, other, pct_ms(ok, 50).strip(), pct_ms(ok, 99).strip()))
    table(("tenant", "clients", "sent", "served", "req/s", "RESOURCE_EXHAUSTED", "other errors",
           "p50 ms", "p99 ms"), rows)

    print()
    errors = collections.Counter()
    examples = {}
    for o in outcomes:
        if o.code == "OK":
            continue
        deliberate = o.code == "RESOURCE_EXHAUSTED" and o.tenant == GREEDY
        key = (o.code, o.tenant, "deliberate" if deliberate else "UNEXPECTED")
        errors[key] += 1
        examples.setdefault(key, o.message)
    if errors:
        print("errors by status code:")
        table(("code", "tenant", "kind", "count", "first message"),
              [(*k, n, examples[k][:90]) for k, n in sorted(errors.items())], left=3)
    else:
        print("errors by status code: none")
    unexpected = sum(n for k, n in errors.items() if k[2] == "UNEXPECTED")
    deliberate = sum(n for k, n in errors.items() if k[2] == "deliberate")
    print(f"deliberate RESOURCE_EXHAUSTED ({GREEDY}, {clients_of[GREEDY]} clients against a "
          f"limit of {limits['requests']} calls): {deliberate}; every other error: {unexpected}")
    if unexpected:
        failures.append(f"{unexpected} errors other than the deliberate RESOURCE_EXHAUSTED "
                        f"({', '.join(f'{k[0]}/{k[1]} x{n}' for k, n in errors.items() if k[2] == 'UNEXPECTED')})")
    if not deliberate and clients_of[GREEDY] > limits["requests"]:
        failures.append("the greedy tenant was never refused: admission control did nothing")

    print()
    rows = []
    for bound, label in SIZE_CLASSES:
        low = max((b for b, _ in SIZE_CLASSES if b < bound), default=0)
        lat = [o.latency for o in served if low < o.tokens <= bound]
        rows.append((label, len(lat), pct_ms(lat, 50).strip(), pct_ms(lat, 99).strip(),
                     pct_ms(lat, 100).strip()))
    lat = [o.latency for o in served]
    rows.append(("all served", len(lat), pct_ms(lat, 50).strip(), pct_ms(lat, 99).strip(),
                 pct_ms(lat, 100).strip()))
    refused = [o.latency for o in outcomes if o.code == "RESOURCE_EXHAUSTED"]
    rows.append(("refused (RESOURCE_EXHAUSTED)", len(refused), pct_ms(refused, 50).strip(),
                 pct_ms(refused, 99).strip(), pct_ms(refused, 100).strip()))
    print("latency by request size (tokens in the request, all sequences):")
    table(("size class", "requests", "p50 ms", "p99 ms", "max ms"), rows)
    halves = [[o.latency for o in served if (o.started < wall / 2) == first]
              for first in (True, False)]
    print(f"served p50/p99, first half {pct_ms(halves[0], 50).strip()}/"
          f"{pct_ms(halves[0], 99).strip()} ms, second half {pct_ms(halves[1], 50).strip()}/"
          f"{pct_ms(halves[1], 99).strip()} ms")
    if probe_errors:
        print(f"probes (a fixed request, base or an adapter, vs its reference taken idle): "
              f"{len(probe_errors)} checked, max |diff| "
              f"{max(probe_errors):.2e} (tolerance {PROBE_TOLERANCE:g})")

    print()
    first, last = monitor.samples[1], monitor.samples[-1]
    rows = []
    for i, name in enumerate(monitor.worker_names):
        a, b = first.workers[i], last.workers[i]
        delta = lambda k: int(b.get(k, 0)) - int(a.get(k, 0))  # noqa: E731
        rows.append((name, delta("batches_run"), delta("sequences_run"),
                     f"{delta('sequences_run') / max(1, delta('batches_run')):.1f}",
                     b.get("max_sequences_in_a_batch", 0),
                     f"{a.get('compiled_functions', 0)} -> {b.get('compiled_functions', 0)}",
                     b.get("adapter_loads", 0), b.get("adapter_evictions", 0),
                     b.get("max_adapters_in_a_batch", 0)))
    print(f"workers during the load (pre-warm sent {prewarm_info} requests):")
    table(("worker", "batches", "sequences", "rows/batch", "max rows", "compiled (warm->end)",
           "adapter loads", "evictions", "max adapters/batch"), rows)
    late = [s for s in monitor.samples if s.t >= args.baseline_at]
    if late:
        base = nearest(monitor.samples, args.baseline_at)
        compiled_late = [int(last.workers[i].get("compiled_functions", 0))
                         - int(base.workers[i].get("compiled_functions", 0))
                         for i in range(len(monitor.worker_names))]
        if any(compiled_late):
            print(f"note: compiled functions after {base.t:.0f}s: {compiled_late} per worker"
                  " (negative: the counter restarted with a replaced worker)")
    for change in monitor.pid_changes:
        failures.append(f"a worker was replaced ({change})")
    notable = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip()[:200] for line in
               pathlib.Path(log_path).read_text(errors="replace").splitlines()
               if any(word in line for word in NOTABLE_LOG_WORDS)]
    if notable:
        print(f"server log ({len(notable)} notable lines, up to 8 shown):")
        for line in notable[:8]:
            print(f"  {line}")

    print()
    print("memory timeline, VmRSS MiB:")
    names = monitor.names()
    table(("sample", "t s", *names, "host MemAvailable"),
          [(s.label, f"{s.t:.0f}", *(f"{s.rss.get(n, 0) / MIB:.1f}" for n in names),
            f"{s.available / MIB:,.0f}") for s in monitor.samples])
    print()
    warm, half = monitor.samples[1], args.window / 2
    base_window = [f for f in monitor.fine if abs(f.t - args.baseline_at) <= half + 0.5]
    end_window = [f for f in monitor.fine if f.t >= wall - args.window]
    if not base_window or monitor.fine[-1].t < args.baseline_at:
        base_window = [nearest(monitor.fine, args.baseline_at)]
    raw_base = nearest(monitor.fine, args.baseline_at)
    span = (f"{min(f.t for f in base_window):.0f}-{max(f.t for f in base_window):.0f}s",
            f"{min(f.t for f in end_window):.0f}-{max(f.t for f in end_window):.0f}s")
    print(f"memory per process, VmRSS MiB, sampled every {args.sample_every:g}s. Warm-up is "
          f"the first {args.baseline_at:g}s of load; 'base' = median of the samples at "
          f"{span[0]} ({len(base_window)}), 'last' = median of those at {span[1]} "
          f"({len(end_window)}), growth = last - base (anon: the same for RssAnon); "
          f"end-@{raw_base.t:.0f}s: the single samples; MiB/min: least-squares slope from "
          f"{min(f.t for f in base_window):.0f}s on. Bound: growth < {args.max_growth_mib:g} "
          f"MiB or < {args.max_growth_pct:g}% of base, for VmRSS and for RssAnon.")
    rows = []
    for name in names:
        mib = lambda samples, key="rss": [getattr(f, key).get(name, 0) / MIB  # noqa: E731
                                          for f in samples]
        base, final = float(np.median(mib(base_window))), float(np.median(mib(end_window)))
        growth = final - base
        pct = 100 * growth / max(1e-9, base)
        anon = float(np.median(mib(end_window, "anon")) - np.median(mib(base_window, "anon")))
        after = [(f.t, f.rss.get(name, 0) / MIB) for f in monitor.fine
                 if f.t >= min(x.t for x in base_window)]
        slope = np.polyfit(*zip(*after), 1)[0] * 60 if len(after) >= 3 else float("nan")
        loaded = mib([f for f in monitor.fine if f.t >= 0])
        end_value = monitor.fine[-1].rss.get(name, 0) / MIB
        checked = name != "ray (other)"
        anon_base = float(np.median(mib(base_window, "anon")))
        ok = ((growth < args.max_growth_mib or pct < args.max_growth_pct) and
              (anon < args.max_growth_mib or 100 * anon / max(1e-9, anon_base)
               < args.max_growth_pct))
        rows.append((name, f"{mib(monitor.fine[:1])[0]:.1f}", f"{warm.rss.get(name, 0) / MIB:.1f}",
                     f"{base:.1f}", f"{max(loaded):.1f}", f"{final:.1f}", f"{end_value:.1f}",
                     f"{growth:+.1f}", f"{pct:+.1f}%", f"{anon:+.1f}",
                     f"{end_value - raw_base.rss.get(name, 0) / MIB:+.1f}", f"{slope:+.2f}",
                     ("ok" if ok else "GREW") if checked else "(info)"))
        if checked and not ok:
            failures.append(f"{name} grew {growth:+.1f} MiB ({pct:+.1f}%; RssAnon "
                            f"{anon:+.1f} MiB) from {span[0]} to {span[1]}")
        if checked and not end_value:
            failures.append(f"{name} was gone at the end")
    table(("process", "start", "warm", "base", "max", "last", "end", "growth", "growth %",
           "anon", f"end-@{raw_base.t:.0f}s", "MiB/min", "verdict"), rows)

    print()
    if shutdown_problems:
        for problem in shutdown_problems:
            print(f"shutdown: {problem}")
        failures.extend(shutdown_problems)
    else:
        print(f"shutdown: SIGTERM -> exit status 0 in {shutdown_s:.1f}s, 'gemma-serve stopped' "
              f"printed, none of its {len(monitor.seen_pids)} processes left behind")
    return failures


# ---- main ------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300, help="length of the load")
    parser.add_argument("--clients", type=int, default=8,
                        help="client threads; half go to the greedy tenant")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mesh", default="1x1", help="per-worker mesh, DATAxMODEL")
    parser.add_argument("--preset", default=None,
                        help="gemma-serve --preset (default: the built-in model)")
    parser.add_argument("--adapters-per-tenant", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-every", type=float, default=5,
                        help="seconds between memory samples (/proc only)")
    parser.add_argument("--print-every", type=float, default=30,
                        help="seconds between printed samples (with GetModelInfo)")
    parser.add_argument("--baseline-at", type=float, default=60,
                        help="end of warm-up: memory growth is measured from here")
    parser.add_argument("--window", type=float, default=30,
                        help="memory at a time = median of the samples in a window this "
                             "long (centred on --baseline-at; the last one at the end)")
    parser.add_argument("--max-growth-mib", type=float, default=50)
    parser.add_argument("--max-growth-pct", type=float, default=10)
    parser.add_argument("--shutdown-grace-s", type=float, default=10)
    parser.add_argument("--start-timeout", type=float, default=600)
    args = parser.parse_args()
    if args.clients < 3:
        raise SystemExit("--clients must be at least 3 (one per tenant)")

    greedy_clients = args.clients // 2
    polite_clients = args.clients - greedy_clients
    clients_of = {POLITE[0]: (polite_clients + 1) // 2, POLITE[1]: polite_clients // 2,
                  GREEDY: greedy_clients}
    # The polite tenants' worst case fits within both limits; greedy's does not.
    max_requests = max(1, clients_of[POLITE[0]])
    limits = {"requests": max_requests,
              "tokens": max_requests * MAX_SEQUENCES * 256,
              "queued": 3 * max_requests * MAX_SEQUENCES + 8}
    if greedy_clients <= max_requests:
        print(f"note: greedy has {greedy_clients} clients, not more than the limit of "
              f"{max_requests}: no deliberate RESOURCE_EXHAUSTED expected")

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gemma-serve-soak-"))
    keys = {t: secrets.token_hex(16) for t in (*POLITE, GREEDY)}
    started = time.monotonic()
    process, lines, address, ready, log = start_server(args, workdir, keys, limits)
    print(ready, flush=True)
    print(f"[soak] server up in {time.monotonic() - started:.1f}s, pid {process.pid}", flush=True)
    tenant_clients = {t: GemmaClient(address, api_key=k) for t, k in keys.items()}
    monitor = Monitor(process.pid, tenant_clients[POLITE[0]],
                      ready.split("metrics=")[1].split()[0])
    try:
        from gemma_core import GemmaConfig

        info = tenant_clients[POLITE[0]].model_info(timeout=60)
        kwargs = json.loads(info["config_json"])
        fields = {f.name for f in dataclasses.fields(GemmaConfig)}
        config = GemmaConfig.from_kwargs({k: v for k, v in kwargs.items() if k in fields})
        monitor.print_line(monitor.sample(-1, "start"))

        rng = np.random.default_rng(args.seed)
        adapters = upload_adapters(tenant_clients, config, args.adapters_per_tenant, workdir, rng)
        t = time.monotonic()
        sent = prewarm(tenant_clients, info, limits["tokens"], rng)
        print(f"[soak] {sum(map(len, adapters.values()))} adapters uploaded; pre-warm "
              f"({sent} requests) took {time.monotonic() - t:.1f}s", flush=True)

        probe_ids = rng.integers(0, config.vocabulary_size, 24).tolist()
        references = {"probe_ids": probe_ids}
        for tenant, client in tenant_clients.items():
            for key, adapter_id in [("base", ""), *[(r, r) for _, r, _ in adapters[tenant]]]:
                result = client.forward(token_ids=[probe_ids], layers=[-1], pooling="mean",
                                        adapter_id=adapter_id, timeout=600)
                references[key] = result.hidden_states[0][0]
        spread = min(float(np.max(np.abs(references[k] - references["base"])))
                     for k in references if k not in ("probe_ids", "base"))
        if spread < 100 * PROBE_TOLERANCE:
            raise SystemExit(f"an adapter changes the probe by only {spread:.2e}: the probe "
                             "could not tell adapters apart")

        model = (config.vocabulary_size, config.num_layers, config.hidden_dim)
        outcomes, probe_errors, lock = [], [], threading.Lock()
        t0 = time.monotonic()
        deadline = t0 + args.seconds
        monitor.print_line(monitor.sample(0, "warm"))
        threads, index = [], 0
        for tenant in (*POLITE, GREEDY):
            for _ in range(clients_of[tenant]):
                threads.append(threading.Thread(
                    target=client_loop, name=f"client-{index}-{tenant}",
                    args=(index, tenant, address, keys[tenant], adapters[tenant], model,
                          deadline, t0, args.seed, references, outcomes, probe_errors, lock)))
                index += 1
        for thread in threads:
            thread.start()
        tick, next_print = 1, args.print_every
        while time.monotonic() < deadline:
            time.sleep(max(0.0, min(deadline, t0 + tick * args.sample_every) - time.monotonic()))
            now = time.monotonic() - t0
            tick += 1
            if now >= args.seconds - 0.5:
                break
            if now < next_print - 0.5:
                monitor.sample(now, "load", full=False)
                continue
            next_print += args.print_every
            monitor.print_line(monitor.sample(now, "load"))
            with lock:
                served = sum(o.code == "OK" for o in outcomes)
                others = sum(o.code not in ("OK", "RESOURCE_EXHAUSTED") for o in outcomes)
            print(f"    {served} served, {others} unexpected errors so far", flush=True)
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 30)
        wall = time.monotonic() - t0
        hung = [thread.name for thread in threads if thread.is_alive()]
        monitor.print_line(monitor.sample(wall, "end"))

        preamble = [
            f"soak {datetime.datetime.now().isoformat(timespec='seconds')}  "
            f"{platform.node()}  {os.cpu_count()} CPU cores  python {platform.python_version()}",
            f"server: preset={info['preset']} ({info.get('parameter_count', '?')} parameters, "
            f"dtype {info.get('dtype')}), workers={args.workers} mesh={args.mesh}, "
            f"limits per tenant: {limits['requests']} calls, {limits['tokens']} tokens; "
            f"--max-queued-sequences {limits['queued']}",
            f"load: {args.clients} clients ({', '.join(f'{t} {n}' for t, n in clients_of.items())}) "
            f"for {args.seconds:g}s; {args.adapters_per_tenant} adapters per tenant "
            f"(ranks {sorted({r for a in adapters.values() for _, _, r in a})}), "
            f"{info['workers'][0].get('adapter_slots', '?')} slots per worker; requests of "
            f"1-{MAX_SEQUENCES} sequences, {MIN_TOKENS}-{MAX_TOKENS} ids or short texts "
            f"({TEXT_SHARE:.0%}), base or an adapter, random pooling/dtype/layers, "
            f"{PROBE_SHARE:.0%} probes; seed {args.seed}",
        ]
    except BaseException:
        for client in tenant_clients.values():
            client.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    for client in tenant_clients.values():
        client.close()
    shutdown_problems, shutdown_s = stop_server(process, lines, monitor, args.shutdown_grace_s)
    log.close()
    if hung:
        shutdown_problems.insert(0, f"client threads still running: {hung}")

    failures = report(args, monitor, outcomes, probe_errors, wall, clients_of, limits, sent,
                      shutdown_problems, shutdown_s, preamble, workdir / "serve.log")
    if wall < args.baseline_at + args.window:
        print(f"note: the load ran {wall:.0f}s; growth after a {args.baseline_at:g}s warm-up "
              "says little about a run this short")
    print()
    if failures:
        print(f"server log: {workdir / 'serve.log'}")
        print("FAIL: " + "; ".join(failures))
        sys.exit(1)
    shutil.rmtree(workdir, ignore_errors=True)
    print("PASS")


if __name__ == "__main__":
    main()
