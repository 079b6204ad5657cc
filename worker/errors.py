"""Failures a worker reports; the coordinator maps each to a status code."""


class WorkerError(Exception):
    """Base of errors raised by workers."""


class DeadlineExpired(WorkerError):
    """The request's deadline passed before its rows were computed."""


class WorkerUnavailable(WorkerError):
    """No worker could take the request (dead, restarting, or none ready)."""


class AdapterSlotsBusy(WorkerError):
    """Every adapter slot is pinned by running requests with other adapters."""


class AdapterRejected(WorkerError):
    """An adapter cannot be loaded into this worker's slots (e.g. its rank is
    above the slots' maximum)."""


class FineTuneFailed(WorkerError):
    """A fine-tune job stopped with an error (the message says which)."""


class PoolSaturated(WorkerError):
    """Every worker's queue is at its bound; the caller should back off."""

    retry_after_ms = 100
