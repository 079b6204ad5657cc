"""One log format for the coordinator and the workers: plain or JSON lines.

A request's id travels with its work to the worker and is attached to log
records as `extra={"request_id": ...}`, so one grep (or one log query on
`request_id`) follows a request across processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

LOG_FORMAT_ENV = "GEMMA_SERVE_LOG_FORMAT"
LOG_LEVEL_ENV = "GEMMA_SERVE_LOG_LEVEL"
# Fields a record may carry through `extra=` that belong in the output.
CONTEXT_FIELDS = ("request_id", "tenant", "rpc", "code", "ms", "worker_ms", "worker_id",
                  "job_id", "adapter_id", "sequences", "tokens")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and context."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage(), "pid": record.process}
        for field in CONTEXT_FIELDS:
            if hasattr(record, field):
                entry[field] = getattr(record, field)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """Human-readable, with the context fields appended as key=value."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{f}={getattr(record, f)}" for f in CONTEXT_FIELDS
                           if hasattr(record, f))
        line = super().format(record)
        return f"{line} [{context}]" if context else line


def configure_logging(log_format: str | None = None, level: str | None = None) -> None:
    """Sets the root handler's format, "json" or "plain", and level (default:
    the GEMMA_SERVE_LOG_FORMAT / GEMMA_SERVE_LOG_LEVEL environment variables,
    else plain and INFO; INFO logs one line per request)."""
    log_format = (log_format or os.environ.get(LOG_FORMAT_ENV) or "plain").lower()
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    if log_format not in ("json", "plain"):
        raise ValueError(f"log format must be 'json' or 'plain', got {log_format!r}.")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
