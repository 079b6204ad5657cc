"""OpenAI embeddings over HTTP against gRPC Forward: the same work, the same run.

Starts a local Ray and one GemmaServer (ServerThread) with ONE worker on a
1 x 1 mesh serving the mid-size benchmark config of service_throughput.py
(random weights, saved as a preset in a temporary directory, with the
built-in default model's SentencePiece tokenizer saved next to it so that
both APIs take texts), with its HTTP front on (`http_port=0`) and auth off
(GEMMA_SERVE_API_KEYS unset, no keys file: any key is accepted).
BatchingConfig() defaults, as service_throughput.py.

C clients (default 16), threads in a separate process (as real clients are:
they must not share the coordinator's interpreter lock), each with its own
client object kept between passes, all start together and each sends R
requests (default 8) back to back, one distinct text of 32 tokens (with
<bos>, the length bucket exactly) per request, each case in turn:

* grpc: `GemmaClient.forward(texts=[text], pooling="mean", normalize=True)`
  (the final layer: the server's default);
* http float: `POST /v1/embeddings` with the official `openai` SDK
  (`openai.OpenAI(base_url=..., max_retries=0)`), `encoding_format="float"`;
* http base64: the same with the SDK's default encoding (base64; the SDK
  decodes it to floats itself), unless --no-base64;
* http raw float: the same float request without the SDK (a stdlib
  http.client connection per client, json in and out), unless --no-raw: what
  the server's HTTP path costs apart from the SDK's own parsing.

Every case is warmed (every batch bucket compiled, every client connected)
before timing; then --rounds rounds (default 5) run every case once on the
same texts (new texts each round), the order rotating from round to round
(the machines are shared and noisy; only ratios measured in the same run
mean anything). Rate: the median over rounds of a round's requests over its
wall time (first request sent to last answer); p50/p99: over every request's
latency as its client sees it. CPU ms per request by process (the
coordinator, that is this process with the gRPC and HTTP servers in it, the
clients' process, the worker, Ray's own) is read from /proc per case.

Target (from the issue): at 16 clients, /v1/embeddings (float) throughput
>= 0.9 x gRPC Forward's. Checked on the side: the HTTP embeddings (float and
base64) equal gRPC's within 1e-5 for the same texts, and `usage` counts
gRPC's tokens. This is a report: it prints PASS/MISS and exits 0 (1 only if
a check fails).

This benchmark found that the HTTP front's connections lacked TCP_NODELAY
(each response waited ~40 ms for a delayed ACK); coordinator/http_front.py
now sets it.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# benchmarks/, beside this file. Importing it sets KERAS_BACKEND, JAX_PLATFORMS
# (default cpu) and RAY_AUTH_MODE=disabled, as its own runs do.
import service_throughput as st  # noqa: E402

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

THROUGHPUT_TARGET = 0.9  # HTTP (float) req/s over gRPC Forward req/s
TOLERANCE = 1e-5         # HTTP vs gRPC embedding, max abs difference
CASES = ("grpc", "http float", "http base64", "http raw float")
WORDS = ("time year people way day man thing woman life child world school state family "
         "student group country problem hand part place case week company system program "
         "question work government number night point home water room mother area money "
         "story fact month lot right study book eye job word business issue side kind head "
         "house service friend father power hour game line end member law car city "
         "community name president team minute idea kid body information back parent face "
         "others level office door health person art war history party result change "
         "morning reason research girl guy moment air teacher force education").split()


# ---- texts ---------------------------------------------------------------------


def make_texts(tokenizer, count, tokens, seed):
    """`count` distinct texts of random words, each `tokens` tokens long with
    <bos> (as Forward tokenizes them) where random words get there exactly."""
    rng = np.random.default_rng(seed)
    texts, seen = [], set()
    while len(texts) < count:
        words = []
        while len(tokenizer.tokenize(" ".join(words), add_bos=True)) < tokens:
            words.append(str(rng.choice(WORDS)))
        if len(tokenizer.tokenize(" ".join(words), add_bos=True)) > tokens:
            words.pop()  # one short: top up with one-token words if any fit
            for word in rng.permutation(WORDS):
                if len(tokenizer.tokenize(" ".join(words + [word]), add_bos=True)) == tokens:
                    words.append(str(word))
                    break
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            texts.append(text)
    return texts


# ---- the clients' process ------------------------------------------------------

LOAD_PROCESS = None  # started in main(), before Ray and JAX
LOAD_PID = None
_CLIENTS = {}  # in the load process: (case, address, index) -> client, kept open


def _client(case, address, index):
    key = (case, address, index)
    if key not in _CLIENTS:
        if case == "grpc":
            from coordinator.client import GemmaClient
            _CLIENTS[key] = GemmaClient(address)
        elif case == "http raw float":
            host, port = address.rsplit(":", 1)
            _CLIENTS[key] = http.client.HTTPConnection(host, int(port), timeout=120)
        else:
            import openai
            _CLIENTS[key] = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused",
                                          max_retries=0, timeout=120)
    return _CLIENTS[key]


def _call(case, client, model, text):
    if case == "grpc":
        return client.forward(texts=[text], pooling="mean", normalize=True, timeout=120)
    if case == "http float":
        return client.embeddings.create(model=model, input=text, encoding_format="float")
    if case == "http raw float":  # the same request and answer, no SDK
        body = json.dumps({"model": model, "input": text, "encoding_format": "float"})
        headers = {"Content-Type": "application/json", "Authorization": "Bearer unused"}
        try:
            client.request("POST", "/v1/embeddings", body, headers)
            response = client.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            # The server closed it while idle (the front's keep-alive
            # timeout): reconnect once, as httpx does for the SDK.
            client.close()
            client.request("POST", "/v1/embeddings", body, headers)
            response = client.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
        return json.loads(body)
    return client.embeddings.create(model=model, input=text)  # the SDK's default: base64


def _load(case, address, model, texts_per_client):
    """One thread per client, all released together; each sends its texts
    back to back. Returns (latencies in seconds, wall seconds)."""
    count = len(texts_per_client)
    clients = [_client(case, address, i) for i in range(count)]
    latencies = [[] for _ in range(count)]
    spans, errors = [None] * count, []
    barrier = threading.Barrier(count)

    def work(index):
        try:
            barrier.wait()
            start = time.perf_counter()
            for text in texts_per_client[index]:
                t0 = time.perf_counter()
                _call(case, clients[index], model, text)
                latencies[index].append(time.perf_counter() - t0)
            spans[index] = (start, time.perf_counter())
        except BaseException as error:  # noqa: BLE001 - reported to the parent
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{case}: {type(errors[0]).__name__}: {errors[0]}")
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return [x for per_client in latencies for x in per_client], wall


def _embeddings(case, address, model, texts):
    """Each text's embedding from case's first client, as float32 arrays, and
    the token counts the server reports (gRPC: per text; HTTP: usage)."""
    client = _client(case, address, 0)
    if case == "grpc":
        result = client.forward(texts=texts, pooling="mean", normalize=True, timeout=120)
        return ([np.asarray(per_layer[0], np.float32) for per_layer in result.hidden_states],
                sum(len(ids) for ids in result.token_ids))
    if case == "http raw float":
        result = _call(case, client, model, texts)
        return ([np.asarray(item["embedding"], np.float32) for item in result["data"]],
                result["usage"]["prompt_tokens"])
    kwargs = {"encoding_format": "float"} if case == "http float" else {}
    result = client.embeddings.create(model=model, input=texts, **kwargs)
    return ([np.asarray(item.embedding, np.float32) for item in result.data],
            result.usage.prompt_tokens)


def _close():
    for key in list(_CLIENTS):
        _CLIENTS.pop(key).close()


def run_load(case, address, model, texts_per_client):
    return LOAD_PROCESS.submit(_load, case, address, model, texts_per_client).result()


# ---- main ------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=8,
                        help="requests per client per round (R)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds; each runs every case once, order rotating")
    parser.add_argument("--tokens", type=int, default=32,
                        help="tokens per text, <bos> included")
    parser.add_argument("--no-base64", action="store_true",
                        help="skip the SDK-default (base64) HTTP case")
    parser.add_argument("--no-raw", action="store_true",
                        help="skip the SDK-less HTTP case (http.client + json, float)")
    parser.add_argument("--gpus", action="store_true",
                        help="the worker on a GPU from Ray (run with JAX_PLATFORMS=cuda)")
    parser.add_argument("--max-wait-ms", type=float, default=None,
                        help="override BatchingConfig.max_wait_ms (default: its default)")
    args = parser.parse_args()
    skip = {"http base64"} if args.no_base64 else set()
    skip |= {"http raw float"} if args.no_raw else set()
    cases = [c for c in CASES if c not in skip]

    global LOAD_PROCESS, LOAD_PID
    LOAD_PROCESS = concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    LOAD_PID = LOAD_PROCESS.submit(os.getpid).result()  # started before Ray and JAX

    import ray

    from gemma_core.default_preset import TOKENIZER_ASSET
    from gemma_core.gemma_tokenizer import GemmaTokenizer
    from worker.worker_config import BatchingConfig

    overrides = {} if args.max_wait_ms is None else {"max_wait_ms": args.max_wait_ms}
    batching = dataclasses.replace(BatchingConfig(), **overrides)

    # The environment service_throughput.py's main() sets up, before ray.init.
    workdir = tempfile.mkdtemp(prefix="gemma-serve-bench-")
    os.environ["GEMMA_SERVE_CACHE"] = os.path.join(workdir, "cache")
    os.environ["GEMMA_SERVE_DATA"] = os.path.join(workdir, "data")
    os.environ.pop("GEMMA_SERVE_API_KEYS", None)  # auth off: any key is accepted
    os.environ.setdefault("GEMMA_SERVE_LOG_LEVEL", "WARNING")
    if args.gpus:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.WARNING)
    logging.getLogger("gemma_serve.requests").setLevel(os.environ["GEMMA_SERVE_LOG_LEVEL"])
    failures = []
    try:
        import jax

        print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  "
              f"cpu cores: {os.cpu_count()}  jax {jax.__version__} devices: {jax.devices()}  "
              f"ray {ray.__version__}")
        print(f"one worker, mesh 1x1, mid model {st.MID_CONFIG}; {batching}")
        tokenizer = GemmaTokenizer(TOKENIZER_ASSET)
        preset = st.make_mid_preset(os.path.join(workdir, "mid"))
        tokenizer.save_to_preset(preset)  # the default model's: ids < 1024 < 32000
        results, cpu, texts_used = bench(args, cases, preset, batching, tokenizer, failures)
    finally:
        try:
            LOAD_PROCESS.submit(_close).result()
        finally:
            LOAD_PROCESS.shutdown()
            ray.shutdown()
            shutil.rmtree(workdir, ignore_errors=True)

    report(args, cases, results, cpu, texts_used, failures)
    return 1 if failures else 0


def bench(args, cases, preset, batching, tokenizer, failures):
    from coordinator.client import GemmaClient
    from coordinator.server_thread import ServerThread
    from coordinator.service_config import ServiceConfig
    from worker.worker_config import WorkerSpec

    spec = WorkerSpec(preset=preset, mesh_shape=(1, 1), batching=batching,
                      use_gpus=args.gpus)
    config = ServiceConfig(worker=spec, num_workers=1, host="127.0.0.1", port=0,
                           http_port=0,
                           max_sequences_per_request=max(64, batching.batch_buckets[-1]))
    assert config.api_keys_file is None and "GEMMA_SERVE_API_KEYS" not in os.environ
    started = time.perf_counter()
    server = ServerThread(config)
    grpc_address, http_address = server.address, server.http_address
    control = GemmaClient(grpc_address)
    rounds, n = args.rounds, args.clients * args.requests
    # Round 0 warms (untimed); texts are distinct across every pass.
    all_texts = make_texts(tokenizer, (rounds + 1) * n + 8, args.tokens, seed=7)
    check_texts, all_texts = all_texts[:8], all_texts[8:]
    per_round = [[all_texts[r * n + c * args.requests: r * n + (c + 1) * args.requests]
                  for c in range(args.clients)] for r in range(rounds + 1)]
    try:
        import openai

        model = openai.OpenAI(base_url=f"http://{http_address}/v1", api_key="unused",
                              max_retries=0).models.list().data[0].id
        # One request of b texts makes one batch of b rows: every batch bucket
        # the load can produce is compiled before timing.
        for b in batching.batch_buckets:
            if b > batching.batch_bucket(args.clients):
                break
            control.forward(texts=all_texts[:b], pooling="mean", normalize=True, timeout=600)
        print(f"service started and warmed in {time.perf_counter() - started:.1f}s "
              f"(gRPC {grpc_address}, HTTP {http_address}, model {model!r})", flush=True)

        # Correctness, on the side: the same texts through every case.
        reference, tokens = LOAD_PROCESS.submit(_embeddings, "grpc", grpc_address, model,
                                                check_texts).result()
        for case in cases[1:]:
            vectors, usage = LOAD_PROCESS.submit(_embeddings, case, http_address, model,
                                                 check_texts).result()
            worst = max(float(np.max(np.abs(a - b))) for a, b in zip(vectors, reference))
            print(f"check: {case} vs grpc, {len(check_texts)} texts: max |diff| {worst:.2e}, "
                  f"usage {usage} tokens (gRPC {tokens})")
            if len(vectors) != len(reference) or not worst <= TOLERANCE:
                failures.append(f"{case} embeddings differ from gRPC's by {worst:.2e} "
                                f"(> {TOLERANCE:g})")
            if usage != tokens:
                failures.append(f"{case} usage.prompt_tokens {usage} != gRPC's {tokens}")

        worker_pid = int(control.model_info()["workers"][0]["pid"])
        roles = {os.getpid(): "coordinator", LOAD_PID: "clients", worker_pid: "worker"}
        address = {"grpc": grpc_address}
        results = {case: dict(latencies=[], walls=[]) for case in cases}
        cpu = {case: {} for case in cases}
        for case in cases:  # untimed: connects every client, warms both paths
            run_load(case, address.get(case, http_address), model, per_round[0])
        for r in range(1, rounds + 1):
            shift = (r - 1) % len(cases)
            for case in cases[shift:] + cases[:shift]:
                counters, before = st.worker_counters(control), st.process_cpu_seconds()
                latencies, wall = run_load(case, address.get(case, http_address), model,
                                           per_round[r])
                split = st.cpu_split(before, st.process_cpu_seconds(), roles)
                counters = [b - a for a, b in zip(counters, st.worker_counters(control))]
                split["batches"], split["rows"] = counters[0], counters[1]
                for role, seconds in split.items():
                    cpu[case][role] = cpu[case].get(role, 0.0) + seconds
                results[case]["latencies"] += latencies
                results[case]["walls"].append(wall)
                print(f"round {r}: {case:<14} {len(latencies)} requests in {wall:.2f}s "
                      f"({len(latencies) / wall:.1f} req/s)", flush=True)
    finally:
        control.close()
        server.stop()
    used = [len(tokenizer.tokenize(t, add_bos=True)) for t in all_texts]
    return results, cpu, (min(used), max(used))


def report(args, cases, results, cpu, token_range, failures):
    rate, p50, p99 = {}, {}, {}
    for case in cases:
        res = results[case]
        # The median round: a burst of background load that slows one
        # round (of one case) weighs nothing.
        rate[case] = statistics.median(
            len(res["latencies"]) / len(res["walls"]) / wall for wall in res["walls"])
        p50[case] = st.percentile_ms(res["latencies"], 50)
        p99[case] = st.percentile_ms(res["latencies"], 99)
    print()
    print(f"{args.clients} clients (threads, one client object each) x {args.requests} "
          f"requests x {args.rounds} rounds per case; 1 text of {token_range[0]}-"
          f"{token_range[1]} tokens per request; mean pooling, normalized, final layer")
    print("CPU ms per request, by process; rows per worker batch:")
    roles = ("coordinator", "clients", "worker", "ray")
    print(f"  {'case':<14} " + " ".join(f"{role:>11}" for role in roles)
          + f" {'total':>8} {'rows/batch':>10}")
    for case in cases:
        count = len(results[case]["latencies"])
        per = {role: 1e3 * cpu[case].get(role, 0.0) / count for role in roles}
        rows = cpu[case]["rows"] / max(1, cpu[case]["batches"])
        print(f"  {case:<14} " + " ".join(f"{per[role]:>11.2f}" for role in roles)
              + f" {sum(per.values()):>8.2f} {rows:>10.1f}")
    print()
    rows = [("grpc Forward req/s", f"{rate['grpc']:.1f}", "-", "-", "-", "-")]
    for case in cases[1:]:
        ratio = rate[case] / rate["grpc"]
        met = "yes" if ratio >= THROUGHPUT_TARGET else "no"
        rows.append((f"{case} req/s", f"{rate[case]:.1f}", f"{rate['grpc']:.1f}",
                     f"{ratio:.2f}", f">= {THROUGHPUT_TARGET}", met))
    for case in cases:
        rows.append((f"{case} p50 ms", f"{p50[case]:.1f}",
                     "-" if case == "grpc" else f"{p50['grpc']:.1f}",
                     "-" if case == "grpc" else f"{p50[case] / p50['grpc']:.2f}", "-", "-"))
    for case in cases:
        rows.append((f"{case} p99 ms", f"{p99[case]:.1f}",
                     "-" if case == "grpc" else f"{p99['grpc']:.1f}",
                     "-" if case == "grpc" else f"{p99[case] / p99['grpc']:.2f}", "-", "-"))
    header = ("measurement", "value", "baseline", "ratio", "target", "met?")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    print()
    ratio = rate["http float"] / rate["grpc"]
    verdict = "PASS" if ratio >= THROUGHPUT_TARGET else "MISS"
    print(f"{verdict}: /v1/embeddings (float) throughput at {args.clients} clients = "
          f"{ratio:.2f} x gRPC Forward's (target >= {THROUGHPUT_TARGET})")
    for failure in failures:
        print(f"CHECK FAILED: {failure}")


if __name__ == "__main__":
    sys.exit(main())
