"""Bounds on streams, so that a client that stops sending or reading holds
nothing for long.

- A client stream (an upload) must bring each message within
  `idle_timeout_s` and end within `upload_timeout_s`; a tenant has at most
  `max_uploads_per_tenant` uploads open at once. Beyond: DEADLINE_EXCEEDED,
  or RESOURCE_EXHAUSTED with a retry hint.
- A response stream's client must take each message within
  `idle_timeout_s` (HTTP/2 flow control holds a write until it does), else
  the call ends DEADLINE_EXCEEDED and its handler is closed, releasing its
  admission and results. The status reaches the client after the messages
  already sent, whenever it reads them; until it reads or disconnects, gRPC
  keeps the one message in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import AsyncIterator, Iterator, TypeVar

from coordinator.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted

T = TypeVar("T")

# The retry hint of a refused upload: uploads take seconds, not milliseconds.
UPLOAD_RETRY_AFTER_MS = 1000


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """How long streams may idle or run, and how many uploads a tenant may
    have open.

    Attributes:
        idle_timeout_s: most seconds between two messages of an upload, and
            most seconds a response message may wait for its client to take it.
        upload_timeout_s: most seconds one upload may take, start to end.
        max_uploads_per_tenant: adapter and dataset uploads a tenant may have
            open at once (receiving, being checked or stored; one the client
            cancelled until the work it started in a thread has ended).
    """

    idle_timeout_s: float = 30.0
    upload_timeout_s: float = 600.0
    max_uploads_per_tenant: int = 2

    def __post_init__(self) -> None:
        if not (self.idle_timeout_s > 0 and self.upload_timeout_s > 0):
            raise ValueError("stream timeouts must be positive.")
        if self.max_uploads_per_tenant < 1:
            raise ValueError("max_uploads_per_tenant must be at least 1.")


class UploadGuard:
    """The upload slots of every tenant, and the time bounds on uploads.
    One per server, shared by every upload method; used on the event loop."""

    def __init__(self, limits: StreamLimits):
        self.limits = limits
        self._open: collections.Counter[str] = collections.Counter()

    def open_uploads(self, tenant: str) -> int:
        return self._open[tenant]

    @contextlib.contextmanager
    def upload(self, tenant: str, messages: AsyncIterator[T]) -> Iterator[AsyncIterator[T]]:
        """Holds one of `tenant`'s upload slots for the block and gives
        `messages` bounded in time.

        Raises:
            ResourceExhausted: the tenant has its limit of uploads open.
            DeadlineExceeded: (from the messages) one came too late.
        """
        limit = self.limits.max_uploads_per_tenant
        if self._open[tenant] >= limit:
            raise ResourceExhausted(
                f"this tenant already has {self._open[tenant]} uploads in progress, the "
                f"limit (--tenant-max-uploads {limit}); retry when one has finished.",
                retry_after_ms=UPLOAD_RETRY_AFTER_MS)
        self._open[tenant] += 1
        try:
            yield self._bounded(messages)
        finally:
            self._open[tenant] -= 1
            if not self._open[tenant]:
                del self._open[tenant]

    async def _bounded(self, messages: AsyncIterator[T]) -> AsyncIterator[T]:
        idle, total = self.limits.idle_timeout_s, self.limits.upload_timeout_s
        ends = time.monotonic() + total
        iterator = aiter(messages)
        while True:
            wait = min(idle, ends - time.monotonic())
            try:
                async with asyncio.timeout(wait):
                    message = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no message came for {idle:g} s (--stream-idle-timeout-s); the upload "
                    "was dropped. Send the data without pauses, then close the stream."
                    if wait == idle else
                    f"the upload took longer than {total:g} s (--upload-timeout-s) and was "
                    "dropped.") from None
            yield message


async def data_chunks(messages: AsyncIterator, first_field: str) -> AsyncIterator[bytes]:
    """The `data` of an upload's messages after its first, which carried
    `first_field` (the `kind` oneof of UploadAdapter and UploadDataset).

    Raises:
        InvalidArgument: a later message carries `first_field` again.
    """
    async for message in messages:
        if message.WhichOneof("kind") != "data":
            raise InvalidArgument(first_field, f"send the {first_field} once, first.")
        yield message.data


async def receive_to_file(chunks: AsyncIterator[bytes], path: Path, max_bytes: int,
                          too_large: str) -> int:
    """Writes `chunks` into a new file at `path` (the caller removes it);
    returns how many bytes came.

    Raises:
        ResourceExhausted: with message `too_large`, past `max_bytes`.
    """
    size = 0
    with open(path, "xb") as handle:
        async for chunk in chunks:
            size += len(chunk)
            if size > max_bytes:
                raise ResourceExhausted(too_large)
            handle.write(chunk)
    return size


class ResponseWatch:
    """Ends a response stream whose client takes no message for `timeout_s`
    (None: never). Used as `async with` around the stream's writes, in the
    call's own task.

    One timer per stream, re-armed when it fires, not one per message
    (arming and cancelling a timer costs a good part of what sending a small
    message does): each write notes when it began; if the timer finds a
    write that has waited `timeout_s`, it cancels the task, and the block
    turns that cancellation into DeadlineExceeded. A stream may be quiet
    between writes for as long as it likes (WatchFineTune is).

    Example:
        async with ResponseWatch(30.0) as watch:
            for message in messages:
                await watch.write(context, message)
    """

    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self._writing_since: float | None = None
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    async def __aenter__(self) -> "ResponseWatch":
        if self.timeout_s is not None:
            self._task = asyncio.current_task()
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._check)
        return self

    def _check(self) -> None:
        since, now = self._writing_since, time.monotonic()
        if since is not None and now - since >= self.timeout_s:
            self._expired = True
            self._task.cancel()
            return
        wait = self.timeout_s if since is None else since + self.timeout_s - now
        self._timer = asyncio.get_running_loop().call_later(wait, self._check)

    async def write(self, context, message) -> None:
        """Sends one message of the stream."""
        self._writing_since = time.monotonic()
        await context.write(message)
        self._writing_since = None

    async def __aexit__(self, kind, error, traceback) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        if not self._expired:
            return False
        # Our cancel request is undone however the block ended: its
        # CancelledError may have been turned into another error on the way
        # out (a generator's cleanup), or swallowed. Left counted, the task
        # would look cancelled to every asyncio.timeout and TaskGroup after.
        self._task.uncancel()
        if kind is None:
            return False
        raise DeadlineExceeded(
            f"the client took no message for {self.timeout_s:g} s "
            "(--stream-idle-timeout-s), so the call was ended and its results dropped; "
            "read responses as they arrive.") from (
                None if issubclass(kind, asyncio.CancelledError) else error)
