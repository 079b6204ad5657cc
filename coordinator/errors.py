"""Errors a request can end with, each carrying its gRPC status code."""

import errno

import grpc

# What a write gets from a full disk, or from a full disk quota.
_STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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


class StorageFull(ResourceExhausted):
    """The server's disk (or its disk quota) is full: nothing was stored."""

    def __init__(self):
        super().__init__(
            "the server's storage is full, so nothing was stored; delete adapters or "
            "datasets you no longer need (DeleteAdapter, DeleteDataset) and retry, or ask "
            "the server's operator to free or add space.")


def is_storage_full(error: BaseException) -> bool:
    """Whether `error` is a write refused for want of space (ENOSPC, EDQUOT)."""
    return isinstance(error, OSError) and error.errno in _STORAGE_FULL_ERRNOS


class DeadlineExceeded(ServiceError):
    """A bound on the call's time ran out (a stream idle too long, an upload
    past its time limit); the message says which."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    """The server cannot take calls now (shutting down); retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    """No API key, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The request names something the server must not read for it (a path
    outside the directory the operator allowed, or one leading out of it)."""

    code = grpc.StatusCode.PERMISSION_DENIED
