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

