"""GemmaService over gRPC: translate, delegate, translate back."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from typing import Callable

from coordinator import off_loop
from coordinator.adapter_manager import AdapterManager, key_tenant
from coordinator.admission_control import TenantAdmission
from coordinator.fine_tune_jobs import FineTuneJobs
from coordinator.forward_request import cheap_to_parse, parse_forward_request
from coordinator.forward_response import response_stream
from coordinator.score_request import MAX_RESPONSE_BYTES, parse_score_request, score_response
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from coordinator.service_config import ServiceConfig, ServiceLimits
from coordinator.service_metrics import ServiceMetrics
from coordinator.tokenize_request import cheap_to_tokenize, tokenize
from coordinator.tenant_auth import TenantAuth
from gemma_core import GemmaTokenizer
from gemma_core.matmul_precision import compute_summary
from coordinator.worker_router import WorkerRouter
from gemma_core.token_scores import MAX_CANDIDATES, MAX_TOP_K_POSITIONS, max_top_k


log = logging.getLogger("gemma_serve.requests")


class GemmaServicer(pb_grpc.GemmaServiceServicer):
    """Holds no model: validation is in forward_request, routing in the
    router, batching in each worker's scheduler, the wire format in
    forward_response, errors in the interceptor."""

    def __init__(self, config: ServiceConfig, router: WorkerRouter, limits: ServiceLimits,
                 tokenizer: GemmaTokenizer | None, model_config: dict,
                 parameter_count: int, random_weights: bool, auth: TenantAuth,
                 adapters: AdapterManager, metrics: ServiceMetrics,
                 admission: TenantAdmission, jobs: FineTuneJobs):
        self._config = config
        self._router = router
        self._auth = auth
        self._adapters = adapters
        self._metrics = metrics
        self._admission = admission
        self._jobs = jobs
        self._limits = limits
        self._tokenizer = tokenizer
        self._model_config = model_config
        self._parameter_count = parameter_count
        self._random_weights = random_weights

    async def Forward(self, request, context):
        tenant = self._auth.tenant_for_metadata(context.invocation_metadata())
        # A client that stops reading is cut off after --stream-idle-timeout-s
        # (the interceptor closes this generator; see coordinator/stream_guard.py).
        async with self.forward_call(tenant, request, context.time_remaining) as (
                work, result, adapter_id):
            for response in response_stream(work, result, self._config.worker.preset,
                                            self._limits.hidden_dim, self._config.chunk_bytes,
                                            adapter_id):
                yield response

    async def Score(self, request, context):
        tenant = self._auth.tenant_for_metadata(context.invocation_metadata())
        async with self.forward_call(tenant, request, context.time_remaining,
                                     parse_score_request) as (work, result, adapter_id):
            return score_response(work, result, self._config.worker.preset, adapter_id)

    @contextlib.asynccontextmanager
    async def forward_call(self, tenant: str, request: pb.ForwardRequest | pb.ScoreRequest,
                           time_remaining: Callable[[], float | None],
                           parse=parse_forward_request):
        """Runs `request` (`parse` reads it: Forward's or Score's) for
        `tenant` and yields (work, result, the adapter id as resolved): the
        one path of Forward and Score, over gRPC and HTTP. The call is
        admitted before anything costs (adapter lookup, the worker) and
        stays admitted until the block ends: the results are in memory till
        the caller has sent them."""
        request_id = uuid.uuid4().hex[:16]
        if cheap_to_parse(request, self._limits):
            work = parse(request, self._limits, self._tokenizer, request_id, time_remaining())
        else:  # long texts, tokenized beside the loop; the deadline counts from after
            work = await off_loop.FORWARD.run(tenant, parse, request, self._limits,
                                              self._tokenizer, request_id, None)
            work = dataclasses.replace(work, timeout_s=time_remaining())
        started = time.perf_counter()
        tokens = sum(len(s) for s in work.sequences)
        with self._admission.admit(tenant, tokens):
            adapter_id = ""
            if request.adapter_id:
                record, ref = await self._adapters.ref_for(tenant, request.adapter_id)
                work = dataclasses.replace(work, adapter=ref)
                adapter_id = record.adapter_id
            result = await asyncio.wait_for(self._router.forward(work, tenant),
                                            timeout=time_remaining())
            self._metrics.record_forward(len(work.sequences), tokens)
            log.info("score %s" if work.scores else "forward %s", work.request_id, extra={
                "request_id": work.request_id, "tenant": tenant, "worker_id": result.worker_id,
                "adapter_id": adapter_id, "sequences": len(work.sequences), "tokens": tokens,
                "ms": round(1e3 * (time.perf_counter() - started), 2),
                "worker_ms": result.worker_ms})
            yield work, result, adapter_id

    async def Tokenize(self, request, context):
        tenant = self._auth.tenant_for_metadata(context.invocation_metadata())
        if cheap_to_tokenize(request, self._limits):
            return tokenize(request, self._limits, self._tokenizer)
        return await off_loop.FORWARD.run(tenant, tokenize, request, self._limits,
                                          self._tokenizer)

    async def GetModelInfo(self, request, context):
        tenant = self._auth.tenant_for_metadata(context.invocation_metadata())
        batching = self._config.worker.batching
        limits = self._limits
        info = pb.ModelInfo(
            preset=self._config.worker.preset, model_class="GemmaBackbone",
            config_json=json.dumps(self._model_config, sort_keys=True),
            dtype=self._model_config.get("dtype") or "float32",
            compute=compute_summary(self._model_config.get("dtype") or "float32"),
            random_weights=self._random_weights, parameter_count=self._parameter_count,
            base_fingerprint=self._adapters.registry.base_fingerprint,
            auth_enabled=self._auth.enabled, tenant=tenant,
            limits=pb.Limits(
                vocabulary_size=limits.vocabulary_size, num_layers=limits.num_layers,
                hidden_dim=limits.hidden_dim, max_sequence_length=limits.max_sequence_length,
                max_sequences_per_request=limits.max_sequences_per_request,
                max_layers_per_request=limits.max_layers_per_request,
                max_text_bytes=limits.max_text_bytes,
                max_batch_tokens=batching.max_batch_tokens,
                length_buckets=batching.length_buckets, batch_buckets=batching.batch_buckets,
                bucket_count=batching.bucket_count,
                max_response_chunk_bytes=self._config.chunk_bytes,
                max_adapter_rank=self._config.worker.max_adapter_rank,
                max_upload_bytes=self._config.max_upload_bytes,
                max_score_top_k=max_top_k(limits.vocabulary_size), max_score_positions=MAX_TOP_K_POSITIONS,
                max_score_candidates=MAX_CANDIDATES,
                max_score_response_bytes=MAX_RESPONSE_BYTES))
        for worker in await self._router.placement.stats():
            if self._auth.enabled:  # a tenant sees its own share of the private counters
                worker = worker.seen_by(tenant, key_tenant)
            info.workers.append(worker.to_proto())
        requests, tokens = self._admission.in_flight(tenant)
        stored = self._adapters.registry.list(tenant)
        info.usage.CopyFrom(pb.TenantUsage(
            requests_in_flight=requests, tokens_in_flight=tokens,
            adapter_versions=len(stored),
            adapter_bytes=sum(record.size_bytes for record in stored),
            fine_tunes_active=sum(job.state in ("queued", "running")
                                  for job in self._jobs.list(tenant))))
        return info

