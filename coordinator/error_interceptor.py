"""The one place exceptions become gRPC status codes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from coordinator.errors import (InvalidArgument, ServiceError, StorageFull, Unavailable,
                                is_storage_full)
from coordinator.service_metrics import ServiceMetrics
from coordinator.stream_guard import ResponseWatch
from worker.errors import (AdapterRejected, AdapterSlotsBusy, DeadlineExpired,
                           PoolSaturated, WorkerUnavailable)

log = logging.getLogger("gemma_serve.errors")


# Status messages travel in a header; gRPC refuses headers over 8 KiB.
MAX_MESSAGE_CHARS = 2000


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception raised while serving a call."""
    code, message = _status_of(error)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    return code, message


def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServiceError):
        return error.code, str(error)
    if is_storage_full(error):  # the caller can free space, or tell the operator
        return _status_of(StorageFull())
    if isinstance(error, (DeadlineExpired, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, (
            f"deadline exceeded: {error}" if str(error) else "deadline exceeded")
    if isinstance(error, WorkerUnavailable):
        return grpc.StatusCode.UNAVAILABLE, f"{error}; retry shortly."
    if isinstance(error, (AdapterSlotsBusy, PoolSaturated)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, AdapterRejected):
        return grpc.StatusCode.FAILED_PRECONDITION, f"the adapter cannot be loaded: {error}"
    return grpc.StatusCode.INTERNAL, "internal error; the server log has the details."


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps unary, server-streaming and client-streaming handlers so any
    exception ends the call with the mapped status instead of a bare
    INTERNAL; with `metrics`, records every call's status code and latency.
    A response stream whose client takes no message for `write_timeout_s`
    ends DEADLINE_EXCEEDED (see coordinator/stream_guard.py).
    """

    def __init__(self, metrics: ServiceMetrics | None = None,
                 draining: Callable[[], bool] = lambda: False,
                 write_timeout_s: float | None = None):
        self._metrics = metrics
        self._draining = draining
        self._write_timeout_s = write_timeout_s

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if self._draining() and not method.startswith("/grpc."):
            handler = _refusing(handler)
        # Requests arrive as bytes and are parsed inside the wrappers, so a
        # message that does not parse is INVALID_ARGUMENT, not UNKNOWN.
        parse = handler.request_deserializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, _parse_one(parse)),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, _parse_one(parse)),
                response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, _parse_each(parse)),
                response_serializer=handler.response_serializer)
        return handler  # bidi-streaming handlers (reflection) pass through

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self._metrics is not None:
            self._metrics.record_call(method, getattr(code, "name", str(code)),
                                      time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def _outcome(self, method, context):
        """Maps whatever ends the call to its status, and records it."""
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:  # a handler aborted by itself
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        except Exception as error:  # noqa: BLE001 - mapped, logged if unexpected
            code = status_of(error)[0]
            await _abort(context, error, method)
        finally:
            self._record(method, code, started)

    def _wrap_unary(self, behavior, method, parse):
        """Unary or client-streaming: one response (request may be an iterator)."""
        async def wrapped(request, context):
            async with self._outcome(method, context):
                return await behavior(parse(request), context)
        return wrapped

    def _wrap_stream(self, behavior, method, parse):
        """Server-streaming. The wrapper writes each message itself (an async
        generator's messages are written by gRPC, with no bound on how long
        a client that does not read may block it) and closes the handler's
        generator at once when the call ends, releasing what it holds."""
        if inspect.iscoroutinefunction(behavior):  # writes by itself (health's Watch)
            return self._wrap_unary(behavior, method, parse)

        async def wrapped(request, context):
            async with (self._outcome(method, context),
                        ResponseWatch(self._write_timeout_s) as watch):
                responses = behavior(parse(request), context)
                try:
                    async for response in responses:
                        await watch.write(context, response)
                finally:
                    await responses.aclose()
        return wrapped


async def _abort(context, error: BaseException, method: str):
    """Ends the call with the error's status (context.abort raises AbortError);
    a retry hint travels as gRPC's standard `grpc-retry-pushback-ms`."""
    code, message = status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", method, exc_info=error)
    elif is_storage_full(error):  # the operator must hear of it; the caller sees no path
        log.error("%s: the data directory's storage is full: %s", method, error)
    retry_after_ms = getattr(error, "retry_after_ms", None)
    if retry_after_ms is not None:
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(retry_after_ms)),))
    await context.abort(code, message)


def _parse_one(deserializer):
    """Parses a request's bytes; bytes that are not the method's request
    message are INVALID_ARGUMENT naming the message type."""
    if deserializer is None:
        return lambda request: request
    message_type = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = message_type.full_name if message_type is not None else "request message"

    def parse(request):
        try:
            return deserializer(request)
        except DecodeError as error:
            raise InvalidArgument("request", f"the bytes sent are not a valid {name} "
                                             f"({error}); build it from the service's "
                                             ".proto.") from None
    return parse


def _parse_each(deserializer):
    """Parses a client stream's messages one by one as the handler reads them."""
    if deserializer is None:
        return lambda requests: requests
    parse = _parse_one(deserializer)

    async def parsed(requests):
        async for request in requests:
            yield parse(request)
    return parsed


def _refusing(handler):
    """The same kind of handler, answering UNAVAILABLE: the server is
    draining for shutdown (health and reflection still answer)."""
    async def refuse(request, context):
        raise Unavailable("the server is shutting down; retry on another replica.")

    async def refuse_stream(request, context):
        raise Unavailable("the server is shutting down; retry on another replica.")
        yield  # an async generator, like the handler it replaces

    kinds = {"unary_unary": refuse, "unary_stream": refuse_stream, "stream_unary": refuse,
             "stream_stream": refuse_stream}
    return handler._replace(**{kind: kinds[kind] for kind in kinds
                               if getattr(handler, kind) is not None})
