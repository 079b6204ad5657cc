"""Failures a worker reports; the coordinator maps each to a status code."""


class WorkerError(Exception):
    """Base of errors raised by workers."""


class DeadlineExpired(WorkerError):
    """The request's deadline passed before its rows were computed."""


class WorkerUnavailable(WorkerError):
    """No worker could take the request (dead, restarting, or none ready)."""
