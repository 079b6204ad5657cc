"""The coordinator's configuration and the limits it enforces."""

from __future__ import annotations

import dataclasses
import os

from coordinator.admission_control import AdmissionLimits
from coordinator.storage_quota import StorageQuota
from coordinator.stream_guard import StreamLimits
from worker.worker_config import WorkerSpec


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for. Model-derived sizes come from the
    preset; the rest are operator choices."""

    vocabulary_size: int
    num_layers: int
    hidden_dim: int
    max_sequence_length: int
    max_sequences_per_request: int = 64
    max_layers_per_request: int = 4
    max_text_bytes: int = 65536


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """Everything `gemma-serve` starts from.

    Attributes:
        worker: the spec every worker is built from.
        num_workers: how many worker actors.
        host, port: where gRPC listens (port 0 picks a free one).
        ray_address: join this Ray cluster; None starts a local one.
        ray_num_cpus: CPUs of a local Ray (None: all).
        max_sequences_per_request, max_text_bytes: request limits.
        chunk_bytes: payload bytes per streamed chunk (gRPC's default
            message limit is 4 MiB).
        data_dir: where adapters (`adapters/`) and datasets (`datasets/`)
            are stored; survives restarts. One server at a time: it holds
            a lock there (coordinator/single_instance.py).
        api_keys_file: JSON {"<key>": "<tenant>"}; None reads
            GEMMA_SERVE_API_KEYS, and with neither, auth is off (one tenant).
        max_upload_bytes: size cap of an adapter or dataset upload.
        adapter_source_root: RegisterAdapter may copy adapters from local
            paths under this directory, and nowhere else; None: none.
        http_port: the HTTP front (OpenAI's embeddings API, on `host`, with
            the same keys, TLS and limits); None turns it off, 0 picks a
            free port.
        metrics_host, metrics_port: the Prometheus endpoint (`/metrics`);
            port None turns it off, 0 picks a free one. Loopback unless set.
        admission: per-tenant and per-worker limits on work in flight.
        storage_quota: per-tenant limits on stored adapters and datasets.
        streams: idle and upload timeouts, uploads open per tenant.
        tls_cert, tls_key: PEM files; set both to serve TLS only.
        tls_client_ca: PEM CA; set it to require client certificates it
            signed (mutual TLS).
        shutdown_grace_s: on SIGTERM, how long in-flight calls may run on.
    """

    worker: WorkerSpec
    num_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    ray_address: str | None = None
    ray_num_cpus: int | None = None
    max_sequences_per_request: int = 64
    max_text_bytes: int = 65536
    chunk_bytes: int = 1 << 20
    data_dir: str = dataclasses.field(default_factory=lambda: os.environ.get(
        "GEMMA_SERVE_DATA", os.path.expanduser("~/.local/share/gemma-serve")))
    api_keys_file: str | None = None
    max_upload_bytes: int = 64 << 20
    adapter_source_root: str | None = None
    http_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    admission: AdmissionLimits = AdmissionLimits()
    storage_quota: StorageQuota = StorageQuota()
    streams: StreamLimits = StreamLimits()
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.chunk_bytes <= 3 << 20:
            raise ValueError("chunk_bytes must be in (0, 3 MiB] to stay under 4 MiB.")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key file.")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("mutual TLS (a client CA) needs the server's own certificate "
                             "and key too.")
        if self.adapter_source_root and not os.path.isdir(self.adapter_source_root):
            raise ValueError(f"--adapter-source-root {self.adapter_source_root} is not a "
                             "directory.")
        for path in (self.tls_cert, self.tls_key, self.tls_client_ca):
            if path and not os.path.isfile(path):
                raise ValueError(f"TLS file {path} does not exist.")
