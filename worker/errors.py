"""Failures a worker reports; the coordinator maps each to a status code."""

import copy


class WorkerError(Exception):
    """Base of errors raised by workers."""


class DeadlineExpired(WorkerError):
    """The request's deadline passed before its rows were computed."""


class WorkerUnavailable(WorkerError):
    """No worker could take the request (dead, restarting, or none ready)."""


class SlotsNotWritten(WorkerUnavailable):
    """A batch read adapter slots this worker process has not written (it
    restarted and its scheduler has not written them back yet); retried
    on another worker."""


class AdapterSlotsBusy(WorkerError):
    """Every adapter slot stayed pinned by other adapters' rows until the
    request's deadline."""


class AdapterRejected(WorkerError):
    """An adapter cannot be loaded into this worker's slots (e.g. its rank is
    above the slots' maximum)."""


class FineTuneFailed(WorkerError):
    """A fine-tune job stopped with an error (the message says which)."""


class PoolSaturated(WorkerError):
    """Every worker's queue is at its bound; the caller should back off."""

    retry_after_ms = 100


def own_copy(error: BaseException) -> BaseException:
    """A copy of `error` for one of several requests failed by it, so their
    tracebacks do not pile up on one shared object; its cause and context
    are kept (the original where it cannot be copied)."""
    try:
        copied = copy.copy(error)
    except Exception:  # noqa: BLE001
        return error
    copied.__cause__, copied.__context__ = error.__cause__, error.__context__
    return copied
