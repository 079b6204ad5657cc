"""A Python client: requests in, numpy arrays (or plain dicts) out.

Example:
>>> with GemmaClient("127.0.0.1:50051", api_key="...") as client:
...     result = client.forward(texts=["Hello"], layers=[-1], pooling="mean")
...     result.hidden_states[0][0].shape          # (hidden_dim,)
...     adapter = client.upload_adapter("support", "support.lora.h5")
...     client.forward(texts=["Hello"], adapter_id=adapter["adapter_id"])
...     job = client.start_fine_tune("faq", texts=["Q: ... A: ..."], steps=100)
...     for update in client.watch_fine_tune(job["job_id"]):
...         print(update["state"], update["step"], update["loss"])

Adapter, dataset and fine-tune calls answer with dicts of the proto
messages' fields (proto field names, every field present, int64 as int);
a job's `state` is a short lowercase string: "queued", "running",
"succeeded", "failed" or "cancelled". Errors surface as grpc.RpcError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Iterable, Iterator, Sequence

import grpc
import ml_dtypes
import numpy as np
from google.protobuf import descriptor, json_format

from coordinator import peft_archive
from coordinator.generated.gemma.v1 import adapter_service_pb2 as adapter_pb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as adapter_grpc
from coordinator.generated.gemma.v1 import finetune_service_pb2 as ft_pb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as ft_grpc
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc

_POOLING = {"none": pb.POOLING_NONE, "last_token": pb.POOLING_LAST_TOKEN,
            "mean": pb.POOLING_MEAN}
_DTYPE = {"float32": pb.DTYPE_FLOAT32, "bfloat16": pb.DTYPE_BFLOAT16,
          "float16": pb.DTYPE_FLOAT16}
_TRUNCATION = {None: pb.TRUNCATION_UNSPECIFIED, "start": pb.TRUNCATION_KEEP_START,
               "end": pb.TRUNCATION_KEEP_END}
_NUMPY = {pb.DTYPE_FLOAT32: np.dtype(np.float32), pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
          pb.DTYPE_FLOAT16: np.dtype(np.float16)}

UPLOAD_CHUNK_BYTES = 1 << 20
# File name endings -> the upload format they imply (longest first); a
# directory is a PEFT adapter.
ADAPTER_FORMATS = {".lora.h5": adapter_pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5,
                   ".safetensors": adapter_pb.ADAPTER_FORMAT_SAFETENSORS,
                   ".tar": adapter_pb.ADAPTER_FORMAT_PEFT,
                   ".tar.gz": adapter_pb.ADAPTER_FORMAT_PEFT,
                   ".tgz": adapter_pb.ADAPTER_FORMAT_PEFT}
_FORMAT_NAMES = {"lora.h5": adapter_pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5,
                 "keras_hub_lora_h5": adapter_pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5,
                 "safetensors": adapter_pb.ADAPTER_FORMAT_SAFETENSORS,
                 "peft": adapter_pb.ADAPTER_FORMAT_PEFT}
_EXPORT_ENDINGS = {adapter_pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5: ".lora.h5",
                   adapter_pb.ADAPTER_FORMAT_SAFETENSORS: ".safetensors",
                   adapter_pb.ADAPTER_FORMAT_PEFT: ".peft.tar"}
TERMINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")
_STATE_PREFIX = "FINE_TUNE_STATE_"


def format_value(format) -> int:
    """An AdapterFormat from its value or name ("lora.h5" /
    "keras_hub_lora_h5" / "safetensors" / "peft")."""
    if isinstance(format, str):
        key = format.lower().lstrip(".")
        key = key.removeprefix("adapter_format_")
        if key not in _FORMAT_NAMES:
            raise ValueError(f"unknown adapter format {format!r}; use one of "
                             f"{sorted(_FORMAT_NAMES)}.")
        return _FORMAT_NAMES[key]
    if format not in _FORMAT_NAMES.values():
        raise ValueError(f"unknown adapter format {format!r}.")
    return int(format)


def adapter_format(path: str | os.PathLike, format=None) -> int:
    """The AdapterFormat to upload `path` as: `format` when given, else a
    directory is a PEFT adapter and a file's name says. Raises ValueError
    when neither says."""
    if format is not None:
        return format_value(format)
    if os.path.isdir(path):
        return adapter_pb.ADAPTER_FORMAT_PEFT
    name = os.fspath(path).lower()
    for ending, value in ADAPTER_FORMATS.items():
        if name.endswith(ending):
            return value
    raise ValueError(f"cannot tell the adapter format of {os.fspath(path)!r} from its "
                     f"name (expected a PEFT adapter directory or a file ending "
                     f"{', '.join(ADAPTER_FORMATS)}); pass format=.")


def _peft_archive(directory: str | os.PathLike) -> bytes:
    """A PEFT adapter directory's two files as the archive UploadAdapter
    takes (AdapterFormat PEFT); nothing else in the directory is sent."""
    directory = pathlib.Path(directory)
    files = {}
    for name in peft_archive.MEMBERS:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{os.fspath(directory)!r} is not a PEFT adapter "
                                    f"directory: it has no {name}.")
        files[name] = (directory / name).read_bytes()
    return peft_archive.pack(files, directory.resolve().name or "adapter")


_INT64 = (descriptor.FieldDescriptor.TYPE_INT64, descriptor.FieldDescriptor.TYPE_UINT64,
          descriptor.FieldDescriptor.TYPE_SINT64, descriptor.FieldDescriptor.TYPE_FIXED64,
          descriptor.FieldDescriptor.TYPE_SFIXED64)


def _to_dict(message) -> dict:
    """A message as a dict: proto field names, every field present, int64s
    as ints (not JSON's strings), a fine-tune state as "running" etc."""
    out = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    _normalize(message, out)
    return out


def _normalize(message, out: dict) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.name not in out:
            continue
        value = getattr(message, field.name)
        repeated = field.is_repeated
        if field.message_type is not None:
            for sub, sub_out in (zip(value, out[field.name]) if repeated
                                 else [(value, out[field.name])]):
                _normalize(sub, sub_out)
        elif field.type in _INT64:
            out[field.name] = [int(v) for v in value] if repeated else int(value)
        elif field.enum_type is not None and field.enum_type.full_name == \
                ft_pb.FineTuneState.DESCRIPTOR.full_name and not repeated:
            name = ft_pb.FineTuneState.Name(value)
            out[field.name] = name.removeprefix(_STATE_PREFIX).lower()


def _jsonl(examples: Iterable[str | Sequence[int]]) -> bytes:
    """Training examples (texts, or lists of token ids) as JSON Lines."""
    lines = [json.dumps({"text": example}) if isinstance(example, str)
             else json.dumps({"ids": [int(t) for t in example]}) for example in examples]
    return "".join(line + "\n" for line in lines).encode()


def _file_chunks(path: str | os.PathLike) -> Iterator[bytes]:
    with open(path, "rb") as file:
        while chunk := file.read(UPLOAD_CHUNK_BYTES):
            yield chunk


class IncompleteResponse(RuntimeError):
    """The stream ended before every announced tensor arrived."""


@dataclasses.dataclass
class ForwardResult:
    """`hidden_states[i][j]`: sequence i at layer `layers[j]`."""

    request_id: str
    model: str
    worker_id: str
    layers: list[int]
    token_ids: list[np.ndarray]
    hidden_states: list[list[np.ndarray]]
    adapter_id: str = ""  # "name@version" as resolved, "" for the base model
    truncated_tokens: list[int] = dataclasses.field(default_factory=list)  # per sequence

    def layer(self, layer: int) -> list[np.ndarray]:
        """Every sequence's tensor at one (normalized) layer index."""
        j = self.layers.index(layer)
        return [per_layer[j] for per_layer in self.hidden_states]


def assemble(responses) -> ForwardResult:
    """Reassembles a Forward stream into arrays, checking it is complete."""
    stream = iter(responses)
    first = next(stream, None)
    if first is None or first.WhichOneof("kind") != "header":
        raise IncompleteResponse("the stream did not start with a header")
    header = first.header
    dtype = _NUMPY[header.dtype]
    layers = list(header.layers)
    tensors = [[np.empty(tuple(info.shape), dtype) for _ in layers] for info in header.sequences]
    received = 0
    for response in stream:
        chunk = response.chunk
        target = tensors[chunk.sequence_index][layers.index(chunk.layer)]
        width = dtype.itemsize  # the wire is little-endian; match the host
        data = (np.frombuffer(chunk.data, f"<u{width}").astype(f"=u{width}", copy=False)
                .view(dtype).reshape(tuple(chunk.shape)))
        if target.ndim == 1:
            target[...] = data
        else:
            target[chunk.token_offset:chunk.token_offset + data.shape[0]] = data
        received += len(chunk.data)
    if received != header.total_bytes:
        raise IncompleteResponse(f"received {received} of {header.total_bytes} bytes")
    return ForwardResult(
        request_id=header.request_id, model=header.model, worker_id=header.worker_id,
        layers=layers, token_ids=[np.asarray(s.token_ids, "int32") for s in header.sequences],
        hidden_states=tensors, adapter_id=header.adapter_id,
        truncated_tokens=[s.truncated_tokens for s in header.sequences])


def forward_request(texts: Sequence[str] | None = None,
                    token_ids: Sequence[Sequence[int]] | None = None, *,
                    layers: Sequence[int] = (), pooling: str = "none", dtype: str = "float32",
                    adapter_id: str = "", add_bos: bool | None = None,
                    truncate: str | None = None, dimensions: int = 0,
                    normalize: bool = False) -> pb.ForwardRequest:
    """The ForwardRequest `GemmaClient.forward` sends (pooling and dtype by
    name: "none" / "last_token" / "mean", "float32" / "bfloat16" / "float16";
    `truncate`: None refuses a sequence over the limit, "start" keeps its
    start, "end" its end)."""
    request = pb.ForwardRequest(
        texts=texts or [], layers=layers, pooling=_POOLING[pooling], dtype=_DTYPE[dtype],
        adapter_id=adapter_id, truncation=_TRUNCATION[truncate],
        dimensions=dimensions, normalize=normalize,
        sequences=[pb.TokenSequence(ids=list(map(int, ids))) for ids in token_ids or []])
    if add_bos is not None:
        request.add_bos = add_bos
    return request


@dataclasses.dataclass
class SequenceScores:
    """One sequence's scores; what was not asked for is None / empty.

    Attributes:
        token_logprobs: (tokens - 1,) float32; entry t is
            log p(token_ids[t + 1] | token_ids[0..t]).
        top_tokens: per top-k position: (position, ids (k,), log-probs (k,)).
        candidate_logprobs, candidate_probs: (C,) over the vocabulary, and
            normalized over the candidates.
    """

    token_ids: np.ndarray
    truncated_tokens: int
    token_logprobs: np.ndarray | None
    top_tokens: list[tuple[int, np.ndarray, np.ndarray]]
    candidate_logprobs: np.ndarray | None
    candidate_probs: np.ndarray | None


@dataclasses.dataclass
class ScoreResult:
    """A Score call's answer: `sequences[i]` for input i; `candidate_ids`
    the candidates as ids (texts resolved by the server), in request order."""

    request_id: str
    model: str
    worker_id: str
    adapter_id: str
    candidate_ids: list[int]
    sequences: list[SequenceScores]


def score_request(texts: Sequence[str] | None = None,
                  token_ids: Sequence[Sequence[int]] | None = None, *,
                  token_logprobs: bool = False, top_k: int = 0,
                  top_k_positions: Sequence[int] = (),
                  candidates: Sequence[str | int] = (), adapter_id: str = "",
                  add_bos: bool | None = None, truncate: str | None = None) -> pb.ScoreRequest:
    """The ScoreRequest `GemmaClient.score` sends; `candidates` as ints are
    token ids, as strings one-token texts."""
    if isinstance(candidates, (str, bytes)):
        raise ValueError("candidates is a list of texts or ids, not one text: write "
                         f"[{candidates!r}].")
    as_ids = all(isinstance(c, (int, np.integer)) for c in candidates)
    if len(candidates) and not as_ids and not all(isinstance(c, str) for c in candidates):
        raise ValueError("candidates are all token ids or all texts, not a mix.")
    request = pb.ScoreRequest(
        texts=texts or [], adapter_id=adapter_id, truncation=_TRUNCATION[truncate],
        token_logprobs=token_logprobs, top_k=top_k, top_k_positions=top_k_positions,
        candidate_ids=list(map(int, candidates)) if as_ids else [],
        candidates=[] if as_ids else list(candidates),
        sequences=[pb.TokenSequence(ids=list(map(int, ids))) for ids in token_ids or []])
    if add_bos is not None:
        request.add_bos = add_bos
    return request


def score_result(response: pb.ScoreResponse, token_logprobs: bool) -> ScoreResult:
    """The response as numpy arrays (`token_logprobs`: whether they were
    asked for: a one-token sequence has none either way)."""
    def floats(values):
        return np.array(values, np.float32) if len(values) else None
    sequences = [SequenceScores(
        token_ids=np.array(s.token_ids, np.int32), truncated_tokens=s.truncated_tokens,
        token_logprobs=np.array(s.token_logprobs, np.float32) if token_logprobs else None,
        top_tokens=[(t.position, np.array(t.ids, np.int32), np.array(t.logprobs, np.float32))
                    for t in s.top_tokens],
        candidate_logprobs=floats(s.candidate_logprobs),
        candidate_probs=floats(s.candidate_probs)) for s in response.sequences]
    return ScoreResult(response.request_id, response.model, response.worker_id,
                       response.adapter_id, list(response.candidate_ids), sequences)


def tls_credentials(ca: str | None = None, cert: str | None = None,
                    key: str | None = None) -> grpc.ChannelCredentials:
    """Channel credentials from PEM files: `ca` to trust the server (None:
    the system roots), `cert` and `key` to present for mutual TLS."""
    def read(path):
        if path is None:
            return None
        with open(path, "rb") as handle:
            return handle.read()
    if bool(cert) != bool(key):
        raise ValueError("mutual TLS needs both a client certificate and its key.")
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


class GemmaClient:
    """Blocking client over one channel. Default gRPC message limits suffice:
    responses stream in chunks under 4 MiB."""

    def __init__(self, target: str, *, api_key: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        self._channel = (grpc.secure_channel(target, credentials) if credentials
                         else grpc.insecure_channel(target))
        self._stub = pb_grpc.GemmaServiceStub(self._channel)
        self._adapters = adapter_grpc.AdapterServiceStub(self._channel)
        self._fine_tunes = ft_grpc.FineTuneServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def forward(self, texts: Sequence[str] | None = None,
                token_ids: Sequence[Sequence[int]] | None = None, *,
                layers: Sequence[int] = (), pooling: str = "none", dtype: str = "float32",
                adapter_id: str = "", add_bos: bool | None = None,
                truncate: str | None = None, dimensions: int = 0, normalize: bool = False,
                timeout: float | None = None) -> ForwardResult:
        request = forward_request(texts, token_ids, layers=layers, pooling=pooling,
                                  dtype=dtype, adapter_id=adapter_id, add_bos=add_bos,
                                  truncate=truncate, dimensions=dimensions,
                                  normalize=normalize)
        return assemble(self._stub.Forward(request, timeout=timeout, metadata=self._metadata))

    def score(self, texts: Sequence[str] | None = None,
              token_ids: Sequence[Sequence[int]] | None = None, *,
              token_logprobs: bool = False, top_k: int = 0, top_k_positions: Sequence[int] = (),
              candidates: Sequence[str | int] = (), adapter_id: str = "",
              add_bos: bool | None = None, truncate: str | None = None,
              timeout: float | None = None) -> ScoreResult:
        """Scores from the language-model head (see ScoreRequest): e.g.
        `client.score(texts=[prompt], candidates=["Yes", "No"])` reads a
        ShieldGemma verdict as `.sequences[0].candidate_probs`."""
        request = score_request(texts, token_ids, token_logprobs=token_logprobs, top_k=top_k,
                                top_k_positions=top_k_positions, candidates=candidates,
                                adapter_id=adapter_id, add_bos=add_bos, truncate=truncate)
        return score_result(self._stub.Score(request, timeout=timeout, metadata=self._metadata),
                            token_logprobs)

    def tokenize(self, texts: Sequence[str], *, add_bos: bool | None = None,
                 timeout: float | None = None) -> list[list[int]]:
        """Each text's token ids, as Forward would see them (with <bos>
        unless `add_bos` is False)."""
        request = pb.TokenizeRequest(texts=list(texts))
        if add_bos is not None:
            request.add_bos = add_bos
        response = self._stub.Tokenize(request, timeout=timeout, metadata=self._metadata)
        return [list(s.ids) for s in response.sequences]

    def detokenize(self, token_ids: Sequence[Sequence[int]], *,
                   timeout: float | None = None) -> list[str]:
        """Each id sequence as text."""
        request = pb.TokenizeRequest(sequences=[pb.TokenSequence(ids=list(map(int, ids)))
                                                for ids in token_ids])
        response = self._stub.Tokenize(request, timeout=timeout, metadata=self._metadata)
        return list(response.texts)

    def model_info(self, timeout: float | None = None) -> dict:
        info = self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout,
                                       metadata=self._metadata)
        return json_format.MessageToDict(info, preserving_proto_field_name=True)

    # ---- adapters ------------------------------------------------------------

    def upload_adapter(self, name: str, path: str | os.PathLike, format=None, *,
                       timeout: float | None = None) -> dict:
        """Uploads an adapter as a new version of `name`: a PEFT adapter
        directory (its adapter_config.json and adapter_model.safetensors), or
        a file whose format comes from its name (`.lora.h5`, `.safetensors`,
        a PEFT archive `.tar` / `.tar.gz`) unless given.
        Returns the Adapter: {"adapter_id": "name@N", "rank": ..., ...}."""
        header = adapter_pb.UploadHeader(name=name, format=adapter_format(path, format))
        if not os.path.exists(path):
            raise FileNotFoundError(f"no adapter file or directory {os.fspath(path)!r}")
        if os.path.isdir(path) and header.format != adapter_pb.ADAPTER_FORMAT_PEFT:
            raise ValueError(f"{os.fspath(path)!r} is a directory, which uploads as a PEFT "
                             "adapter; leave format unset or use \"peft\".")
        if os.path.isdir(path):
            archive = _peft_archive(path)
            chunks = [archive[i:i + UPLOAD_CHUNK_BYTES]
                      for i in range(0, len(archive), UPLOAD_CHUNK_BYTES)]
        else:
            chunks = _file_chunks(path)

        def requests():
            yield adapter_pb.UploadAdapterRequest(header=header)
            for chunk in chunks:
                yield adapter_pb.UploadAdapterRequest(data=chunk)

        return _to_dict(self._adapters.UploadAdapter(requests(), timeout=timeout,
                                                     metadata=self._metadata))

    def register_adapter(self, name: str, source: str, *,
                         timeout: float | None = None) -> dict:
        """Copies an adapter into the registry as a new version of `name` from
        `source`: "hf://org/repo[@revision][/subfolder]", "kaggle://...", or
        a path on the server under its --adapter-source-root. Returns the
        Adapter."""
        return _to_dict(self._adapters.RegisterAdapter(
            adapter_pb.RegisterAdapterRequest(name=name, source=source), timeout=timeout,
            metadata=self._metadata))

    def list_adapters(self, *, timeout: float | None = None) -> list[dict]:
        """The caller's adapters, every version, by name then version (every
        page of ListAdapters; `timeout` applies to each page's call)."""
        adapters, token = [], ""
        while True:
            response = self._adapters.ListAdapters(
                adapter_pb.ListAdaptersRequest(page_size=1000, page_token=token),
                timeout=timeout, metadata=self._metadata)
            adapters += [_to_dict(adapter) for adapter in response.adapters]
            token = response.next_page_token
            if not token:
                return adapters

    def load_adapter(self, adapter_id: str, *, timeout: float | None = None) -> dict:
        """Makes an adapter resident on the workers now: {"adapter": {...},
        "workers": [...], "load_ms": ...}."""
        return _to_dict(self._adapters.LoadAdapter(
            adapter_pb.LoadAdapterRequest(adapter_id=adapter_id), timeout=timeout,
            metadata=self._metadata))

    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> list[str]:
        """Releases an adapter's slots; returns the workers that released one."""
        response = self._adapters.UnloadAdapter(
            adapter_pb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=timeout,
            metadata=self._metadata)
        return list(response.workers)

    def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> list[dict]:
        """Deletes "name" (every version) or "name@N"; returns what went."""
        response = self._adapters.DeleteAdapter(
            adapter_pb.DeleteAdapterRequest(adapter_id=adapter_id), timeout=timeout,
            metadata=self._metadata)
        return [_to_dict(adapter) for adapter in response.deleted]

    def export_adapter(self, adapter_id: str, path: str | os.PathLike, format="lora.h5", *,
                       timeout: float | None = None) -> pathlib.Path:
        """Downloads an adapter to `path` (or, when `path` is a directory, to
        the server's suggested name in it) as `format`: a keras_hub
        `.lora.h5` file (query/value adapters only), gemma-serve's
        `.safetensors`, or "peft", a tar archive of the PEFT adapter
        directory (`tar -xf` it). The file appears whole or not at all.
        Returns where it went."""
        path = pathlib.Path(path)
        fmt = format_value(format)
        call = self._adapters.ExportAdapter(
            adapter_pb.ExportAdapterRequest(adapter_id=adapter_id, format=fmt),
            timeout=timeout, metadata=self._metadata)
        try:
            first = next(call, None)
            if first is None:
                raise IncompleteResponse("the export stream was empty")
            if path.is_dir():
                path = path / (os.path.basename(first.file_name)
                               or f"{adapter_id.replace('@', '-v')}{_EXPORT_ENDINGS[fmt]}")
            fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part",
                                        dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(first.data)
                    received = len(first.data)
                    for chunk in call:
                        file.write(chunk.data)
                        received += len(chunk.data)
                if received != first.total_bytes:
                    raise IncompleteResponse(f"received {received} of {first.total_bytes} "
                                             "bytes")
                os.replace(temp, path)
            except BaseException:
                os.unlink(temp)
                raise
        except BaseException:
            call.cancel()
            raise
        return path

    # ---- fine-tuning ---------------------------------------------------------

    def upload_dataset(self, name: str,
                       examples: Sequence[str] | Sequence[Sequence[int]] | str | os.PathLike,
                       *, timeout: float | None = None) -> dict:
        """Stores training data as dataset `name`: a list of texts, a list of
        token id lists, or the path of a JSON Lines file ({"text": ...} or
        {"ids": [...]} per line). Returns {"dataset_id", "num_examples",
        "num_tokens"}."""
        if isinstance(examples, (str, os.PathLike)):
            if not os.path.isfile(examples):
                raise FileNotFoundError(f"no dataset file {os.fspath(examples)!r}")
            chunks = _file_chunks(examples)
        else:
            data = _jsonl(examples)
            chunks = (data[i:i + UPLOAD_CHUNK_BYTES]
                      for i in range(0, len(data), UPLOAD_CHUNK_BYTES))

        def requests():
            yield ft_pb.UploadDatasetRequest(name=name)
            for chunk in chunks:
                yield ft_pb.UploadDatasetRequest(data=chunk)

        return _to_dict(self._fine_tunes.UploadDataset(requests(), timeout=timeout,
                                                       metadata=self._metadata))

    def list_datasets(self, *, timeout: float | None = None) -> list[dict]:
        """The caller's datasets: [{"dataset_id", "num_examples", "num_tokens"}]."""
        response = self._fine_tunes.ListDatasets(ft_pb.ListDatasetsRequest(), timeout=timeout,
                                                 metadata=self._metadata)
        return [_to_dict(dataset) for dataset in response.datasets]

    def delete_dataset(self, dataset_id: str, *, timeout: float | None = None) -> dict:
        """Deletes dataset `dataset_id`; returns what it held."""
        return _to_dict(self._fine_tunes.DeleteDataset(
            ft_pb.DeleteDatasetRequest(dataset_id=dataset_id), timeout=timeout,
            metadata=self._metadata))

    def start_fine_tune(self, adapter_name: str, *, texts: Sequence[str] | None = None,
                        sequences: Sequence[Sequence[int]] | None = None,
                        dataset_id: str | None = None, rank: int | None = None,
                        alpha: float | None = None, learning_rate: float | None = None,
                        steps: int | None = None, epochs: int | None = None,
                        batch_size: int | None = None, sequence_length: int | None = None,
                        seed: int | None = None, initial_adapter_id: str | None = None,
                        targets: Sequence[str] | None = None,
                        timeout: float | None = None) -> dict:
        """Queues a job training a new version of adapter `adapter_name` on
        exactly one of `texts`, `sequences` (token ids) and `dataset_id`.
        Unset hyper-parameters take the server's defaults (rank 8, alpha =
        rank, learning rate 1e-3, 1 epoch, batch 8, sequence length 128,
        targets query and value; ["all-linear"] adapts all seven projections).
        Returns the FineTuneJob (state "queued" usually) at once."""
        request = ft_pb.StartFineTuneRequest(
            adapter_name=adapter_name, initial_adapter_id=initial_adapter_id or "",
            texts=list(texts or ()), dataset_id=dataset_id or "",
            sequences=[ft_pb.TrainingSequence(ids=[int(t) for t in ids])
                       for ids in sequences or ()],
            rank=rank or 0, alpha=alpha or 0.0, learning_rate=learning_rate or 0.0,
            steps=steps or 0, epochs=epochs or 0, batch_size=batch_size or 0,
            sequence_length=sequence_length or 0, seed=seed or 0, targets=list(targets or ()))
        return _to_dict(self._fine_tunes.StartFineTune(request, timeout=timeout,
                                                       metadata=self._metadata))

    def watch_fine_tune(self, job_id: str, *, timeout: float | None = None) -> Iterator[dict]:
        """The job now, then every update until it ends (the last one has a
        state in TERMINAL_STATES). Closing the iterator early ends the call."""
        call = self._fine_tunes.WatchFineTune(ft_pb.WatchFineTuneRequest(job_id=job_id),
                                              timeout=timeout, metadata=self._metadata)
        try:
            for job in call:
                yield _to_dict(job)
        finally:
            call.cancel()

    def cancel_fine_tune(self, job_id: str, *, timeout: float | None = None) -> dict:
        """Stops a queued or running job; returns it."""
        return _to_dict(self._fine_tunes.CancelFineTune(
            ft_pb.CancelFineTuneRequest(job_id=job_id), timeout=timeout,
            metadata=self._metadata))

    def list_fine_tunes(self, *, timeout: float | None = None) -> list[dict]:
        """The caller's jobs, newest first."""
        response = self._fine_tunes.ListFineTunes(ft_pb.ListFineTunesRequest(),
                                                  timeout=timeout, metadata=self._metadata)
        return [_to_dict(job) for job in response.jobs]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GemmaClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
