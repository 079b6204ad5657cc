"""Hostile input, everywhere a user's bytes arrive: a corpus of bad requests
to every RPC and a property-based fuzz of ForwardRequest and
StartFineTuneRequest against the real server.

Every bad input is answered with its own status code (never INTERNAL or
UNKNOWN) and a message naming the field or saying what to fix; nothing is
stored on disk, in the registry or as a job; and the server still answers
a plain Forward exactly as the in-process model does.

Adapter element types (a choice this file pins down): factors are stored as
float32; bfloat16, float16 and float64 uploads are accepted and cast (float64
values beyond float32's range become infinite and are refused), integer and
bool tensors are refused.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import struct
from typing import Callable

import grpc
import h5py
import numpy as np
import pytest
import safetensors.numpy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from service_support import ACME_KEY, GLOBEX_KEY, MAX_ADAPTER_RANK, keyed_channel
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as fpb_grpc
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from gemma_core import LoraAdapter

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
C = grpc.StatusCode
INVALID, NOT_FOUND, PRECONDITION = C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION
LORA_H5, SAFETENSORS = apb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5, apb.ADAPTER_FORMAT_SAFETENSORS
INT32_MAX, INT32_MIN = 2**31 - 1, -2**31
LONG = "x" * 10_000  # an id far longer than any name; error messages must stay small
# The served default model and the session server's limits (tests/serving/conftest.py).
VOCAB, NUM_LAYERS, MAX_LENGTH, MAX_SEQUENCES, MAX_LAYERS, MAX_TEXT_BYTES = \
    1024, 4, 1024, 32, 5, 16384
MAX_MESSAGE_CHARS = 2000
OK_ADAPTER = "hostile-ok"  # acme's one good adapter, for the fuzz


# ---- the calls and what a case needs ------------------------------------------

@dataclasses.dataclass
class Ctx:
    """Stubs (tenant acme) and what builders need."""

    address: str
    gemma: pb_grpc.GemmaServiceStub
    adapters: apb_grpc.AdapterServiceStub
    tune: fpb_grpc.FineTuneServiceStub
    config: object
    fingerprint: str
    scratch: pathlib.Path
    secret: pathlib.Path  # a file outside the registry root

    def forward(self, **fields):
        return list(self.gemma.Forward(pb.ForwardRequest(**fields), timeout=60))

    def upload_messages(self, messages):
        return self.adapters.UploadAdapter(iter(messages), timeout=60)

    def upload(self, data: bytes, fmt=LORA_H5, name="hostile"):
        messages = [apb.UploadAdapterRequest(header=apb.UploadHeader(name=name, format=fmt))]
        messages += [apb.UploadAdapterRequest(data=data[i:i + (64 << 10)])
                     for i in range(0, len(data), 64 << 10)]
        return self.upload_messages(messages)

    def dataset_messages(self, messages):
        return self.tune.UploadDataset(iter(messages), timeout=60)

    def dataset(self, data: bytes, name="hostile-data"):
        return self.dataset_messages([fpb.UploadDatasetRequest(name=name)] + [
            fpb.UploadDatasetRequest(data=data[i:i + (64 << 10)])
            for i in range(0, len(data), 64 << 10)])

    def start(self, **fields):
        return self.tune.StartFineTune(fpb.StartFineTuneRequest(**fields), timeout=60)

    def raw_call(self, method: str, payload: bytes | list[bytes]):
        """Sends bytes that no protobuf library would write, as tenant acme."""
        metadata = [("authorization", f"Bearer {ACME_KEY}")]
        with grpc.insecure_channel(self.address) as channel:
            options = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
            if isinstance(payload, list):  # client streaming
                return channel.stream_unary(method, **options)(
                    iter(payload), metadata=metadata, timeout=30)
            if method.endswith(("/Forward", "/WatchFineTune", "/ExportAdapter")):
                return list(channel.unary_stream(method, **options)(
                    payload, metadata=metadata, timeout=30))
            return channel.unary_unary(method, **options)(payload, metadata=metadata,
                                                          timeout=30)

    def info_with(self, *metadata):
        with grpc.insecure_channel(self.address) as channel:
            return pb_grpc.GemmaServiceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=list(metadata), timeout=30)


@dataclasses.dataclass(frozen=True)
class Case:
    call: Callable[[Ctx], object]
    code: grpc.StatusCode
    says: tuple[str, ...]


CASES: dict[str, Case] = {}


def case(name: str, code: grpc.StatusCode, *says: str):
    def register(call):
        assert name not in CASES, name
        CASES[name] = Case(call, code, says)
        return call
    return register


def seq(*ids):
    return pb.TokenSequence(ids=list(ids))


def fwd(name, code, says, **fields):
    case(f"forward: {name}", code, *says)(lambda ctx: ctx.forward(**fields))


# ---- adapter files ------------------------------------------------------------

def random_adapter(config, rank=2, seed=0):
    rng = np.random.default_rng(seed)
    return LoraAdapter(rank=rank, alpha=float(rank), kernels={
        (block, target): (
            rng.normal(0, 0.1, (heads, config.hidden_dim, rank)).astype("float32"),
            rng.normal(0, 0.1, (rank, config.head_dim)).astype("float32"))
        for block in range(config.num_layers)
        for target, heads in (("query", config.num_query_heads),
                              ("value", config.num_key_value_heads))})


def lora_h5(ctx: Ctx, rank=2, edit=None) -> bytes:
    """A keras_hub LoRA file for the served model, changed by `edit(h5 file)`."""
    path = ctx.scratch / "adapter.lora.h5"
    random_adapter(ctx.config, rank).write_lora_file(path, ctx.config)
    if edit is not None:
        with h5py.File(path, "r+") as handle:
            edit(handle)
    return path.read_bytes()


def first_index(handle) -> str:
    return sorted((key for key in handle["lora"] if key != "vars"), key=int)[0]


def replace(handle, key, value=None, **dataset_options):
    del handle[key]
    if value is None:
        handle.create_dataset(key, **dataset_options)
    else:
        handle[key] = value


def poison(value):
    def edit(handle):
        name = f"lora/{first_index(handle)}/vars/lora_kernel_b"
        array = handle[name][()]
        array[0, 0] = value
        handle[name][...] = array
    return edit


def st_metadata(ctx: Ctx, **changes) -> dict:
    metadata = {"rank": "2", "alpha": "2.0", "base_fingerprint": ctx.fingerprint}
    metadata.update(changes)
    return {key: value for key, value in metadata.items() if value is not None}


def st_file(ctx: Ctx, edit_tensors=None, **metadata) -> bytes:
    tensors = random_adapter(ctx.config).tensors()
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    return safetensors.numpy.save(tensors, metadata=st_metadata(ctx, **metadata))


def st_raw(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def st_with(tensors_edit):
    return lambda ctx: ctx.upload(st_file(ctx, tensors_edit), SAFETENSORS)


A0Q, B0Q = "blocks.0.query.lora_a", "blocks.0.query.lora_b"


def upload_case(name, code, *says):
    return case(f"upload: {name}", code, *says)


# ---- Forward ------------------------------------------------------------------

fwd("empty request", INVALID, ("texts, sequences", "nothing to run"))
fwd("texts and sequences", INVALID, ("not both",), texts=["a"], sequences=[seq(1)])
fwd("empty sequence", INVALID, ("sequences[1]", "is empty"), sequences=[seq(2, 3), seq()])
fwd("empty text", INVALID, ("texts[1]", "is empty"), texts=["ok", ""])
fwd("sequence too long", INVALID, ("sequences[0]", "1025 tokens", "limit is 1024"),
    sequences=[seq(*[5] * 1025)])
fwd("id = vocabulary size", INVALID, ("sequences[0]", "token id 1024", "[0, 1024)"),
    sequences=[seq(2, 1024)])
fwd("negative id", INVALID, ("sequences[0]", "token id -1 at position 0"), sequences=[seq(-1)])
fwd("int32 max id", INVALID, ("sequences[1]", f"token id {INT32_MAX}"),
    sequences=[seq(1), seq(1, INT32_MAX)])
fwd("int32 min id", INVALID, ("sequences[0]", f"token id {INT32_MIN}"),
    sequences=[seq(INT32_MIN)])
fwd("33 sequences", INVALID, ("sequences", "33 items; at most 32"), sequences=[seq(1)] * 33)
fwd("33 texts", INVALID, ("texts", "33 items; at most 32"), texts=["a"] * 33)
fwd("pooling 99", INVALID, ("pooling", "unknown value 99", "POOLING_MEAN"),
    sequences=[seq(1)], pooling=99)
fwd("pooling negative", INVALID, ("pooling", "unknown value -1"), sequences=[seq(1)],
    pooling=-1)
fwd("dtype 4", INVALID, ("dtype", "unknown value 4", "DTYPE_FLOAT16"), sequences=[seq(1)],
    dtype=4)
fwd("dtype int32 min", INVALID, ("dtype", f"unknown value {INT32_MIN}"), sequences=[seq(1)],
    dtype=INT32_MIN)
fwd("layer above", INVALID, ("layers[0]", "5 is out of range", "4-layer"), sequences=[seq(1)],
    layers=[5])
fwd("layer below", INVALID, ("layers[1]", "-6 is out of range"), sequences=[seq(1)],
    layers=[0, -6])
fwd("layer int32 max", INVALID, ("layers[0]", f"{INT32_MAX} is out of range"),
    sequences=[seq(1)], layers=[INT32_MAX])
fwd("layer int32 min", INVALID, ("layers[0]", f"{INT32_MIN} is out of range"),
    sequences=[seq(1)], layers=[INT32_MIN])
fwd("layer twice", INVALID, ("layers", "names a layer twice"), sequences=[seq(1)],
    layers=[0, -5])
fwd("six layers", INVALID, ("layers", "6 layers requested; at most 5"), sequences=[seq(1)],
    layers=[0, 1, 2, 3, 4, -2])
fwd("add_bos with ids", INVALID, ("add_bos", "texts only"), sequences=[seq(1)], add_bos=False)
fwd("text over the byte limit", INVALID, ("texts[0]", "16385 bytes", "limit is 16384"),
    texts=["x" * 16385])
fwd("4-byte characters over the byte limit", INVALID, ("texts[1]", "16388 bytes"),
    texts=["ok", "\U0001F600" * 4097])
fwd("unicode text too long in tokens", INVALID, ("texts[0] (tokenized)", "limit is 1024"),
    texts=["\u65e5\u672c\u8a9e\u0301 \u05e9\u05dc\u05d5\u05dd " * 400])
fwd("unknown adapter", NOT_FOUND, ("adapter_id", "no adapter 'nope'"), sequences=[seq(1)],
    adapter_id="nope")
fwd("path traversal adapter", NOT_FOUND, ("adapter_id", "no adapter"), sequences=[seq(1)],
    adapter_id="../../../etc/passwd")
fwd("adapter version 0", NOT_FOUND, ("adapter_id", "no adapter 'x@0'"), sequences=[seq(1)],
    adapter_id="x@0")
fwd("very long adapter id", NOT_FOUND, ("adapter_id", "no adapter"), sequences=[seq(1)],
    adapter_id=LONG)


# ---- metadata (authentication), on GetModelInfo and on an upload ---------------

for label, metadata, says in [
        ("no key", (), "no API key"),
        ("basic scheme", (("authorization", "Basic abc"),), "Bearer <key>"),
        ("empty bearer", (("authorization", "Bearer "),), "Bearer <key>"),
        ("blank bearer", (("authorization", "Bearer    "),), "Bearer <key>"),
        ("wrong key", (("authorization", "Bearer wrong-key-123456"),), "not valid"),
        ("4 KiB key", (("authorization", "Bearer " + "k" * 4096),), "not valid"),
        ("wrong key before the right one", (("authorization", "Bearer nope-nope-nope"),
                                            ("authorization", f"Bearer {ACME_KEY}")),
         "not valid")]:
    case(f"metadata: {label}", C.UNAUTHENTICATED, says)(
        lambda ctx, metadata=metadata: ctx.info_with(*metadata))


@case("metadata: upload without a key stores nothing", C.UNAUTHENTICATED, "no API key")
def _(ctx):
    with grpc.insecure_channel(ctx.address) as channel:
        apb_grpc.AdapterServiceStub(channel).UploadAdapter(iter([
            apb.UploadAdapterRequest(header=apb.UploadHeader(name="anon", format=LORA_H5)),
            apb.UploadAdapterRequest(data=lora_h5(ctx))]), timeout=30)


# ---- bytes that are not the request message at all ----------------------------

for label, method, payload, message in [
        ("GetModelInfo corrupt", "/gemma.v1.GemmaService/GetModelInfo", b"\xff\xff\xff\xff",
         "GetModelInfoRequest"),
        ("Forward text not UTF-8", "/gemma.v1.GemmaService/Forward", b"\x0a\x03\xff\xfe\xfd",
         "ForwardRequest"),
        ("Forward truncated", "/gemma.v1.GemmaService/Forward", b"\x12\x05\x0a\x02",
         "ForwardRequest"),
        ("Score candidate not UTF-8", "/gemma.v1.GemmaService/Score", b"\x52\x02\xc3\x28",
         "ScoreRequest"),
        ("Score truncated", "/gemma.v1.GemmaService/Score", b"\x38", "ScoreRequest"),
        ("LoadAdapter id not UTF-8", "/gemma.v1.AdapterService/LoadAdapter", b"\x0a\x02\xc3\x28",
         "LoadAdapterRequest"),
        ("UploadAdapter corrupt message", "/gemma.v1.AdapterService/UploadAdapter",
         [b"\x0a\x7f"], "UploadAdapterRequest"),
        ("StartFineTune truncated varint", "/gemma.v1.FineTuneService/StartFineTune", b"\x08",
         "StartFineTuneRequest"),
        ("WatchFineTune wrong wire type", "/gemma.v1.FineTuneService/WatchFineTune",
         b"\x0d\x01\x02", "WatchFineTuneRequest")]:
    case(f"raw bytes: {label}", INVALID, message)(
        lambda ctx, method=method, payload=payload: ctx.raw_call(method, payload))


# ---- UploadAdapter: the stream's shape and the header ---------------------------

upload_case("no messages", INVALID, "header", "first message")(
    lambda ctx: ctx.upload_messages([]))
upload_case("data before the header", INVALID, "header", "first message")(
    lambda ctx: ctx.upload_messages([apb.UploadAdapterRequest(data=b"x"),
                                     apb.UploadAdapterRequest(header=apb.UploadHeader(
                                         name="a", format=LORA_H5))]))
upload_case("two headers", INVALID, "header", "once")(
    lambda ctx: ctx.upload_messages([apb.UploadAdapterRequest(header=apb.UploadHeader(
        name="a", format=LORA_H5))] * 2))
upload_case("header after data", INVALID, "header", "once")(
    lambda ctx: ctx.upload_messages([
        apb.UploadAdapterRequest(header=apb.UploadHeader(name="a", format=LORA_H5)),
        apb.UploadAdapterRequest(data=b"\x89HDF"),
        apb.UploadAdapterRequest(header=apb.UploadHeader(name="a", format=LORA_H5))]))
upload_case("header and no data", INVALID, "data", "no bytes")(
    lambda ctx: ctx.upload_messages([apb.UploadAdapterRequest(
        header=apb.UploadHeader(name="a", format=LORA_H5))]))
upload_case("format unspecified", INVALID, "header.format", "SAFETENSORS")(
    lambda ctx: ctx.upload(lora_h5(ctx), apb.ADAPTER_FORMAT_UNSPECIFIED))
upload_case("format 7", INVALID, "header.format", "SAFETENSORS")(
    lambda ctx: ctx.upload(lora_h5(ctx), 7))
for label, name in [("empty", ""), ("../../etc", "../../etc"), ("a/b", "a/b"), (".", "."),
                    ("..", ".."), ("unicode", "\u00fcn\u00efc\u00f6de"), ("65 chars", "a" * 65),
                    ("NUL", "a\x00b"), ("leading dash", "-a"), ("trailing newline", "a\n"),
                    ("10000 chars", LONG)]:
    upload_case(f"name {label}", INVALID, "name", "letters, digits")(
        lambda ctx, name=name: ctx.upload(lora_h5(ctx), name=name))
upload_case("over the size cap", C.RESOURCE_EXHAUSTED, "byte limit")(
    lambda ctx: ctx.upload(b"\0" * ((1 << 20) + 1)))

# ---- UploadAdapter: keras_hub .lora.h5 ---------------------------------------------

upload_case("h5 truncated", INVALID, "not a valid lora.h5")(
    lambda ctx: ctx.upload(lora_h5(ctx)[:3000]))
upload_case("h5 signature then garbage", INVALID, "not a valid lora.h5")(
    lambda ctx: ctx.upload(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100))
upload_case("h5 of model weights, no lora group", INVALID, "lora/vars/rank")(
    lambda ctx: ctx.upload((FIXTURES / "gemma2_tiny" / "model.weights.h5").read_bytes()))
upload_case("h5 lora group renamed", INVALID, "lora/vars/rank")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: h.move("lora", "loRA"))))
upload_case("h5 factor missing", INVALID, "lora_kernel_b", "missing")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: h.__delitem__(
        f"lora/{first_index(h)}/vars/lora_kernel_b"))))
upload_case("h5 non-numeric entry", INVALID, "lora/abc", "not a layer index")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: h.create_group("lora/abc/vars"))))
upload_case("h5 zero-padded entry", INVALID, "lora/0", "not a layer index")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: h.copy(
        f"lora/{first_index(h)}", f"lora/0{first_index(h)}"))))
upload_case("h5 rank as text", INVALID, "lora/vars/rank", "integer")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(h, "lora/vars/rank",
                                                                np.bytes_(b"two")))))
upload_case("h5 rank as array", INVALID, "lora/vars/rank", "not one integer")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(h, "lora/vars/rank",
                                                                np.array([2, 2])))))
upload_case("h5 rank 0", INVALID, "not a valid lora.h5", "rank must be a positive")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(h, "lora/vars/rank",
                                                                np.int64(0)))))
upload_case("h5 rank 16 above the maximum", INVALID, "rank 16", "maximum adapter rank 8")(
    lambda ctx: ctx.upload(lora_h5(ctx, rank=16)))
upload_case("h5 NaN factor", INVALID, "not a valid lora.h5", "NaN or infinite")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=poison(np.nan))))
upload_case("h5 inf factor", INVALID, "not a valid lora.h5", "NaN or infinite")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=poison(-np.inf))))
upload_case("h5 integer factors", INVALID, "lora_kernel_a", "int32 values")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, f"lora/{first_index(h)}/vars/lora_kernel_a",
        h[f"lora/{first_index(h)}/vars/lora_kernel_a"][()].astype("int32")))))
upload_case("h5 rank of a and b differ", INVALID, "not a valid lora.h5", "rank-2 pair")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, f"lora/{first_index(h)}/vars/lora_kernel_b",
        np.zeros((3, ctx.config.head_dim), "float32")))))
upload_case("h5 factors for another hidden size", PRECONDITION, "another", "needs")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, f"lora/{first_index(h)}/vars/lora_kernel_a",
        np.zeros((1, 3, 2), "float32")))))
upload_case("h5 for another model", PRECONDITION, "another")(
    lambda ctx: ctx.upload((FIXTURES / "gemma1_tiny" / "adapter.lora.h5").read_bytes()))
upload_case("h5 factor stored outside the file", INVALID, "outside the file")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, f"lora/{first_index(h)}/vars/lora_kernel_a",
        shape=h[f"lora/{first_index(h)}/vars/lora_kernel_a"].shape, dtype="float32",
        external=[(str(ctx.secret), 0, h5py.h5f.UNLIMITED)]))))
upload_case("h5 group linked to another file", INVALID, "link", "ExternalLink")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, "lora", h5py.ExternalLink(str(ctx.secret.with_suffix(".lora.h5")), "/lora")))))
upload_case("h5 soft link", INVALID, "link", "SoftLink")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, f"lora/{first_index(h)}/vars/lora_kernel_b",
        h5py.SoftLink(f"/lora/{first_index(h)}/vars/lora_kernel_a")))))
upload_case("h5 compressed bomb", INVALID, "declare far more bytes", "uncompressed")(
    lambda ctx: ctx.upload(lora_h5(ctx, edit=lambda h: replace(
        h, f"lora/{first_index(h)}/vars/lora_kernel_a", shape=(4, 1024, 100_000),
        dtype="float32", compression="gzip", chunks=(1, 1024, 1024)))))
upload_case("model safetensors, not an adapter", INVALID, "metadata lacks")(
    lambda ctx: ctx.upload((FIXTURES / "hf_gemma2_tiny" / "model.safetensors").read_bytes(),
                           SAFETENSORS))
upload_case("h5 sent as safetensors", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(lora_h5(ctx), SAFETENSORS))

# ---- UploadAdapter: safetensors --------------------------------------------------

upload_case("safetensors garbage", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(b"{not json" * 10, SAFETENSORS))
upload_case("safetensors 4 bytes", INVALID, "not a valid safetensors", "header")(
    lambda ctx: ctx.upload(b"\x08\0\0\0", SAFETENSORS))
upload_case("safetensors header length 2**63", INVALID, "not a valid safetensors", "header")(
    lambda ctx: ctx.upload(st_raw(b"{}", length=2**63), SAFETENSORS))
upload_case("safetensors header length past the end", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(st_raw(b"{}", length=4096), SAFETENSORS))
upload_case("safetensors header not JSON", INVALID, "not a valid safetensors", "JSON")(
    lambda ctx: ctx.upload(st_raw(b"{abc}"), SAFETENSORS))
upload_case("safetensors header a list", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(st_raw(b"[]"), SAFETENSORS))
upload_case("safetensors data truncated", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(st_file(ctx)[:-100], SAFETENSORS))
upload_case("safetensors offsets past the end", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(st_raw(json.dumps({A0Q: {
        "dtype": "F32", "shape": [4, 64, 2], "data_offsets": [0, 2**62]}}).encode()),
        SAFETENSORS))
upload_case("safetensors huge shape", INVALID, "not a valid safetensors")(
    lambda ctx: ctx.upload(st_raw(json.dumps({A0Q: {
        "dtype": "F32", "shape": [2**31, 2**31, 2], "data_offsets": [0, 8]}}).encode(),
        b"\0" * 8), SAFETENSORS))
upload_case("safetensors no metadata", INVALID, "metadata lacks", "rank")(
    lambda ctx: ctx.upload(safetensors.numpy.save(random_adapter(ctx.config).tensors()),
                           SAFETENSORS))
upload_case("safetensors no fingerprint", INVALID, "metadata lacks", "base_fingerprint")(
    lambda ctx: ctx.upload(st_file(ctx, base_fingerprint=None), SAFETENSORS))
upload_case("safetensors rank not a number", INVALID, "not a valid safetensors", "'two'")(
    lambda ctx: ctx.upload(st_file(ctx, rank="two"), SAFETENSORS))
upload_case("safetensors alpha NaN", INVALID, "alpha must be a positive number")(
    lambda ctx: ctx.upload(st_file(ctx, alpha="nan"), SAFETENSORS))
upload_case("safetensors alpha negative", INVALID, "alpha must be a positive number")(
    lambda ctx: ctx.upload(st_file(ctx, alpha="-2"), SAFETENSORS))
upload_case("safetensors rank disagrees with tensors", INVALID, "rank-3 pair")(
    lambda ctx: ctx.upload(st_file(ctx, rank="3"), SAFETENSORS))
upload_case("safetensors other format", INVALID, "format", "gemma-serve-lora/1")(
    lambda ctx: ctx.upload(st_file(ctx, format="other/9"), SAFETENSORS))
upload_case("safetensors other base model", PRECONDITION, "0123456789abcdef")(
    lambda ctx: ctx.upload(st_file(ctx, base_fingerprint="0123456789abcdef"), SAFETENSORS))
upload_case("safetensors NaN factor", INVALID, "NaN or infinite")(
    st_with(lambda t: {**t, B0Q: np.full_like(t[B0Q], np.nan)}))
upload_case("safetensors float64 beyond float32", INVALID, "NaN or infinite")(
    st_with(lambda t: {k: v.astype("float64") * 1e300 for k, v in t.items()}))
upload_case("safetensors int8 factors", INVALID, "int8 values", "floating point")(
    st_with(lambda t: {k: (v * 100).astype("int8") for k, v in t.items()}))
upload_case("safetensors bool factors", INVALID, "bool values", "floating point")(
    st_with(lambda t: {k: v > 0 for k, v in t.items()}))
upload_case("safetensors a and b of other ranks", INVALID, "rank-2 pair")(
    st_with(lambda t: {**t, B0Q: np.zeros((3, t[B0Q].shape[1]), "float32")}))
upload_case("safetensors extra tensor", INVALID, "unexpected tensor 'embeddings'")(
    st_with(lambda t: {**t, "embeddings": np.zeros(4, "float32")}))
upload_case("safetensors path in a tensor name", INVALID, "unexpected tensor")(
    st_with(lambda t: {**t, "blocks.../../x.query.lora_a": t[A0Q]}))
upload_case("safetensors unpaired factor", INVALID, "needs lora_a and lora_b")(
    st_with(lambda t: {k: v for k, v in t.items() if k != B0Q}))
upload_case("safetensors two names for one block", INVALID, "blocks.00.query.lora_a")(
    st_with(lambda t: {**t, "blocks.00.query.lora_a": t[A0Q],
                       "blocks.00.query.lora_b": t[B0Q]}))
upload_case("safetensors block of another model", PRECONDITION, "block 99", "4 blocks")(
    st_with(lambda t: {**t, "blocks.99.query.lora_a": t[A0Q],
                       "blocks.99.query.lora_b": t[B0Q]}))
upload_case("safetensors no tensors", INVALID, "no LoRA kernels")(
    lambda ctx: ctx.upload(safetensors.numpy.save({}, metadata=st_metadata(ctx)), SAFETENSORS))


# ---- adapter ids: Load, Unload, Delete, Export ---------------------------------------

def every_id_call(adapter_id):
    def call(ctx):
        errors = []
        for rpc, request in ((ctx.adapters.LoadAdapter, apb.LoadAdapterRequest),
                             (ctx.adapters.UnloadAdapter, apb.UnloadAdapterRequest),
                             (ctx.adapters.DeleteAdapter, apb.DeleteAdapterRequest),
                             (lambda r, **k: list(ctx.adapters.ExportAdapter(r, **k)),
                              apb.ExportAdapterRequest)):
            try:
                rpc(request(adapter_id=adapter_id), timeout=30)
            except grpc.RpcError as error:
                errors.append(error)
            else:
                pytest.fail(f"{request.__name__} with {adapter_id[:50]!r} succeeded")
        # All four answer alike; the first is checked by the corpus test.
        assert len({(e.code(), e.details()) for e in errors}) == 1, [
            (e.code(), e.details()) for e in errors]
        raise errors[0]
    return call


for label, adapter_id in [("empty", ""), ("@", "@"), ("x@0", "x@0"), ("x@-1", "x@-1"),
                          ("x@99999999999", "x@99999999999"), ("../x", "../x"),
                          ("x@1@2", "x@1@2"), ("leading space", " x"), ("10000 chars", LONG),
                          ("unknown", "never-uploaded")]:
    case(f"adapter id: {label}", NOT_FOUND, "adapter_id", "no adapter")(
        every_id_call(adapter_id))


# ---- UploadDataset --------------------------------------------------------------------

def ds_case(label, code, *says, data: bytes, name="hostile-data"):
    case(f"dataset: {label}", code, *says)(lambda ctx: ctx.dataset(data, name))


case("dataset: no messages", INVALID, "name", "first message")(
    lambda ctx: ctx.dataset_messages([]))
case("dataset: data before the name", INVALID, "name", "first message")(
    lambda ctx: ctx.dataset_messages([fpb.UploadDatasetRequest(data=b'{"ids": [1, 2]}')]))
case("dataset: two names", INVALID, "name", "once")(
    lambda ctx: ctx.dataset_messages([fpb.UploadDatasetRequest(name="a")] * 2))
for label, name in [("empty", ""), ("../x", "../x"), ("a/b", "a/b"), ("..", ".."),
                    ("10000 chars", LONG)]:
    ds_case(f"name {label}", INVALID, "name", "letters, digits", data=b'{"ids": [1, 2]}\n',
            name=name)
ds_case("not UTF-8", INVALID, "data", "not UTF-8", data=b'{"text": "caf\xe9"}\n')
ds_case("not JSON", INVALID, "data line 2", "not JSON",
        data=b'{"ids": [1, 2]}\n{"ids": [1, 2\n')
ds_case("a JSON array", INVALID, "data line 1", 'exactly one of "text" and "ids"',
        data=b"[1, 2, 3]\n")
ds_case("wrong keys", INVALID, "data line 1", 'exactly one of "text" and "ids"',
        data=b'{"tokens": [1, 2]}\n')
ds_case("both keys", INVALID, "data line 1", 'exactly one of "text" and "ids"',
        data=b'{"text": "a b", "ids": [1, 2]}\n')
ds_case("ids a string", INVALID, "data line 1", "list of integers", data=b'{"ids": "1 2"}\n')
ds_case("ids bools", INVALID, "data line 1", "list of integers",
        data=b'{"ids": [true, false]}\n')
ds_case("ids floats", INVALID, "data line 1", "list of integers", data=b'{"ids": [1.0, 2]}\n')
ds_case("ids NaN", INVALID, "data line 1", "list of integers", data=b'{"ids": [1, NaN]}\n')
ds_case("ids nested", INVALID, "data line 1", "list of integers",
        data=b'{"ids": [[1, 2]]}\n')
ds_case("negative id", INVALID, "data line 1", "token id -1 at position 1",
        data=b'{"ids": [1, -1]}\n')
ds_case("id = vocabulary size", INVALID, "data line 3", "token id 1024", "[0, 1024)",
        data=b'{"ids": [1, 2]}\n\n{"ids": [1, 1024]}\n')
ds_case("id beyond int64", INVALID, "data line 1", "token id 1" + "0" * 30,
        data=b'{"ids": [1, 1' + b"0" * 30 + b"]}\n")
ds_case("id of 5000 digits", INVALID, "data line 1", "number too long",
        data=b'{"ids": [1, ' + b"9" * 5000 + b"]}\n")
ds_case("id of 4000 digits", INVALID, "data line 1", "token id 9999", "(4000 digits)",
        data=b'{"ids": [1, ' + b"9" * 4000 + b"]}\n")
ds_case("one-token sequence", INVALID, "data line 1", "1 token(s)", "at least 2",
        data=b'{"ids": [7]}\n')
ds_case("empty ids", INVALID, "data line 1", "0 token(s)", data=b'{"ids": []}\n')
ds_case("empty text", INVALID, "data line 1", "non-empty string", data=b'{"text": ""}\n')
ds_case("text not a string", INVALID, "data line 1", "non-empty string",
        data=b'{"text": ["a b"]}\n')
ds_case("text with a lone surrogate", INVALID, "data line 1", "surrogate",
        data=b'{"text": "ok \\ud800 then"}\n')
ds_case("nested 50000 deep", INVALID, "data line 1", "nested too deeply",
        data=b"[" * 50_000 + b"]" * 50_000 + b"\n")
ds_case("a line of 512 KiB", INVALID, "data line 2", "is longer than", "split it",
        data=b'{"ids": [1, 2]}\n{"text": "' + b"a" * (512 << 10) + b'"}\n')
ds_case("no lines", INVALID, "data", "no examples", data=b"")
ds_case("only blank lines", INVALID, "data", "no examples", data=b"\n  \n\r\n\t\n")
ds_case("over the size cap", C.RESOURCE_EXHAUSTED, "byte upload limit",
        data=b'{"ids": [1, 2]}\n' * 70_000)


# ---- DeleteDataset ------------------------------------------------------------------------

for label, dataset_id in [("empty", ""), ("../x", "../x"), ("path traversal",
                          "../../adapters/acme"), ("10000 chars", LONG),
                          ("unknown", "never-uploaded")]:
    case(f"delete dataset: {label}", NOT_FOUND, "dataset_id", "no dataset")(
        lambda ctx, dataset_id=dataset_id: ctx.tune.DeleteDataset(
            fpb.DeleteDatasetRequest(dataset_id=dataset_id), timeout=30))


# ---- StartFineTune ---------------------------------------------------------------------

TS = fpb.TrainingSequence


def ft_case(label, code, *says, **fields):
    case(f"fine-tune: {label}", code, *says)(lambda ctx: ctx.start(**fields))


OK_TEXTS = dict(adapter_name="hostile-ft", texts=["a b c d"])
ft_case("no data", INVALID, "texts, sequences, dataset_id", adapter_name="x")
ft_case("texts and dataset", INVALID, "texts, sequences, dataset_id", adapter_name="x",
        texts=["a b"], dataset_id="d")
ft_case("sequences and texts", INVALID, "texts, sequences, dataset_id", adapter_name="x",
        texts=["a b"], sequences=[TS(ids=[1, 2])])
for label, name in [("empty", ""), ("../etc", "../etc"), ("65 chars", "a" * 65),
                    ("slash", "a/b"), ("10000 chars", LONG)]:
    ft_case(f"adapter_name {label}", INVALID, "adapter_name", "letters, digits",
            adapter_name=name, texts=["a b"])
ft_case("rank negative", INVALID, "rank", "-1 is outside 1..8", **OK_TEXTS, rank=-1)
ft_case("rank above the maximum", INVALID, "rank", "9 is outside 1..8", **OK_TEXTS, rank=9)
ft_case("rank int32 max", INVALID, "rank", f"{INT32_MAX} is outside", **OK_TEXTS,
        rank=INT32_MAX)
ft_case("steps and epochs", INVALID, "steps, epochs", "not both", **OK_TEXTS, steps=2,
        epochs=2)
ft_case("steps negative", INVALID, "steps, epochs", "1..1000000", **OK_TEXTS, steps=-1)
ft_case("epochs negative", INVALID, "steps, epochs", **OK_TEXTS, epochs=INT32_MIN)
ft_case("steps above a million", INVALID, "steps, epochs", **OK_TEXTS, steps=1_000_001)
ft_case("epochs x batches above a million", INVALID, "epochs", "steps", "at most 1000000",
        adapter_name="x", sequences=[TS(ids=[1, 2])] * 5000, epochs=1_000_000, batch_size=1)
SMALL_DATASET = "hostile-three"  # three examples, uploaded by the ctx fixture


@case("fine-tune: epochs x batches of a dataset above a million", INVALID, "epochs",
      "at most 1000000")
def _(ctx):
    # 3 million steps: refused for inline data, and must be for a dataset too. (With
    # 60000 examples the job's step counts overflow int32 and every later
    # ListFineTunes of the tenant ends INTERNAL, so that one is not run here.)
    job = ctx.start(adapter_name="x", dataset_id=SMALL_DATASET, epochs=1_000_000,
                    batch_size=1)
    ctx.tune.CancelFineTune(fpb.CancelFineTuneRequest(job_id=job.job_id), timeout=120)
    pytest.fail(f"started job {job.job_id} of 3 million steps")


ft_case("sequence_length 1", INVALID, "sequence_length", "1 is outside 2..1024", **OK_TEXTS,
        sequence_length=1)
ft_case("sequence_length negative", INVALID, "sequence_length", **OK_TEXTS,
        sequence_length=-5)
ft_case("sequence_length above the limit", INVALID, "sequence_length", "1025", **OK_TEXTS,
        sequence_length=1025)
ft_case("batch_size negative", INVALID, "batch_size", **OK_TEXTS, batch_size=-3)
ft_case("batch x length above the batch tokens", INVALID, "batch_size", "16384", **OK_TEXTS,
        batch_size=INT32_MAX, sequence_length=1024)
ft_case("learning_rate NaN", INVALID, "learning_rate", "positive number", **OK_TEXTS,
        learning_rate=float("nan"))
ft_case("learning_rate inf", INVALID, "learning_rate", **OK_TEXTS, learning_rate=float("inf"))
ft_case("learning_rate negative", INVALID, "learning_rate", **OK_TEXTS, learning_rate=-1e-3)
ft_case("learning_rate 5", INVALID, "learning_rate", "above 1", **OK_TEXTS, learning_rate=5)
ft_case("alpha NaN", INVALID, "alpha", "positive number", **OK_TEXTS, alpha=float("nan"))
ft_case("alpha negative inf", INVALID, "alpha", **OK_TEXTS, alpha=float("-inf"))
ft_case("seed negative", INVALID, "seed", "-1", **OK_TEXTS, seed=-1)
ft_case("empty text", INVALID, "texts[1]", "non-empty", adapter_name="x", texts=["a b", ""])
ft_case("one-token sequence", INVALID, "sequences[0]", "at least 2", adapter_name="x",
        sequences=[TS(ids=[5])])
ft_case("empty sequence", INVALID, "sequences[1]", "0 token(s)", adapter_name="x",
        sequences=[TS(ids=[5, 6]), TS()])
ft_case("id out of range", INVALID, "sequences[0]", "token id 5000", adapter_name="x",
        sequences=[TS(ids=[5, 5000])])
ft_case("negative id", INVALID, "sequences[0]", f"token id {INT32_MIN}", adapter_name="x",
        sequences=[TS(ids=[INT32_MIN, 5])])
ft_case("unknown dataset", NOT_FOUND, "dataset_id", "no dataset", adapter_name="x",
        dataset_id="never-uploaded")
ft_case("dataset path traversal", NOT_FOUND, "dataset_id", "no dataset", adapter_name="x",
        dataset_id="../../adapters/acme")
ft_case("dataset id 10000 chars", NOT_FOUND, "dataset_id", "no dataset", adapter_name="x",
        dataset_id=LONG)
ft_case("unknown initial adapter", NOT_FOUND, "adapter_id", "no adapter", **OK_TEXTS,
        initial_adapter_id="never-uploaded")
ft_case("initial adapter path traversal", NOT_FOUND, "adapter_id", **OK_TEXTS,
        initial_adapter_id="../acme/x@1")


# ---- WatchFineTune, CancelFineTune --------------------------------------------------------

for label, job_id in [("empty", ""), ("unknown", "ft-000000000000"), ("../x", "../x"),
                      ("10000 chars", LONG)]:
    case(f"watch: job id {label}", NOT_FOUND, "job_id", "no fine-tune job")(
        lambda ctx, job_id=job_id: list(ctx.tune.WatchFineTune(
            fpb.WatchFineTuneRequest(job_id=job_id), timeout=30)))
    case(f"cancel: job id {label}", NOT_FOUND, "job_id", "no fine-tune job")(
        lambda ctx, job_id=job_id: ctx.tune.CancelFineTune(
            fpb.CancelFineTuneRequest(job_id=job_id), timeout=30))


# ---- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ctx(service, local_model, tmp_path_factory):
    base = local_model[0]
    scratch = tmp_path_factory.mktemp("hostile")
    secret = scratch / "secret.bin"  # outside the registry root: must never be read
    secret.write_bytes(np.arange(1 << 16, dtype="float32").tobytes())
    random_adapter(base.config).write_lora_file(secret.with_suffix(".lora.h5"), base.config)
    with keyed_channel(service.address, ACME_KEY) as channel:
        fpb_grpc.FineTuneServiceStub(channel).UploadDataset(iter(
            [fpb.UploadDatasetRequest(name=SMALL_DATASET),
             fpb.UploadDatasetRequest(data=b'{"ids": [1, 2]}\n' * 3)]), timeout=60)
        yield Ctx(address=service.address, gemma=pb_grpc.GemmaServiceStub(channel),
                  adapters=apb_grpc.AdapterServiceStub(channel),
                  tune=fpb_grpc.FineTuneServiceStub(channel), config=base.config,
                  fingerprint=base.fingerprint(), scratch=scratch, secret=secret)


def tree(root: pathlib.Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def stored_state(ctx: Ctx, service) -> tuple:
    """What a refused request must leave alone: the registry and job listings,
    every file under the data directory, and what sits next to it."""
    data_dir = pathlib.Path(service.server.config.data_dir)
    return (sorted(a.adapter_id for a in ctx.adapters.ListAdapters(
                apb.ListAdaptersRequest(), timeout=30).adapters),
            sorted(j.job_id for j in ctx.tune.ListFineTunes(
                fpb.ListFineTunesRequest(), timeout=30).jobs),
            tree(data_dir), sorted(p.name for p in data_dir.parent.iterdir()))


def assert_refused_well(error: grpc.RpcError):
    assert error.code() not in (C.INTERNAL, C.UNKNOWN, C.OK), (error.code(), error.details())
    assert error.details(), error.code()
    assert len(error.details()) <= MAX_MESSAGE_CHARS, len(error.details())


def assert_serves_like_the_local_model(service, local_model):
    base = local_model[0]
    ids = [2, 10, 20, 30, 40]
    with keyed_channel(service.address, GLOBEX_KEY) as channel:
        responses = list(pb_grpc.GemmaServiceStub(channel).Forward(pb.ForwardRequest(
            sequences=[seq(*ids)], layers=[1, -1]), timeout=60))
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="gemma.v1.GemmaService"), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    got = tensors_of(responses)
    expected = base.hidden_states({"token_ids": np.array([ids], "int32"),
                                   "padding_mask": np.ones((1, len(ids)), "int32")},
                                  layers=[1, -1])
    for layer, want in zip((1, NUM_LAYERS), expected):
        np.testing.assert_allclose(got[(0, layer)], np.asarray(want)[0], atol=1e-5)


# ---- the corpus --------------------------------------------------------------------------------

def test_the_corpus_is_large_and_covers_every_rpc():
    assert len(CASES) >= 50
    kinds = {name.split(":")[0] for name in CASES}
    assert {"forward", "metadata", "upload", "adapter id", "dataset", "delete dataset",
            "fine-tune", "watch", "cancel"} <= kinds


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_refused_with_its_code_and_changes_nothing(ctx, service, name):
    bad = CASES[name]
    before = stored_state(ctx, service)
    with pytest.raises(grpc.RpcError) as caught:
        bad.call(ctx)
    error = caught.value
    assert_refused_well(error)
    assert error.code() == bad.code, error.details()
    for part in bad.says:
        assert part in error.details(), (part, error.details())
    assert stored_state(ctx, service) == before


def test_after_the_corpus_the_server_still_serves_correctly(service, local_model):
    assert_serves_like_the_local_model(service, local_model)


# ---- odd but valid input ------------------------------------------------------------------------

ODD_BUT_VALID = {
    "NUL bytes in a text": dict(texts=["a\x00b\x00\x00c"]),
    "only NUL": dict(texts=["\x00"]),
    "emoji and combining marks": dict(texts=["\U0001F600\u0301\u200d\U0001F9D1 e\u0301"]),
    "right-to-left and controls": dict(texts=["\u202e\u05e9\u05dc\u05d5\u05dd\t\r\n\x7f"]),
    "no bos": dict(texts=["x"], add_bos=False),
    "longest sequence": dict(sequences=[seq(*range(1024))], pooling=pb.POOLING_MEAN),
    "most sequences": dict(sequences=[seq(i, 1023 - i) for i in range(32)]),
    "every layer, negative and positive": dict(sequences=[seq(0, 1023)],
                                               layers=[-5, 1, -3, 3, -1]),
    "half precision": dict(sequences=[seq(5)], dtype=pb.DTYPE_FLOAT16,
                           pooling=pb.POOLING_LAST_TOKEN),
}


@pytest.mark.parametrize("name", list(ODD_BUT_VALID))
def test_odd_but_valid_input_is_served(ctx, name):
    fields = ODD_BUT_VALID[name]
    check_forward_answer(pb.ForwardRequest(**fields), ctx.forward(**fields))


def test_odd_but_valid_datasets_are_stored(ctx):
    """JSON Lines ends lines at "\\n" only: a text may hold U+2028, U+2029 or
    U+0085 unescaped; CRLF line ends and a leading byte order mark are fine."""
    lines = ['{"text": "one\u2028two\u2029three\x85four"}', '{"ids": [3, 4, 5]}',
             '{"text": "NUL \\u0000 and emoji \U0001F600"}']
    data = ("\ufeff" + "\r\n".join(lines) + "\r\n").encode()
    dataset = ctx.dataset(data, name="odd-but-valid")
    assert dataset.num_examples == 3 and dataset.num_tokens > 3


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_other_float_widths_are_accepted_and_cast_to_float32(ctx, tmp_path, dtype):
    import ml_dtypes

    wide = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    tensors = {k: v.astype(wide) for k, v in random_adapter(ctx.config).tensors().items()}
    record = ctx.upload(safetensors.numpy.save(tensors, metadata=st_metadata(ctx)),
                        SAFETENSORS, name=f"wide-{dtype}")
    try:
        path = tmp_path / "back.lora.h5"
        path.write_bytes(b"".join(chunk.data for chunk in ctx.adapters.ExportAdapter(
            apb.ExportAdapterRequest(adapter_id=record.adapter_id))))
        back = LoraAdapter.from_lora_file(path, ctx.config).tensors()
        for name, value in tensors.items():  # alpha = rank: nothing folded into b
            np.testing.assert_array_equal(back[name], value.astype("float32"))
    finally:
        ctx.adapters.DeleteAdapter(apb.DeleteAdapterRequest(adapter_id=f"wide-{dtype}"))


# ---- reading a Forward answer -----------------------------------------------------------------

NUMPY = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16,
         pb.DTYPE_BFLOAT16: np.uint16}


def tensors_of(responses) -> dict[tuple[int, int], np.ndarray]:
    header = responses[0].header
    parts: dict[tuple[int, int], list] = {}
    for response in responses[1:]:
        chunk = response.chunk
        parts.setdefault((chunk.sequence_index, chunk.layer), []).append(
            np.frombuffer(chunk.data, NUMPY[chunk.dtype]).reshape(tuple(chunk.shape)))
    out = {}
    for key, pieces in parts.items():
        out[key] = np.concatenate(pieces) if len(pieces[0].shape) == 2 else pieces[0]
        assert list(out[key].shape) == list(header.sequences[key[0]].shape)
    return out


def check_forward_answer(request: pb.ForwardRequest, responses) -> None:
    """The answer has one header, then every announced tensor, shaped right."""
    assert responses and responses[0].WhichOneof("kind") == "header"
    header = responses[0].header
    count = len(request.texts) + len(request.sequences)
    assert len(header.sequences) == count
    wanted_layers = [layer % (NUM_LAYERS + 1) for layer in (request.layers or [-1])]
    assert list(header.layers) == wanted_layers
    assert header.hidden_dim > 0
    pooled = request.pooling in (pb.POOLING_LAST_TOKEN, pb.POOLING_MEAN)
    for i, info in enumerate(header.sequences):
        if request.sequences:
            assert list(info.token_ids) == list(request.sequences[i].ids)
        tokens = len(info.token_ids)
        assert list(info.shape) == ([header.hidden_dim] if pooled
                                    else [tokens, header.hidden_dim])
    assert all(r.WhichOneof("kind") == "chunk" for r in responses[1:])
    assert sum(len(r.chunk.data) for r in responses[1:]) == header.total_bytes
    tensors = tensors_of(responses)
    assert set(tensors) == {(i, layer) for i in range(count) for layer in wanted_layers}
    for value in tensors.values():
        if value.dtype != np.uint16:
            assert np.isfinite(value).all()


# ---- the fuzz: ForwardRequest -------------------------------------------------------------------

INT32 = st.integers(INT32_MIN, INT32_MAX)


def mostly(good, bad, odds=4):
    """`good` about `odds` times as often as `bad`: each request is wrong in
    at most a few ways, so valid ones are common and each rule gets hit.
    (st.one_of would not do: it merges equal branches.)"""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: good if ok else bad)


token_ids = mostly(st.integers(0, VOCAB - 1),
                   st.one_of(st.sampled_from([-1, VOCAB, INT32_MAX, INT32_MIN]), INT32), 12)
sequences = mostly(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24),
                   st.one_of(st.lists(token_ids, max_size=24),
                             st.sampled_from([[7] * MAX_LENGTH, [7] * (MAX_LENGTH + 1)])))
texts = mostly(st.text(min_size=1, max_size=40),
               st.one_of(st.just(""), st.sampled_from([
                   "x" * (MAX_TEXT_BYTES + 1), "\U0001F600" * 4096, "\x00" * 10,
                   "word " * 1200])))
adapter_ids = mostly(st.sampled_from(["", "", OK_ADAPTER, f"{OK_ADAPTER}@1"]),
                     st.one_of(st.sampled_from(["nope", f"{OK_ADAPTER}@0", f"{OK_ADAPTER}@2",
                                                "../x", "@", "x" * 1000]),
                               st.text(max_size=12)))
layer_lists = mostly(
    st.lists(st.integers(-NUM_LAYERS - 1, NUM_LAYERS), max_size=3,
             unique_by=lambda i: i % (NUM_LAYERS + 1)),
    st.lists(st.one_of(st.integers(-NUM_LAYERS - 2, NUM_LAYERS + 1), INT32),
             max_size=MAX_LAYERS + 1))
enums = mostly(st.integers(0, 3), INT32, 8)


@st.composite
def forward_requests(draw):
    fields = {}
    shape = draw(st.sampled_from(["texts"] * 4 + ["sequences"] * 5 + ["both", "neither",
                                                                     "33"]))
    if shape in ("texts", "both"):
        fields["texts"] = draw(st.lists(texts, min_size=1, max_size=4))
    if shape in ("sequences", "both"):
        fields["sequences"] = [seq(*ids) for ids in draw(st.lists(sequences, min_size=1,
                                                                   max_size=4))]
    if shape == "33":
        fields["sequences"] = [seq(1)] * (MAX_SEQUENCES + 1)
    add_bos = draw(st.sampled_from([None, True, False] if shape == "texts"
                                   else [None] * 8 + [True, False]))
    if add_bos is not None:
        fields["add_bos"] = add_bos
    fields["layers"] = draw(layer_lists)
    fields["pooling"] = draw(enums)
    fields["dtype"] = draw(enums)
    fields["adapter_id"] = draw(adapter_ids)
    return pb.ForwardRequest(**fields)


def predicted_code(request: pb.ForwardRequest, tokenizer) -> grpc.StatusCode:
    """What the service must answer, from the documented rules alone."""
    texts, sequences = list(request.texts), list(request.sequences)
    if bool(texts) == bool(sequences) or len(texts) + len(sequences) > MAX_SEQUENCES:
        return INVALID
    if request.HasField("add_bos") and not texts:
        return INVALID
    if request.pooling not in range(4) or request.dtype not in range(4):
        return INVALID
    layers = list(request.layers) or [-1]
    if len(layers) > MAX_LAYERS or any(not -NUM_LAYERS - 1 <= i <= NUM_LAYERS for i in layers):
        return INVALID
    if len({i % (NUM_LAYERS + 1) for i in layers}) != len(layers):
        return INVALID
    add_bos = request.add_bos if request.HasField("add_bos") else True
    for text in texts:
        if not text or len(text.encode()) > MAX_TEXT_BYTES:
            return INVALID
        if not 1 <= len(tokenizer.tokenize(text, add_bos=add_bos)) <= MAX_LENGTH:
            return INVALID
    for s in sequences:
        if not 1 <= len(s.ids) <= MAX_LENGTH or any(not 0 <= i < VOCAB for i in s.ids):
            return INVALID
    if request.adapter_id not in ("", OK_ADAPTER, f"{OK_ADAPTER}@1"):
        return NOT_FOUND
    return C.OK


@pytest.fixture(scope="module")
def ok_adapter(ctx):
    """One good adapter of acme's, so the fuzz also runs adapted requests."""
    if OK_ADAPTER not in {a.name for a in ctx.adapters.ListAdapters(
            apb.ListAdaptersRequest()).adapters}:
        ctx.upload(lora_h5(ctx, rank=MAX_ADAPTER_RANK // 2), name=OK_ADAPTER)
    return OK_ADAPTER


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request=forward_requests())
def test_fuzzed_forward_requests_are_answered_or_refused_well(ctx, ok_adapter, local_model,
                                                               request):
    expected = predicted_code(request, local_model[1])
    try:
        responses = list(ctx.gemma.Forward(request, timeout=60))
    except grpc.RpcError as error:
        event(error.code().name + ' ' + error.details().split(':')[0][:30])
        assert_refused_well(error)
        assert error.code() == expected, (error.code(), error.details())
        return
    event("OK")
    assert expected == C.OK, f"accepted, but {expected} was due"
    check_forward_answer(request, responses)


# ---- the fuzz: StartFineTuneRequest ----------------------------------------------------------

floats32 = mostly(st.sampled_from([0.0, 1e-3, 2.0]),
                  st.floats(width=32, allow_nan=True, allow_infinity=True), 3)
# The valid shapes a job may take: few, so the workers compile few training steps.
JOB_SHAPES = [dict(rank=2, batch_size=4, sequence_length=32),
              dict(rank=0, batch_size=4, sequence_length=16)]


@st.composite
def fine_tune_requests(draw):
    fields = dict(adapter_name=draw(mostly(st.just("fuzz"), st.sampled_from(
        ["", "../x", "a" * 65, "a/b", "fuzz.v-2"]))))
    sources = draw(mostly(st.sampled_from([{"texts"}, {"sequences"}, {"dataset_id"}]),
                          st.sets(st.sampled_from(["texts", "sequences", "dataset_id"]),
                                  max_size=3)))
    for source in sources:
        if source == "texts":
            fields["texts"] = draw(st.lists(mostly(st.text(min_size=1, max_size=20),
                                                   st.text(max_size=2)),
                                            min_size=1, max_size=3))
        elif source == "sequences":
            fields["sequences"] = [TS(ids=ids) for ids in draw(st.lists(mostly(
                st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=12),
                st.lists(token_ids, max_size=12)), min_size=1, max_size=3))]
        else:
            fields["dataset_id"] = draw(mostly(st.just("fuzz-data"),
                                               st.sampled_from(["nope", "../x", "a" * 500])))
    fields["initial_adapter_id"] = draw(mostly(st.just(""), st.sampled_from(
        ["nope", "../x@1", "x" * 500])))
    fields.update(draw(mostly(st.sampled_from(JOB_SHAPES), st.fixed_dictionaries(dict(
        rank=st.one_of(st.sampled_from([-1, MAX_ADAPTER_RANK + 1]), INT32),
        batch_size=st.one_of(st.sampled_from([-1, 0, 1 << 20]), INT32),
        sequence_length=st.one_of(st.sampled_from([-1, 1, 1025]), INT32))), 3)))
    fields["alpha"] = draw(floats32)
    fields["learning_rate"] = draw(floats32)
    length = draw(mostly(st.sampled_from([dict(steps=1), dict(steps=3), dict()]),
                         st.fixed_dictionaries(dict(steps=INT32, epochs=INT32)), 3))
    fields.update(length)
    fields["seed"] = draw(mostly(st.integers(0, 10), st.integers(-2**63, 2**63 - 1)))
    return fpb.StartFineTuneRequest(**fields)


@pytest.fixture(scope="module")
def globex_tune(service):
    """Fine-tunes run as globex, so acme's registry and jobs stay as the
    other tests expect."""
    with keyed_channel(service.address, GLOBEX_KEY) as channel:
        tune = fpb_grpc.FineTuneServiceStub(channel)
        tune.UploadDataset(iter([fpb.UploadDatasetRequest(name="fuzz-data"),
                                 fpb.UploadDatasetRequest(data=b'{"ids": [1, 2, 3]}\n')]))
        yield tune


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=fine_tune_requests())
def test_fuzzed_fine_tune_requests_are_started_or_refused_well(globex_tune, request):
    try:
        job = globex_tune.StartFineTune(request, timeout=60)
    except grpc.RpcError as error:
        event(error.code().name + ' ' + error.details().split(':')[0][:30])
        assert_refused_well(error)
        return
    event("started")
    # A valid request started a real job: stop it at once.
    assert job.job_id and job.state in (fpb.FINE_TUNE_STATE_QUEUED,
                                        fpb.FINE_TUNE_STATE_RUNNING)
    ended = globex_tune.CancelFineTune(fpb.CancelFineTuneRequest(job_id=job.job_id),
                                       timeout=120)
    assert ended.state in (fpb.FINE_TUNE_STATE_CANCELLED, fpb.FINE_TUNE_STATE_SUCCEEDED,
                           fpb.FINE_TUNE_STATE_FAILED), ended
    event(fpb.FineTuneState.Name(ended.state))
    if ended.state == fpb.FINE_TUNE_STATE_FAILED:  # the job's error must be a clear one
        event(f"failed: {ended.error[:60]}")
        assert ended.error and "internal" not in ended.error.lower(), ended.error


def test_after_the_fuzz_the_server_still_serves_correctly(service, local_model):
    assert_serves_like_the_local_model(service, local_model)
