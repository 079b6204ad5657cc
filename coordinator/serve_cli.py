"""`gemma-serve`: start the coordinator and its workers.

`gemma-serve plan --preset P --mesh DxM ...` prints per-device memory for a
layout instead, loading nothing (see coordinator/plan_cli.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from coordinator.admission_control import AdmissionLimits
from coordinator.server import GemmaServer
from coordinator.service_config import ServiceConfig
from coordinator.storage_quota import StorageQuota
from coordinator.stream_guard import StreamLimits
from gemma_core import DEFAULT_PRESET
from gemma_core.matmul_precision import compute_summary
from worker.errors import WorkerError
from worker.log_format import LOG_FORMAT_ENV, LOG_LEVEL_ENV, configure_logging
from worker.worker_config import BatchingConfig, WorkerSpec

# Flags of the removed socket transport between coordinator and workers.
REMOVED_FLAGS = ("--forward-transport", "--coalesce-ms")


def _warn_removed(args) -> None:
    for flag in REMOVED_FLAGS:
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None:
            print(f"gemma-serve: {flag} is ignored: forward work always travels as Ray calls "
                  "now, batched by each worker's scheduler in the coordinator.",
                  file=sys.stderr)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.replace("x", ",").split(",") if part)


def _joined(values) -> str:
    return ",".join(map(str, values))


def parse_args(argv=None) -> ServiceConfig:
    p = argparse.ArgumentParser(prog="gemma-serve", description=__doc__)
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help="built-in name, kaggle://..., hf://org/repo, or a local keras_hub or "
                        "Hugging Face directory; default: the built-in random-weight model")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to serve on (default %(default)s; 0.0.0.0 or [::] for all)")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--workers", type=int, default=1, help="worker actors")
    p.add_argument("--mesh", type=_ints, default=(1, 1),
                   help="per-worker mesh as DATAxMODEL, e.g. 1x2 (devices = product)")
    p.add_argument("--gpus", action="store_true",
                   help="give each worker GPUs from Ray instead of fake CPU devices")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="CPUs each worker reserves from Ray (a count for placement, not "
                        "pinned cores) and the number of XLA compute threads it runs "
                        "(default: reserves 1, XLA runs a thread per core it sees; set it "
                        "when several CPU workers share a node)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "mixed_bfloat16"],
                   help="override the preset's dtype policy")
    p.add_argument("--length-buckets", type=_ints, default=BatchingConfig.length_buckets,
                   help="comma-separated padded lengths (default "
                        f"{_joined(BatchingConfig.length_buckets)}); the last is the longest "
                        "sequence accepted. Each (batch, length) bucket pair is one compiled "
                        "function")
    p.add_argument("--batch-buckets", type=_ints, default=BatchingConfig.batch_buckets,
                   help="comma-separated padded batch sizes (default "
                        f"{_joined(BatchingConfig.batch_buckets)}); the last is the most rows "
                        "a batch holds")
    p.add_argument("--max-batch-tokens", type=int, default=BatchingConfig.max_batch_tokens,
                   help="padded rows x length a batch may hold (default %(default)s; bounds "
                        "activation memory)")
    p.add_argument("--max-wait-ms", type=float, default=BatchingConfig.max_wait_ms,
                   help="least time a batch waits for the rows expected to join it "
                        "(default %(default)s); under load the scheduler waits up to a fifth of "
                        "the last batch's time, and only as long as waiting can pay")
    # Removed with the socket transport: accepted, so existing command lines
    # keep working, and ignored with a warning (see `_warn_removed`).
    for removed in REMOVED_FLAGS:
        p.add_argument(removed, help=argparse.SUPPRESS)
    p.add_argument("--max-layers-per-request", type=int, default=BatchingConfig.layer_slots,
                   help="distinct layers a request (and a batch) may ask for "
                        "(default %(default)s)")
    p.add_argument("--max-sequences-per-request", type=int, default=64,
                   help="texts or token sequences in one Forward request (default %(default)s)")
    p.add_argument("--max-text-bytes", type=int, default=65536,
                   help="UTF-8 bytes of one text before tokenizing (default %(default)s)")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. 10.0.0.1:6379); default: start a local one")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--max-adapters", type=int, default=WorkerSpec.max_adapters,
                   help="LoRA adapter slots per worker (least recently used are evicted)")
    p.add_argument("--max-adapter-rank", type=int, default=WorkerSpec.max_adapter_rank,
                   help="largest LoRA rank served (smaller ranks are zero-padded)")
    p.add_argument("--data-dir", default=ServiceConfig.__dataclass_fields__["data_dir"]
                   .default_factory(),
                   help="where adapters and datasets are stored (env GEMMA_SERVE_DATA); "
                        "one server per directory")
    p.add_argument("--api-keys-file", default=None,
                   help='JSON {"<key>": "<tenant>"}; default: env GEMMA_SERVE_API_KEYS '
                        "(tenant=key,...), else auth off with one tenant 'default'")
    p.add_argument("--max-upload-mib", type=float, default=64,
                   help="size cap of an adapter or dataset upload")
    p.add_argument("--tls-cert", default=None, help="serve TLS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="the certificate's private key (PEM)")
    p.add_argument("--tls-client-ca", default=None,
                   help="require client certificates signed by this CA (mutual TLS)")
    limits = AdmissionLimits()
    p.add_argument("--tenant-max-requests", type=int, default=limits.max_requests,
                   help="concurrent Forward calls per tenant (beyond: RESOURCE_EXHAUSTED)")
    p.add_argument("--tenant-max-tokens", type=int, default=limits.max_tokens,
                   help="tokens in flight per tenant")
    p.add_argument("--tenant-max-fine-tunes", type=int, default=limits.max_fine_tunes,
                   help="queued or running fine-tune jobs per tenant")
    p.add_argument("--max-queued-sequences", type=int,
                   default=limits.max_queued_sequences_per_worker,
                   help="sequences of one tenant a worker may hold before that tenant's new "
                        "requests are refused (a share per tenant: one tenant's load never "
                        "refuses another's calls)")
    quota = StorageQuota()
    p.add_argument("--tenant-max-adapter-versions", type=int,
                   default=quota.max_adapter_versions,
                   help="adapter versions a tenant may store, all names together "
                        "(default %(default)s; beyond: RESOURCE_EXHAUSTED)")
    p.add_argument("--tenant-max-adapter-mib", type=float,
                   default=quota.max_adapter_bytes / (1 << 20),
                   help="MiB of adapter files a tenant may store (default %(default)g)")
    p.add_argument("--tenant-max-datasets", type=int, default=quota.max_datasets,
                   help="uploaded datasets a tenant may store (default %(default)s)")
    p.add_argument("--tenant-max-dataset-mib", type=float,
                   default=quota.max_dataset_bytes / (1 << 20),
                   help="MiB of stored datasets a tenant may keep (default %(default)g)")
    streams = StreamLimits()
    p.add_argument("--stream-idle-timeout-s", type=float, default=streams.idle_timeout_s,
                   help="an upload that sends no message, or a response stream whose client "
                        "takes none, for this long ends DEADLINE_EXCEEDED, releasing what it "
                        "holds (default %(default)g)")
    p.add_argument("--upload-timeout-s", type=float, default=streams.upload_timeout_s,
                   help="most seconds one adapter or dataset upload may take, start to end "
                        "(default %(default)g; beyond: DEADLINE_EXCEEDED)")
    p.add_argument("--tenant-max-uploads", type=int, default=streams.max_uploads_per_tenant,
                   help="adapter and dataset uploads a tenant may have open at once "
                        "(default %(default)s; beyond: RESOURCE_EXHAUSTED)")
    p.add_argument("--adapter-source-root", default=None, metavar="DIR",
                   help="RegisterAdapter may copy adapters from paths under DIR on this "
                        "machine (and nowhere else; symbolic links leading out are refused); "
                        "default: no local paths")
    p.add_argument("--compilation-cache-dir", default=None,
                   help="where workers keep their compiled bucket programs (JAX's persistent "
                        "compilation cache, a directory on each worker's node), so a restart "
                        "loads them instead of compiling; default <data-dir>/compilation-cache, "
                        "or with --ray-address each node's ~/.cache/gemma-serve/compilation-cache")
    p.add_argument("--shutdown-grace-s", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight calls may take to finish")
    p.add_argument("--http-port", type=int, default=None, metavar="PORT",
                   help="serve OpenAI's embeddings API (POST /v1/embeddings, GET /v1/models) "
                        "over HTTP on this port of --host, with the same keys, TLS and "
                        "limits; 0 picks a free one (default: off)")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="Prometheus /metrics port; -1 turns it off, 0 picks a free one")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="interface of the metrics port (0.0.0.0 to expose it)")
    p.add_argument("--log-format", choices=["plain", "json"], default=None,
                   help="log lines as text or JSON objects (env GEMMA_SERVE_LOG_FORMAT); "
                        "workers follow")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None,
                   help="INFO (default) logs one line per request in the coordinator, with its "
                        "request id and its time in the worker; DEBUG adds the worker's own "
                        "line (env GEMMA_SERVE_LOG_LEVEL)")
    args = p.parse_args(argv)
    _warn_removed(args)
    # Through the environment, so the worker actors follow.
    if args.log_format:
        os.environ[LOG_FORMAT_ENV] = args.log_format
    if args.log_level:
        os.environ[LOG_LEVEL_ENV] = args.log_level
    batching = BatchingConfig(
        length_buckets=args.length_buckets, batch_buckets=args.batch_buckets,
        max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
        layer_slots=args.max_layers_per_request)
    spec = WorkerSpec(preset=args.preset, mesh_shape=tuple(args.mesh), dtype=args.dtype,
                      use_gpus=args.gpus, batching=batching, max_adapters=args.max_adapters,
                      max_adapter_rank=args.max_adapter_rank, cpus=args.cpus_per_worker,
                      compilation_cache_dir=args.compilation_cache_dir)
    return ServiceConfig(worker=spec, num_workers=args.workers, host=args.host,
                         port=args.port, ray_address=args.ray_address,
                         ray_num_cpus=args.ray_num_cpus,
                         max_sequences_per_request=args.max_sequences_per_request,
                         max_text_bytes=args.max_text_bytes, data_dir=args.data_dir,
                         api_keys_file=args.api_keys_file,
                         max_upload_bytes=int(args.max_upload_mib * (1 << 20)),
                         adapter_source_root=args.adapter_source_root,
                         http_port=args.http_port,
                         metrics_host=args.metrics_host,
                         metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                         tls_cert=args.tls_cert, tls_key=args.tls_key,
                         tls_client_ca=args.tls_client_ca,
                         shutdown_grace_s=args.shutdown_grace_s,
                         storage_quota=StorageQuota(
                             max_adapter_versions=args.tenant_max_adapter_versions,
                             max_adapter_bytes=int(args.tenant_max_adapter_mib * (1 << 20)),
                             max_datasets=args.tenant_max_datasets,
                             max_dataset_bytes=int(args.tenant_max_dataset_mib * (1 << 20))),
                         streams=StreamLimits(
                             idle_timeout_s=args.stream_idle_timeout_s,
                             upload_timeout_s=args.upload_timeout_s,
                             max_uploads_per_tenant=args.tenant_max_uploads),
                         admission=AdmissionLimits(
                             max_requests=args.tenant_max_requests,
                             max_tokens=args.tenant_max_tokens,
                             max_fine_tunes=args.tenant_max_fine_tunes,
                             max_queued_sequences_per_worker=args.max_queued_sequences))


def ready_line(server: GemmaServer) -> str:
    config = server.config
    weights = (" (RANDOM WEIGHTS: the built-in default model; outputs are meaningless. "
               "Use --preset for real weights)" if config.worker.preset == DEFAULT_PRESET else "")
    mesh = "x".join(map(str, config.worker.mesh_shape))
    tenants = server.auth.tenants()
    auth = (f"auth=on ({len(tenants)} tenants)" if server.auth.enabled else
            f"auth=OFF (single tenant '{tenants[0]}'; set GEMMA_SERVE_API_KEYS or "
            "--api-keys-file to require keys)")
    tls = ("mtls" if config.tls_client_ca else "tls") if config.tls_cert else "plaintext"
    infos = server.ready_infos
    programs = (f" programs={len(config.worker.batching.shapes())} buckets per worker in "
                f"{max(i.compile_seconds for i in infos):.1f}s "
                f"({sum(i.programs_from_cache for i in infos)} from the cache)"
                if infos else "")
    dtype = server.model_dtype
    return (f"gemma-serve ready on {config.host}:{server.port} ({tls}) "
            f"preset={config.worker.preset}"
            f"{weights} workers={config.num_workers} mesh={mesh} "
            f"dtype={dtype} ({compute_summary(dtype)}){programs} "
            f"ray={'local' if not config.ray_address else config.ray_address} {auth} "
            f"adapters={config.data_dir}" + (
                f" http={'https' if config.tls_cert else 'http'}://{config.host}:"
                f"{server.http_port}/v1" if server.http_port is not None else "") + (
                f" metrics=http://{config.metrics_host}:{server.metrics_port}/metrics"
                if server.metrics_port is not None else ""))


async def serve(config: ServiceConfig) -> None:
    server = GemmaServer(config)
    await server.start()
    print(ready_line(server), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("gemma_serve").warning(
        "shutting down: draining for up to %.0fs", config.shutdown_grace_s)
    await server.stop(grace=config.shutdown_grace_s)
    print("gemma-serve stopped", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # `gemma-serve plan ...`: memory per device, nothing loaded
        from coordinator.plan_cli import main as plan_main
        sys.exit(plan_main(argv[1:]))
    try:
        config = parse_args(argv)
        configure_logging()
        asyncio.run(serve(config))
    except (ValueError, RuntimeError, WorkerError) as error:  # PresetError is a ValueError;
        # grpc raises RuntimeError for a port it cannot bind.
        sys.exit(f"gemma-serve: {error}")


if __name__ == "__main__":
    main()
