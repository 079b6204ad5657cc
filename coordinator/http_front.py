"""The HTTP front: OpenAI's embeddings and models API, and Score, on
`--http-port`.

Starlette routes served by uvicorn on the coordinator's own event loop,
calling the same code as gRPC: the tenant from `Authorization: Bearer`
(TenantAuth), Forward's and Score's validation, admission, scheduler and
metrics (GemmaServicer.forward_call), and exceptions mapped to a status once
(error_interceptor.status_of), then to the HTTP status and OpenAI's error
shape here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from coordinator import http_score, openai_embeddings
from coordinator.error_interceptor import status_of
from coordinator.errors import InvalidArgument, NotFound, ServiceError, Unavailable
from coordinator.score_request import parse_score_request, score_response

log = logging.getLogger("gemma_serve.http")

# gRPC status -> (HTTP status, OpenAI error type).
_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
         grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
         grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
         grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
         grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
         grpc.StatusCode.PERMISSION_DENIED: (403, "invalid_request_error"),
         grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
         grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
         grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
         grpc.StatusCode.CANCELLED: (499, "server_error")}
_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class PayloadTooLarge(InvalidArgument):
    """A body over the front's limit (413)."""


def error_response(error: BaseException) -> JSONResponse:
    """OpenAI's error object for `error`, with the matching HTTP status."""
    code, message = status_of(error)
    status, kind = _HTTP.get(code, (500, "server_error"))
    if isinstance(error, PayloadTooLarge):
        status = 413
    param = getattr(error, "field", None)
    headers = {}
    retry_ms = getattr(error, "retry_after_ms", None)
    if retry_ms:
        headers["retry-after"] = str(max(1, round(retry_ms / 1000)))
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": getattr(error, "openai_code", None)
                                   or _CODES.get(status)}},
                        status_code=status, headers=headers)


class _ModelNotFound(NotFound):
    openai_code = "model_not_found"


class HttpFront:
    """The routes, bound to one running service's parts.

    Args:
        servicer: the GemmaServicer (its `forward_call` is the one path).
        auth, adapters, metrics: the service's own.
        model: the base model's name here (`model` in requests and responses).
        max_body_bytes: requests over this are refused (413) unread.
        draining: a callable, True once the service is stopping (503).
    """

    def __init__(self, servicer, auth, adapters, metrics, model: str, max_body_bytes: int,
                 draining):
        self._servicer, self._auth, self._adapters = servicer, auth, adapters
        self._metrics, self.model, self._max_body = metrics, model, max_body_bytes
        self._draining = draining
        self._server: uvicorn.Server | None = None
        self._task = None
        self.app = Starlette(routes=[
            Route("/v1/embeddings", self._measured(self.embeddings), methods=["POST"]),
            Route("/v1/models", self._measured(self.models), methods=["GET"]),
            Route("/v1/score", self._measured(self.score), methods=["POST"])],
            exception_handlers={HTTPException: self._http_error})

    async def _http_error(self, request: Request, error: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse({"error": {"message": f"{request.method} {request.url.path}: "
                                                  f"{error.detail}", "type": kind,
                                       "param": None, "code": None}},
                            status_code=error.status_code)

    def _measured(self, handler):
        async def route(request: Request):
            started, code = time.perf_counter(), "OK"
            try:
                if self._draining():
                    raise Unavailable("the server is shutting down; retry on another.")
                response = await handler(request)
            except Exception as error:  # every failure answers in OpenAI's shape
                if not isinstance(error, ServiceError):
                    log.exception("%s %s failed", request.method, request.url.path)
                code = status_of(error)[0].name
                response = error_response(error)
            self._metrics.record_call(request.url.path, code, time.perf_counter() - started)
            return response
        return route

    def _tenant(self, request: Request) -> str:
        header = request.headers.get("authorization")
        return self._auth.tenant_for_metadata([("authorization", header)] if header else [])

    async def _json(self, request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_body:
            raise PayloadTooLarge("body", f"is {declared} bytes; the limit is "
                                          f"{self._max_body}. Send fewer or shorter inputs.")
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self._max_body:
                raise PayloadTooLarge("body", f"is over the {self._max_body} byte limit. Send "
                                              "fewer or shorter inputs.")
            body.append(chunk)
        try:
            return json.loads(b"".join(body))
        except (ValueError, RecursionError) as error:
            raise InvalidArgument("body", f"is not valid JSON ({type(error).__name__}: "
                                          f"{str(error)[:80]}).") from None

    def _adapter_id(self, tenant: str, model) -> str:
        """"" for the base model, else the caller's adapter `model` names."""
        if not isinstance(model, str) or not model:
            raise InvalidArgument("model", "is required: the base model's name "
                                           f"({self.model!r}) or one of your adapters.")
        if model == self.model:
            return ""
        try:
            self._adapters.registry.resolve(tenant, model)
        except NotFound:
            raise _ModelNotFound(f"the model {model!r} does not exist or you do not have "
                                 f"access to it; GET /v1/models lists yours.") from None
        return model

    async def embeddings(self, request: Request) -> JSONResponse:
        tenant = self._tenant(request)
        body = await self._json(request)
        model = body.get("model") if isinstance(body, dict) else None
        adapter_id = self._adapter_id(tenant, model)
        message, encoding = openai_embeddings.forward_request(body, adapter_id)
        async with self._servicer.forward_call(tenant, message, lambda: None) as (
                work, result, _):
            payload = openai_embeddings.response(
                [per_layer[0] for per_layer in result.tensors], list(work.sequences), model,
                encoding)
        return JSONResponse(payload, headers={"x-request-id": work.request_id})

    async def score(self, request: Request) -> JSONResponse:
        tenant = self._tenant(request)
        body = await self._json(request)
        model = body.get("model") if isinstance(body, dict) else None
        message = http_score.score_request(body, self._adapter_id(tenant, model))
        async with self._servicer.forward_call(tenant, message, lambda: None,
                                               parse_score_request) as (work, result, adapter):
            payload = http_score.response(
                score_response(work, result, self.model, adapter), model)
        return JSONResponse(payload, headers={"x-request-id": work.request_id})

    async def models(self, request: Request) -> JSONResponse:
        tenant = self._tenant(request)
        names = sorted({record.name for record in self._adapters.registry.list(tenant)})
        data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "gemma-serve"}]
        data += [{"id": name, "object": "model", "created": 0, "owned_by": tenant}
                 for name in names]
        return JSONResponse({"object": "list", "data": data})

    # ---- serving -------------------------------------------------------------------

    async def start(self, host: str, port: int, tls: dict | None = None) -> int:
        """Serves on (host, port) (0: a free port) in this event loop;
        returns the port. `tls`: uvicorn's ssl_certfile / ssl_keyfile /
        ssl_ca_certs (with ssl_cert_reqs) options."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # TCP named outright: asyncio sets TCP_NODELAY on accepted connections
        # only for a socket whose protocol says TCP, and without it every
        # response (headers and body written apart) waited ~40 ms for an ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
        # Clients keep their connections between bursts (uvicorn's 5 s would
        # make them reconnect).
        config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                lifespan="off", timeout_keep_alive=75, **(tls or {}))
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve([sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
            await asyncio.sleep(0.01)
        return sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._task


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: gemma-serve owns SIGTERM and
    SIGINT and stops this server itself, after draining."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def http_body_limit(config) -> int:
    """The largest body a valid request can have: every input at its
    longest, as JSON writes it (a character escaped as \\uXXXX takes six
    bytes, a token id up to eight with its separator), plus room for the
    rest of the object."""
    per_input = max(6 * config.max_text_bytes, 8 * config.worker.batching.max_sequence_length)
    return config.max_sequences_per_request * per_input + (64 << 10)


def tls_options(config) -> dict | None:
    """uvicorn's TLS options from a ServiceConfig (None: plaintext)."""
    if not config.tls_cert:
        return None
    options = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        options.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
