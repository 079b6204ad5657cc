"""AdapterService over gRPC: translate, delegate to AdapterManager, translate back."""

from __future__ import annotations

from coordinator.adapter_manager import AdapterManager, adapter_key
from coordinator.adapter_record import AdapterRecord
from coordinator.errors import InvalidArgument
from coordinator.generated.gemma.v1 import adapter_service_pb2 as pb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as pb_grpc
from coordinator.paging import page_of
from coordinator.stream_guard import UploadGuard, data_chunks
from coordinator.tenant_auth import TenantAuth

FORMATS = {pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5: "lora.h5",
           pb.ADAPTER_FORMAT_SAFETENSORS: "safetensors", pb.ADAPTER_FORMAT_PEFT: "peft"}
EXPORT_CHUNK_BYTES = 1 << 20
# A source is stored with every version it made (Adapter.source).
MAX_SOURCE_CHARS = 1024


async def _no_messages():
    return
    yield


def adapter_message(record: AdapterRecord, resident_on=()) -> pb.Adapter:
    return pb.Adapter(
        adapter_id=record.adapter_id, name=record.name, version=record.version,
        rank=record.rank, alpha=record.alpha, targets=record.targets, layers=record.layers,
        base_fingerprint=record.base_fingerprint, sha256=record.sha256,
        size_bytes=record.size_bytes, created=record.created, source=record.source,
        num_parameters=record.num_parameters, resident_on=resident_on)


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, auth: TenantAuth, adapters: AdapterManager, uploads: UploadGuard):
        self._auth = auth
        self._adapters = adapters
        self._uploads = uploads

    def _tenant(self, context) -> str:
        return self._auth.tenant_for_metadata(context.invocation_metadata())

    async def UploadAdapter(self, request_iterator, context):
        tenant = self._tenant(context)
        with self._uploads.upload(tenant, request_iterator) as messages:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("header", "the first message must carry the header "
                                                "(name and format), the rest the file's bytes.")
            header = first.header
            if header.format not in FORMATS:
                raise InvalidArgument("header.format", "say which format the file is in: "
                                                       "KERAS_HUB_LORA_H5, SAFETENSORS or "
                                                       "PEFT (a tar archive).")
            record = await self._adapters.upload(tenant, header.name, FORMATS[header.format],
                                                 data_chunks(messages, "header"))
        return adapter_message(record)

    async def RegisterAdapter(self, request, context):
        tenant = self._tenant(context)
        if len(request.source) > MAX_SOURCE_CHARS:
            raise InvalidArgument("source", f"{len(request.source)} characters; sources are "
                                            f"at most {MAX_SOURCE_CHARS}.")
        # A copy in is an upload the server makes for the tenant: it takes one
        # of the tenant's upload slots, so downloads cannot pile up.
        with self._uploads.upload(tenant, _no_messages()):
            record = await self._adapters.register(tenant, request.name, request.source)
        return adapter_message(record)

    async def LoadAdapter(self, request, context):
        record, workers, load_ms = await self._adapters.load(self._tenant(context),
                                                             request.adapter_id)
        return pb.LoadAdapterResponse(adapter=adapter_message(record, workers),
                                      workers=workers, load_ms=load_ms)

    async def UnloadAdapter(self, request, context):
        workers = await self._adapters.unload(self._tenant(context), request.adapter_id)
        return pb.UnloadAdapterResponse(workers=workers)

    async def ListAdapters(self, request, context):
        tenant = self._tenant(context)
        records, next_token = page_of(self._adapters.registry.list(tenant),
                                      lambda record: (record.name, record.version),
                                      request.page_size, request.page_token)
        where = await self._adapters.resident_on()
        return pb.ListAdaptersResponse(adapters=[
            adapter_message(record, where.get(adapter_key(record), []))
            for record in records], next_page_token=next_token)

    async def DeleteAdapter(self, request, context):
        records = await self._adapters.delete(self._tenant(context), request.adapter_id)
        return pb.DeleteAdapterResponse(deleted=[adapter_message(r) for r in records])

    async def ExportAdapter(self, request, context):
        fmt = request.format or pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5
        if fmt not in FORMATS:
            raise InvalidArgument("format", f"{request.format} is not an AdapterFormat; use "
                                            "KERAS_HUB_LORA_H5, SAFETENSORS or PEFT.")
        file_name, data = await self._adapters.export(
            self._tenant(context), request.adapter_id, FORMATS[fmt])
        for start in range(0, len(data), EXPORT_CHUNK_BYTES):
            yield pb.FileChunk(file_name=file_name if start == 0 else "",
                               total_bytes=len(data) if start == 0 else 0,
                               data=data[start:start + EXPORT_CHUNK_BYTES])
