"""Prometheus metrics of the coordinator, on their own HTTP port.

Call outcomes and latencies are recorded as they happen (by the error
interceptor). Worker-side numbers (batch sizes, queue depth, adapters,
fine-tune steps) are the workers' `WorkerStats`; a collector asks for them
at scrape time, at most once a second, so a scrape costs one small Ray call
per worker and nothing is sampled between scrapes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CACHE_S = 1.0
RATE_WINDOW_S = 10.0


class ServiceMetrics:
    """The service's metrics in a private registry (so tests and several
    servers in one process do not collide).

    Example:
    >>> metrics = ServiceMetrics()
    >>> metrics.record_call("/gemma.v1.GemmaService/Forward", "OK", 0.012)
    >>> metrics.serve("127.0.0.1", 9090)
    """

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("gemma_requests", "Calls by RPC and status code.",
                                ["rpc", "code"], registry=self.registry)
        self.latency = Histogram("gemma_request_seconds", "Call latency by RPC.", ["rpc"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("gemma_forward_tokens", "Tokens run through Forward and Score.",
                              registry=self.registry)
        self.sequences = Counter("gemma_forward_sequences",
                                 "Sequences run through Forward and Score.",
                                 registry=self.registry)
        self._recent_tokens: collections.deque[tuple[float, int]] = collections.deque()
        self.registry.register(_TokenRate(self._recent_tokens))
        self._server = None

    def record_call(self, rpc: str, code: str, seconds: float) -> None:
        rpc = rpc.rsplit("/", 1)[-1]
        self.requests.labels(rpc=rpc, code=code).inc()
        self.latency.labels(rpc=rpc).observe(seconds)

    def record_forward(self, sequences: int, tokens: int) -> None:
        self.sequences.inc(sequences)
        self.tokens.inc(tokens)
        now = time.monotonic()
        self._recent_tokens.append((now, tokens))
        while self._recent_tokens and self._recent_tokens[0][0] < now - RATE_WINDOW_S:
            self._recent_tokens.popleft()

    def watch_workers(self, loop: asyncio.AbstractEventLoop, infos: Callable,
                      jobs_by_state: Callable[[], dict[str, int]]) -> None:
        """Exports worker numbers from `infos()` (a coroutine function run on
        `loop`) and fine-tune job counts from `jobs_by_state()`."""
        self.registry.register(_WorkerCollector(loop, infos, jobs_by_state))

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint (`/metrics`); returns the bound port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class _TokenRate:
    """Tokens per second over the last RATE_WINDOW_S, for dashboards without
    PromQL's rate() (which `gemma_forward_tokens_total` also serves)."""

    def __init__(self, recent):
        self._recent = recent

    def collect(self):
        cutoff = time.monotonic() - RATE_WINDOW_S
        tokens = sum(n for t, n in list(self._recent) if t >= cutoff)
        family = GaugeMetricFamily("gemma_forward_tokens_per_second",
                                   "Forward tokens per second over the last 10 s.")
        family.add_metric([], tokens / RATE_WINDOW_S)
        yield family


class _WorkerCollector:
    """Turns the workers' `WorkerStats` into metric families at scrape time."""

    def __init__(self, loop, infos, jobs_by_state):
        self._loop, self._infos, self._jobs_by_state = loop, infos, jobs_by_state
        self._cached, self._cached_at = [], 0.0

    def _worker_infos(self) -> list:
        if time.monotonic() - self._cached_at > _CACHE_S:
            try:
                self._cached = asyncio.run_coroutine_threadsafe(
                    self._infos(), self._loop).result(timeout=5)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass  # keep the last answer; a busy loop must not fail the scrape
            self._cached_at = time.monotonic()
        return self._cached

    def collect(self):
        infos = self._worker_infos()
        gauges = {
            "in_flight_sequences": ("gemma_worker_queue_depth",
                                    "Sequences queued or running on a worker."),
            "adapters_resident": ("gemma_worker_adapters_resident",
                                  "Adapters in a worker's slots."),
            "compiled_functions": ("gemma_worker_compiled_functions",
                                   "Compiled forward functions of a worker."),
            "max_adapters_in_a_batch": ("gemma_worker_max_adapters_in_a_batch",
                                        "Most distinct adapters (base included) in one batch."),
            "ready": ("gemma_worker_ready", "1 if the worker answers."),
        }
        counters = {
            "batches_run": ("gemma_worker_batches", "Batches run by a worker."),
            "sequences_run": ("gemma_worker_sequences", "Sequences run by a worker."),
            "sequences_cancelled": ("gemma_worker_sequences_cancelled",
                                    "Sequences dropped before running (cancel, deadline)."),
            "adapter_loads": ("gemma_worker_adapter_loads", "Adapter slot writes."),
            "adapter_evictions": ("gemma_worker_adapter_evictions",
                                  "Adapters evicted from a full slot table."),
            "fine_tune_steps": ("gemma_worker_fine_tune_steps", "Training steps run."),
            "forward_requests": ("gemma_worker_forward_requests",
                                 "Forward requests a worker's scheduler received."),
        }
        for families, kind in ((gauges, GaugeMetricFamily), (counters, CounterMetricFamily)):
            for field, (name, help_text) in families.items():
                family = kind(name, help_text, labels=["worker"])
                for info in infos:
                    family.add_metric([info.worker_id], float(getattr(info, field)))
                yield family
        sizes = HistogramMetricFamily("gemma_worker_batch_rows", "Rows per batch run.",
                                      labels=["worker"])
        for info in infos:
            counts = {int(rows): n for rows, n in info.batch_size_counts.items()}
            if not counts:
                continue
            edges = sorted(counts)
            cumulative, buckets = 0, []
            for edge in edges:
                cumulative += counts[edge]
                buckets.append((str(float(edge)), cumulative))
            buckets.append(("+Inf", cumulative))
            sizes.add_metric([info.worker_id], buckets,
                             sum_value=float(sum(r * n for r, n in counts.items())))
        yield sizes
        jobs = GaugeMetricFamily("gemma_fine_tune_jobs", "Fine-tune jobs by state.",
                                 labels=["state"])
        for state, count in sorted(self._jobs_by_state().items()):
            jobs.add_metric([state], float(count))
        yield jobs
