"""Shared by the serving tests: the session server's settings and keys, and a
channel that sends a tenant's key. A module of its own (not conftest.py) so
imports do not depend on which conftest pytest loaded last."""

import dataclasses
import os

import grpc

from worker.worker_config import BatchingConfig

BATCHING = BatchingConfig(length_buckets=(16, 64, 256, 1024), batch_buckets=(1, 4, 16),
                          max_batch_tokens=16384, max_wait_ms=2.0, layer_slots=5)
ACME_KEY, GLOBEX_KEY = "acme-key-0123456789", "globex-key-0123456789"
API_KEYS = {ACME_KEY: "acme", GLOBEX_KEY: "globex"}
MAX_ADAPTERS, MAX_ADAPTER_RANK = 4, 8
# Set by the serving conftest: the session's compilation cache directory.
COMPILATION_CACHE_ENV = "GEMMA_SERVE_TEST_COMPILATION_CACHE"


class BearerKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <key>` to every call of a channel."""

    def __init__(self, key):
        self.key = key

    def _with_key(self, details):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {self.key}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    intercept_stream_stream = intercept_stream_unary


def keyed_channel(address, key=ACME_KEY):
    return grpc.intercept_channel(grpc.insecure_channel(address), BearerKey(key))


def operator_worker_infos(service) -> list[dict]:
    """The workers' counters as the operator sees them (every tenant's work);
    GetModelInfo shows a tenant only its own share of the private ones."""
    return [dataclasses.asdict(stats) for stats in service.call(service.server.worker_infos())]


def shared_compilation_cache() -> list[str]:
    """`gemma-serve` flags that keep compiled programs in the test session's
    one cache, so each server after the first loads its bucket programs
    instead of compiling them (tests of the cache itself leave this out)."""
    return ["--compilation-cache-dir", os.environ[COMPILATION_CACHE_ENV]]
