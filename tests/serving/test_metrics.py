"""The Prometheus endpoint, scraped over HTTP, moves with the traffic."""

import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.log_format import JsonFormatter


def scrape(service) -> dict:
    """{(sample name, sorted labels): value} from /metrics."""
    url = f"http://127.0.0.1:{service.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=30).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples, name, **labels):
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and labels.items() <= dict(sample_labels).items())


def test_counters_move_after_requests(service, client):
    before = scrape(service)
    for _ in range(3):
        client.forward(token_ids=[[1, 2, 3, 4, 5]])
    with pytest.raises(grpc.RpcError):
        client.forward(token_ids=[[1, 2, 10**6]])
    import time
    time.sleep(1.1)  # worker numbers are cached for a second
    after = scrape(service)
    assert total(after, "gemma_requests_total", rpc="Forward", code="OK") \
        - total(before, "gemma_requests_total", rpc="Forward", code="OK") == 3
    assert total(after, "gemma_requests_total", rpc="Forward", code="INVALID_ARGUMENT") \
        - total(before, "gemma_requests_total", rpc="Forward", code="INVALID_ARGUMENT") == 1
    assert total(after, "gemma_forward_tokens_total") - total(
        before, "gemma_forward_tokens_total") == 15
    assert total(after, "gemma_request_seconds_count", rpc="Forward") - total(
        before, "gemma_request_seconds_count", rpc="Forward") == 4
    assert total(after, "gemma_worker_batches_total") - total(
        before, "gemma_worker_batches_total") >= 3
    assert total(after, "gemma_worker_batch_rows_count") >= 3
    assert total(after, "gemma_worker_ready") == 2
    assert total(after, "gemma_worker_forward_requests_total") - total(
        before, "gemma_worker_forward_requests_total") == 3
    assert total(after, "gemma_forward_tokens_per_second") >= 15 / 10  # last 10 s
    for name in ("gemma_worker_queue_depth", "gemma_worker_adapters_resident",
                 "gemma_worker_adapter_evictions_total", "gemma_fine_tune_jobs"):
        assert any(sample == name for sample, _ in after), name


def test_json_log_lines_carry_the_request_id():
    record = logging.LogRecord("gemma_serve.worker", logging.INFO, __file__, 1, "forward %s",
                               ("abc123",), None)
    record.request_id, record.ms = "abc123", 1.5
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "forward abc123" and entry["request_id"] == "abc123"
    assert entry["level"] == "INFO" and entry["ms"] == 1.5


def test_a_requests_log_line_names_its_worker_and_the_time_there(client, caplog):
    with caplog.at_level(logging.INFO, logger="gemma_serve.requests"):
        result = client.forward(token_ids=[[2, 3, 4, 5]], pooling="mean")
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == result.request_id]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    line = lines[0]
    assert line.name == "gemma_serve.requests" and line.worker_id == result.worker_id
    assert line.tenant == "acme" and line.sequences == 1 and line.tokens == 4
    assert 0 < line.worker_ms <= line.ms  # the worker's share of the call's time
    entry = json.loads(JsonFormatter().format(line))
    assert entry["worker_ms"] == line.worker_ms and entry["request_id"] == result.request_id
