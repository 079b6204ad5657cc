"""Assembles and runs the coordinator: Ray, workers, gRPC, health, reflection."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.adapter_manager import AdapterManager
from coordinator.admission_control import TenantAdmission
from coordinator.adapter_registry import AdapterRegistry
from coordinator.adapter_servicer import AdapterServicer
from coordinator.dataset_store import DatasetStore
from coordinator.http_front import HttpFront, http_body_limit, tls_options
from coordinator.error_interceptor import ErrorInterceptor
from coordinator.fine_tune_jobs import FineTuneJobs
from coordinator.fine_tune_servicer import FineTuneServicer
from coordinator.generated.gemma.v1 import adapter_service_pb2 as adapter_pb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as adapter_grpc
from coordinator.generated.gemma.v1 import finetune_service_pb2 as finetune_pb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as finetune_grpc
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from coordinator.local_ray import start_local_ray
from coordinator.service_config import ServiceConfig, ServiceLimits
from coordinator.service_metrics import ServiceMetrics
from coordinator.single_instance import (NO_PORT_REUSE, DataDirLock, listen,
                                         refuse_if_port_in_use)
from coordinator.servicer import GemmaServicer
from coordinator.stream_guard import UploadGuard
from coordinator.tenant_auth import TenantAuth
from worker.errors import WorkerUnavailable
from worker.worker_config import WorkerSpec
from gemma_core import DEFAULT_PRESET, GemmaConfig, GemmaTokenizer, PresetError
from gemma_core import read_preset_config

log = logging.getLogger("gemma_serve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GemmaService"].full_name
SERVICE_NAMES = (SERVICE_NAME,
                 adapter_pb.DESCRIPTOR.services_by_name["AdapterService"].full_name,
                 finetune_pb.DESCRIPTOR.services_by_name["FineTuneService"].full_name)
# Requests are small; responses stream in chunks. Both limits stay explicit.
MAX_RECEIVE_BYTES = 4 << 20
MAX_SEND_BYTES = 4 << 20


def connect_ray(config: ServiceConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if config.ray_address:  # the cluster's own auth settings apply
        ray.init(address=config.ray_address, logging_level=logging.WARNING)
    else:
        start_local_ray(config.ray_num_cpus)  # loopback only, token auth on


def worker_spec(config: ServiceConfig) -> WorkerSpec:
    """The spec workers start from: the configured one, its compiled
    programs kept under the data directory unless it names a cache. Joined
    to a cluster, workers run on other nodes, where the coordinator's data
    directory is not: each keeps its node's own cache."""
    if config.worker.compilation_cache_dir or config.ray_address:
        return config.worker
    return dataclasses.replace(config.worker, compilation_cache_dir=os.path.join(
        config.data_dir, "compilation-cache"))


def server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    """TLS from the certificate and key files, mutual TLS when a client CA is
    given (clients without a certificate it signed are refused); None for
    plaintext."""
    if not config.tls_cert:
        return None
    with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
        pair = (key.read(), cert.read())
    client_ca = None
    if config.tls_client_ca:
        with open(config.tls_client_ca, "rb") as handle:
            client_ca = handle.read()
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class GemmaServer:
    """The running service. `await start()`, then `port`; `await stop()`."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._placement = None
        self._health = health.aio.HealthServicer()
        self.auth = TenantAuth.from_sources(config.api_keys_file)
        self.metrics = ServiceMetrics()
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: HttpFront | None = None
        self.draining = False
        self.ready_infos: list = []  # each worker's ExecutorInfo when it first said ready
        self.model_dtype = "float32"  # the served dtype policy, known once started
        self._jobs: FineTuneJobs | None = None
        self._data_lock: DataDirLock | None = None

    async def start(self) -> None:
        """Starts everything, or refuses when another server holds the data
        directory or the port (AlreadyInUse), before touching either."""
        self._data_lock = DataDirLock(self.config.data_dir)
        try:
            refuse_if_port_in_use(self.config.host, self.config.port)
            await self._start()
        except BaseException:
            self._data_lock.release()
            raise

    async def _start(self) -> None:
        from coordinator.worker_placement import WorkerPlacement
        from coordinator.worker_router import WorkerRouter

        config = self.config
        class_name, model_config = read_preset_config(config.worker.preset)
        if class_name != "GemmaBackbone":
            raise PresetError(f"{config.worker.preset} holds a {class_name}; only "
                              "GemmaBackbone presets are served.")
        if config.worker.dtype:
            model_config["dtype"] = config.worker.dtype
        self.model_dtype = str(model_config.get("dtype") or "float32")
        architecture = GemmaConfig.from_kwargs(model_config)
        try:
            tokenizer = GemmaTokenizer.from_preset(config.worker.preset)
        except PresetError:
            tokenizer = None  # token ids only
            log.warning("%s has no tokenizer: texts will be refused", config.worker.preset)
        limits = ServiceLimits(
            vocabulary_size=architecture.vocabulary_size, num_layers=architecture.num_layers,
            hidden_dim=architecture.hidden_dim,
            max_sequence_length=config.worker.batching.max_sequence_length,
            max_sequences_per_request=config.max_sequences_per_request,
            max_layers_per_request=config.worker.batching.layer_slots,
            max_text_bytes=config.max_text_bytes)

        connect_ray(config)
        self._placement = WorkerPlacement(worker_spec(config), config.num_workers)
        router = WorkerRouter(self._placement,
                              config.admission.max_queued_sequences_per_worker)
        infos = await self._placement.wait_ready()
        self.ready_infos = infos
        fingerprints = {info.base_fingerprint for info in infos}
        if len(fingerprints) != 1:
            raise WorkerUnavailable(f"the workers loaded different weights ({fingerprints}); "
                                    "every node must see the same preset files.")
        registry = AdapterRegistry(os.path.join(config.data_dir, "adapters"), architecture,
                                   fingerprints.pop(), quota=config.storage_quota)
        adapters = AdapterManager(
            registry, router, config.worker.max_adapter_rank, config.max_upload_bytes,
            Path(config.adapter_source_root) if config.adapter_source_root else None)
        datasets = DatasetStore(os.path.join(config.data_dir, "datasets"),
                                config.storage_quota)
        jobs = FineTuneJobs(router, adapters, config.admission.max_fine_tunes,
                            journal=os.path.join(config.data_dir, "jobs"))
        self._jobs = jobs

        servicer = GemmaServicer(
            config, router, limits, tokenizer, model_config,
            parameter_count=architecture.num_parameters(),
            random_weights=config.worker.preset == DEFAULT_PRESET, auth=self.auth,
            adapters=adapters, metrics=self.metrics,
            admission=TenantAdmission(config.admission), jobs=jobs)
        uploads = UploadGuard(config.streams)  # one tenant's slots span adapters and datasets
        self._server = grpc.aio.server(
            interceptors=[ErrorInterceptor(self.metrics, draining=lambda: self.draining,
                                           write_timeout_s=config.streams.idle_timeout_s)],
            options=[NO_PORT_REUSE, ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                     ("grpc.max_send_message_length", MAX_SEND_BYTES)])
        pb_grpc.add_GemmaServiceServicer_to_server(servicer, self._server)
        adapter_grpc.add_AdapterServiceServicer_to_server(
            AdapterServicer(self.auth, adapters, uploads), self._server)
        finetune_grpc.add_FineTuneServiceServicer_to_server(
            FineTuneServicer(self.auth, jobs, adapters, datasets, limits, tokenizer,
                             config.max_upload_bytes, config.worker.batching.max_batch_tokens,
                             uploads),
            self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self._server)
        self.port = listen(self._server, config.host, config.port, server_credentials(config))
        await self._server.start()
        if config.http_port is not None:
            self._http = HttpFront(
                servicer, self.auth, adapters, self.metrics,
                model=os.path.basename(config.worker.preset.rstrip("/")),
                max_body_bytes=http_body_limit(config), draining=lambda: self.draining)
            self.http_port = await self._http.start(config.host, config.http_port,
                                                    tls_options(config))
        if config.metrics_port is not None:
            self.metrics.watch_workers(asyncio.get_running_loop(), self._placement.stats,
                                       jobs.counts_by_state)
            self.metrics_port = self.metrics.serve(config.metrics_host, config.metrics_port)
        await self._set_health(True)
        loop = asyncio.get_running_loop()
        self._placement.on_serving_change = lambda serving: (
            None if self.draining else loop.create_task(self._set_health(serving)))

    async def worker_infos(self) -> list:
        """Every worker's `WorkerStats`, all tenants' work included: the
        operator's view (GetModelInfo shows a tenant its own share)."""
        return await self._placement.stats()

    async def _set_health(self, serving: bool) -> None:
        """SERVING while some worker can serve; NOT_SERVING otherwise."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", *SERVICE_NAMES):
            await self._health.set(service, status)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        """Drains: health NOT_SERVING and new calls UNAVAILABLE at once,
        fine-tune jobs stopped (marked interrupted; nothing half-published:
        publishing is one atomic rename), in-flight calls given `grace`
        seconds to finish, then the workers are released."""
        self.draining = True
        await self._set_health(False)
        if self._jobs is not None:
            await self._jobs.interrupt_all(timeout_s=max(grace, 1.0))
        if self._server is not None:
            await self._server.stop(grace)
        if self._http is not None:
            await self._http.stop()
        if self._placement is not None:
            self._placement.shutdown()
        self.metrics.stop()
        if self._data_lock is not None:
            self._data_lock.release()
