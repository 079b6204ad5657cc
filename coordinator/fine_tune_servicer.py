"""FineTuneService over gRPC: translate, delegate to FineTuneJobs, translate back."""

from __future__ import annotations

import asyncio
import dataclasses

from coordinator import off_loop
from coordinator.adapter_manager import AdapterManager
from coordinator.adapter_record import check_name
from coordinator.dataset_store import DatasetStore
from coordinator.errors import InvalidArgument
from coordinator.fine_tune_jobs import FineTuneJob, FineTuneJobs
from coordinator.fine_tune_request import (check_training_length, cheap_to_parse,
                                           parse_dataset_file, parse_fine_tune_request)
from coordinator.generated.gemma.v1 import finetune_service_pb2 as pb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as pb_grpc
from coordinator.service_config import ServiceLimits
from coordinator.stream_guard import UploadGuard, data_chunks, receive_to_file
from coordinator.tenant_auth import TenantAuth
from gemma_core import FineTuneConfig, GemmaTokenizer, LoraAdapter, lora_targets
from worker.fine_tune_session import FineTuneWork

STATES = {"queued": pb.FINE_TUNE_STATE_QUEUED, "running": pb.FINE_TUNE_STATE_RUNNING,
          "succeeded": pb.FINE_TUNE_STATE_SUCCEEDED, "failed": pb.FINE_TUNE_STATE_FAILED,
          "cancelled": pb.FINE_TUNE_STATE_CANCELLED,
          "interrupted": pb.FINE_TUNE_STATE_INTERRUPTED}


def job_message(job: FineTuneJob) -> pb.FineTuneJob:
    return pb.FineTuneJob(
        job_id=job.job_id, state=STATES[job.state], adapter_name=job.adapter_name,
        adapter_id=job.adapter_id, step=job.step, total_steps=job.total_steps, loss=job.loss,
        first_loss=job.first_loss, tokens_per_second=job.tokens_per_second,
        eta_seconds=job.eta_seconds, error=job.error, worker_id=job.worker_id,
        created=job.created)


def continued(config: FineTuneConfig, request, initial: LoraAdapter,
              initial_id: str) -> FineTuneConfig:
    """`config` for continuing `initial`: its rank unless the request sets
    one (at least it: the extra rank starts at zero, so training starts from
    it), its targets unless the request names some (a superset of them), and
    its query/key/value factor form (so a keras_hub-form query/value adapter
    extended to key trains key per head too, and exports to PEFT at heads
    times the rank there)."""
    rank = initial.largest_rank
    if request.rank and request.rank < rank:
        raise InvalidArgument("rank", f"{request.rank} is below the rank of the initial "
                                      f"adapter {initial_id} ({rank}); leave it unset or use "
                                      f">= {rank}.")
    targets = config.targets if request.targets else initial.targets
    missing = [t for t in initial.targets if t not in targets]
    if missing:
        raise InvalidArgument("targets", f"the initial adapter {initial_id} adapts {missing} "
                                         "too; name every projection it adapts, or leave "
                                         "targets unset.")
    forms = {lora_targets.form_of(t, a) for (_, t), (a, _) in initial.kernels.items()
             if t in lora_targets.HEAD_TARGETS}
    if len(forms) > 1:
        raise InvalidArgument("initial_adapter_id", f"{initial_id} mixes keras_hub's and "
                                                    "PEFT's query/key/value factor forms; "
                                                    "training continues one form only.")
    return dataclasses.replace(config, rank=request.rank or rank, targets=targets,
                               factor_form=forms.pop() if forms else None)


class FineTuneServicer(pb_grpc.FineTuneServiceServicer):
    def __init__(self, auth: TenantAuth, jobs: FineTuneJobs, adapters: AdapterManager,
                 datasets: DatasetStore, limits: ServiceLimits,
                 tokenizer: GemmaTokenizer | None, max_upload_bytes: int,
                 max_batch_tokens: int, uploads: UploadGuard):
        self._auth = auth
        self._jobs = jobs
        self._adapters = adapters
        self._datasets = datasets
        self._limits = limits
        self._tokenizer = tokenizer
        self._max_upload_bytes = max_upload_bytes
        self._max_batch_tokens = max_batch_tokens
        self._uploads = uploads

    def _tenant(self, context) -> str:
        return self._auth.tenant_for_metadata(context.invocation_metadata())

    async def UploadDataset(self, request_iterator, context):
        tenant = self._tenant(context)
        with self._uploads.upload(tenant, request_iterator) as messages:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "name":
                raise InvalidArgument("name", "the first message must carry the dataset "
                                              "name, the rest its JSON Lines bytes.")
            name = check_name("name", first.name)
            # To disk as it comes, parsed from there: memory holds the
            # result, never the upload. The slot is held until the parse
            # and the save have ended, even for a cancelled call (off_loop),
            # and a call cancelled before the save never saves.
            path = self._datasets.new_upload_path()
            try:
                await receive_to_file(data_chunks(messages, "name"), path,
                                      self._max_upload_bytes,
                                      f"the dataset is larger than the {self._max_upload_bytes} "
                                      "byte upload limit (--max-upload-mib).")
                sequences = await off_loop.TRAINING_DATA.run(tenant, parse_dataset_file, path,
                                                             self._limits, self._tokenizer)
            finally:
                path.unlink(missing_ok=True)
            examples, tokens = await off_loop.in_thread(self._datasets.save, tenant, name,
                                                        sequences)
        return pb.Dataset(dataset_id=name, num_examples=examples, num_tokens=tokens)

    async def ListDatasets(self, request, context):
        found = await asyncio.to_thread(self._datasets.list, self._tenant(context))
        return pb.ListDatasetsResponse(datasets=[
            pb.Dataset(dataset_id=name, num_examples=examples, num_tokens=tokens)
            for name, examples, tokens in found])

    async def DeleteDataset(self, request, context):
        examples, tokens = await asyncio.to_thread(self._datasets.delete, self._tenant(context),
                                                   request.dataset_id)
        return pb.Dataset(dataset_id=request.dataset_id, num_examples=examples,
                          num_tokens=tokens)

    async def StartFineTune(self, request, context):
        tenant = self._tenant(context)
        self._jobs.check_room(tenant)  # a tenant at its limit costs no parsing
        arguments = (request, self._limits, self._tokenizer, self._adapters.max_rank,
                     self._max_batch_tokens)
        if cheap_to_parse(request, self._limits):  # queued behind nobody
            parsed = parse_fine_tune_request(*arguments)
        else:
            parsed = await off_loop.TRAINING_DATA.run(tenant, parse_fine_tune_request,
                                                      *arguments)
        sequences = parsed.sequences
        if sequences is None:
            sequences = await asyncio.to_thread(self._datasets.load, tenant, parsed.dataset_id)
        config, initial = parsed.config, None
        if parsed.initial_adapter_id:
            record, ref = await self._adapters.ref_for(tenant, parsed.initial_adapter_id)
            config = continued(config, request,
                               await asyncio.to_thread(self._adapters.registry.load, record),
                               parsed.initial_adapter_id)
            initial = ref.payload
        check_training_length(len(sequences), config)
        job = await self._jobs.start(tenant, parsed.adapter_name, lambda job_id: FineTuneWork(
            job_id=job_id, sequences=sequences, config=config, initial=initial))
        return job_message(job)

    async def WatchFineTune(self, request, context):
        async for job in self._jobs.watch(self._tenant(context), request.job_id):
            yield job_message(job)

    async def CancelFineTune(self, request, context):
        return job_message(await self._jobs.cancel(self._tenant(context), request.job_id))

    async def ListFineTunes(self, request, context):
        return pb.ListFineTunesResponse(
            jobs=[job_message(job) for job in self._jobs.list(self._tenant(context))])
