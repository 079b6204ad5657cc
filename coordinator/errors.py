"""Errors a request can end with, each carrying its gRPC status code."""

import grpc


class ServiceError(Exception):
    """An error whose message the client sees, with its status code."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """The request itself is wrong; `field` names the part to fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    """The request is well formed but the server's state refuses it (an
    adapter made for another base model, one that is corrupt on disk)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """A quota or capacity limit was reached; the message says which.
    `retry_after_ms`, when set, is sent as `grpc-retry-pushback-ms`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_ms: int | None = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(ServiceError):
    """The server cannot take calls now (shutting down); retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class AlreadyExists(ServiceError):
    """The thing the request would create is already there."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(ServiceError):
    """No API key, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED
