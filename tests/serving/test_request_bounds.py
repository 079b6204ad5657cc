"""What one request may hold, on a server of its own (auth off, a 2 s stream
idle timeout): a maximal StartFineTune never stalls the event loop (health
keeps answering), uploads that stop sending end and leave no file, a
tenant has at most two uploads open, and a Forward stream its client
never reads ends and gives its tenant's admission back."""

import os
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.admission_control import AdmissionLimits
from coordinator.fine_tune_request import MAX_INLINE_SEQUENCES, MAX_INLINE_TOKENS
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as fpb_grpc
from coordinator.generated.gemma.v1 import gemma_service_pb2 as pb
from coordinator.generated.gemma.v1 import gemma_service_pb2_grpc as pb_grpc
from coordinator.server_thread import ServerThread
from coordinator.service_config import ServiceConfig
from coordinator.stream_guard import StreamLimits
from service_support import COMPILATION_CACHE_ENV
from worker.worker_config import BatchingConfig, WorkerSpec

IDLE_S = 2.0
TOKENS = 64 * 1024  # the tenant's whole token budget: one call of 64 x 1024 holds it
# Health may answer late by this much while the largest requests are
# handled (a wide margin on a noisy 2-core machine: here it stays under
# 60 ms; before the inline caps, 0.5 s to 26 s).
MAX_HEALTH_GAP_S = 0.25


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    config = ServiceConfig(
        worker=WorkerSpec(preset="default", mesh_shape=(1, 1), batching=BatchingConfig(
            length_buckets=(16, 1024), batch_buckets=(1, 16), max_batch_tokens=16384,
            layer_slots=2), compilation_cache_dir=os.environ[COMPILATION_CACHE_ENV]),
        num_workers=1, host="127.0.0.1", port=0, max_sequences_per_request=64,
        data_dir=str(tmp_path_factory.mktemp("bounds-data")), max_upload_bytes=4 << 20,
        metrics_port=None, admission=AdmissionLimits(max_tokens=TOKENS),
        streams=StreamLimits(idle_timeout_s=IDLE_S, upload_timeout_s=60,
                             max_uploads_per_tenant=2))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("GEMMA_SERVE_API_KEYS", raising=False)  # auth off: one tenant
        running = ServerThread(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


class HealthWatch:
    """grpc.health.v1 Check every ~10 ms on a connection of its own (as a
    real health checker has); `gap()` is the longest time between two
    answers since `mark()`."""

    def __init__(self, address):
        self._channel = grpc.insecure_channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)
        self._answers, self._since = [], 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self._stub.Check(health_pb2.HealthCheckRequest(), timeout=120)
            self._answers.append(time.perf_counter())
            time.sleep(0.01)

    def mark(self):
        self._since = time.perf_counter()

    def gap(self):
        time.sleep(0.1)  # an answer after the request's end closes its gap
        times = [self._since] + [t for t in self._answers if t > self._since]
        return max(b - a for a, b in zip(times, times[1:]))

    def close(self):
        self._stop.set()
        self._thread.join(130)
        self._channel.close()


def raw_start(channel, message):
    """StartFineTune with the request serialized beforehand, so the
    client's own serializing is not timed."""
    call = channel.unary_unary("/gemma.v1.FineTuneService/StartFineTune",
                               request_serializer=lambda data: data,
                               response_deserializer=fpb.FineTuneJob.FromString)
    return lambda: call(message.SerializeToString(), timeout=300)


TRAIN = dict(steps=1, batch_size=1, sequence_length=16)
# 10,000 texts of 99 tokens (the count cap, just under the token cap), padded
# with spaces the tokenizer reads and drops: 4.0 MB, the most text a message holds.
MAXIMAL_TEXTS = [("word " * 49).ljust(410)] * MAX_INLINE_SEQUENCES
ACCEPTED = {  # case: its fields, built when used
    "10,000 texts, 4.0 MB": lambda: dict(texts=MAXIMAL_TEXTS),
    "10,000 sequences, 1M tokens": lambda: dict(sequences=[fpb.TrainingSequence(
        ids=[5] * (MAX_INLINE_TOKENS // MAX_INLINE_SEQUENCES))] * MAX_INLINE_SEQUENCES),
}
REFUSED = {  # case: (its fields, what the message says)
    "10,001 texts": (lambda: dict(texts=["word word"] * (MAX_INLINE_SEQUENCES + 1)),
                     ("texts: 10001 items", "at most 10000", "UploadDataset")),
    "4 MiB of tiny texts": (lambda: dict(texts=["a"] * ((4 << 20) // 3 - 20)),
                            ("texts: 1398081 items", "at most 10000")),
    "1M + 10,000 tokens": (lambda: dict(sequences=[fpb.TrainingSequence(ids=[5] * 101)]
                                        * MAX_INLINE_SEQUENCES),
                           ("sequences: hold more than 1000000 tokens", "UploadDataset")),
}


def test_health_answers_while_the_largest_fine_tunes_are_handled(server, channel):
    """Nothing a request carries holds the event loop: tokenizing and
    checking run beside it, oversized inline data is refused before any
    item is read."""
    tune = fpb_grpc.FineTuneServiceStub(channel)
    health = HealthWatch(server.address)
    gaps = {}
    try:
        for case, fields in ACCEPTED.items():
            send = raw_start(channel, fpb.StartFineTuneRequest(adapter_name="max", **fields(),
                                                               **TRAIN))
            health.mark()
            job = send()
            gaps[case] = health.gap()
            tune.CancelFineTune(fpb.CancelFineTuneRequest(job_id=job.job_id), timeout=300)
        for case, (fields, says) in REFUSED.items():
            send = raw_start(channel, fpb.StartFineTuneRequest(adapter_name="max", **fields(),
                                                               **TRAIN))
            health.mark()
            with pytest.raises(grpc.RpcError) as caught:
                send()
            gaps[case] = health.gap()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
            assert all(part in caught.value.details() for part in says), \
                caught.value.details()
    finally:
        health.close()
    print("longest health gap per request (ms):",
          {case: round(gap * 1e3) for case, gap in gaps.items()})
    assert max(gaps.values()) < MAX_HEALTH_GAP_S, gaps


def stalled(first, data_messages, release):
    """A client stream that sends `first` and `data_messages`, then waits
    (without closing) until `release` is set."""
    yield first
    yield from data_messages
    release.wait()


def incoming(server, store):
    return sorted(os.listdir(os.path.join(server.server.config.data_dir, store, ".incoming")))


def test_uploads_that_stop_sending_end_and_leave_no_file(server, channel):
    adapters, tune = apb_grpc.AdapterServiceStub(channel), fpb_grpc.FineTuneServiceStub(channel)
    release = threading.Event()
    chunk = 256 << 10
    adapter_call = adapters.UploadAdapter.future(stalled(
        apb.UploadAdapterRequest(header=apb.UploadHeader(
            name="stalled", format=apb.ADAPTER_FORMAT_SAFETENSORS)),
        [apb.UploadAdapterRequest(data=b"\0" * chunk)], release), timeout=120)
    dataset_call = tune.UploadDataset.future(stalled(
        fpb.UploadDatasetRequest(name="stalled"),
        [fpb.UploadDatasetRequest(data=b'{"ids": [1, 2, 3]}\n' * (chunk // 19))], release),
        timeout=120)
    try:
        time.sleep(IDLE_S / 2)
        # Meanwhile both are on disk as they come, not in memory.
        assert len(incoming(server, "datasets")) == 1
        assert os.path.getsize(os.path.join(server.server.config.data_dir, "datasets",
                                            ".incoming", incoming(server, "datasets")[0])) \
            == 19 * (chunk // 19)
        started = time.monotonic()
        for call in (adapter_call, dataset_call):
            error = call.exception(timeout=60)
            assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message came for 2 s (--stream-idle-timeout-s)" in error.details()
        assert time.monotonic() - started < IDLE_S + 10
    finally:
        release.set()
    assert incoming(server, "datasets") == []
    assert not [name for name in incoming(server, "adapters") if name.startswith("upload-")]


def test_a_tenant_has_at_most_two_uploads_open(server, channel):
    tune = fpb_grpc.FineTuneServiceStub(channel)
    release = threading.Event()
    open_calls = [tune.UploadDataset.future(stalled(fpb.UploadDatasetRequest(name=f"open{i}"),
                                                    [], release), timeout=120)
                  for i in range(2)]
    time.sleep(0.5)
    small = [fpb.UploadDatasetRequest(name="small"),
             fpb.UploadDatasetRequest(data=b'{"ids": [1, 2, 3]}\n')]
    try:
        with pytest.raises(grpc.RpcError) as caught:
            tune.UploadDataset(iter(small), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 uploads in progress" in caught.value.details()
        assert dict(caught.value.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
        for call in open_calls:  # ended by the idle timeout, giving their slots back
            assert call.exception(timeout=60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
    assert tune.UploadDataset(iter(small), timeout=60).num_examples == 1


def test_an_unread_forward_stream_ends_and_frees_its_tenant(server, channel):
    """64 x 1024 tokens with 2 layers: 64 MiB of results that the client
    never reads, holding all of the tenant's tokens until the idle timeout
    ends the call."""
    stub = pb_grpc.GemmaServiceStub(channel)
    rng = np.random.default_rng(0)
    unread = stub.Forward(pb.ForwardRequest(sequences=[
        pb.TokenSequence(ids=rng.integers(0, 1024, 1024).tolist()) for _ in range(64)],
        layers=[1, 2]))  # no deadline, never iterated (yet)
    small = pb.ForwardRequest(sequences=[pb.TokenSequence(ids=[2, 3, 4])])
    outcomes, started = [], time.monotonic()
    while time.monotonic() - started < 120:
        try:
            list(stub.Forward(small, timeout=60))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
            outcomes.append("refused")
            time.sleep(0.2)
        else:
            outcomes.append("served")
            break
    assert outcomes[0] == "refused" and outcomes[-1] == "served", outcomes
    for _ in range(5):  # and stays served
        list(stub.Forward(small, timeout=60))
    received = 0
    with pytest.raises(grpc.RpcError) as caught:
        for _ in unread:
            received += 1
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "took no message for 2 s (--stream-idle-timeout-s)" in caught.value.details()
    assert received < 1 + 64 * 2  # cut short: not the header and all 128 chunks


def test_health_watch_streams_through_the_interceptor(server, channel):
    """Health's Watch writes with context.write itself (no generator): the
    interceptor passes it through, mapping errors as for any call."""
    updates = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                        timeout=30)
    assert next(updates).status == health_pb2.HealthCheckResponse.SERVING
    updates.cancel()
