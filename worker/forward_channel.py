"""The coordinator's end of the forward channel to one worker.

One TCP connection per worker, opened with the token the worker handed out
over Ray, carrying groups of forward work and their outcomes (protocol in
forward_server.py). Many calls share it; each outcome frame names its call.
When the connection breaks every call waiting on it fails with
WorkerUnavailable (the pool then retries them elsewhere) and `on_lost` is
told, once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Callable

from worker.errors import WorkerUnavailable
from worker.frames import FrameError, encode_frame, read_frame

log = logging.getLogger("gemma_serve.worker_pool")

CONNECT_TIMEOUT_S = 10.0


class ForwardChannel:
    """Calls `BackboneWorker.forward_many` over a socket. Make with `open`."""

    def __init__(self, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, on_lost: Callable[[], None]):
        self.name = name
        self._reader, self._writer = reader, writer
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._broken: str | None = None  # why, once it is
        self._reading = asyncio.get_running_loop().create_task(self._read_forever())

    @classmethod
    async def open(cls, name: str, host: str, port: int, token: bytes,
                   on_lost: Callable[[], None]) -> "ForwardChannel":
        """Connects and authenticates; OSError / TimeoutError if it cannot."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                CONNECT_TIMEOUT_S)
        writer.write(token)
        return cls(name, reader, writer, on_lost)

    @property
    def usable(self) -> bool:
        return self._broken is None

    async def call(self, group: list) -> list:
        """One outcome per (ticket, work) pair of `group`, as forward_many
        returns them; WorkerUnavailable if the connection is or goes down."""
        if self._broken is not None:
            raise WorkerUnavailable(f"the forward channel to {self.name} is down: "
                                    f"{self._broken}")
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        try:
            self._writer.writelines(encode_frame(("call", call_id, group)))
            await self._writer.drain()
            return await future
        except ConnectionError as error:
            self._break(f"sending failed: {error}")
            raise WorkerUnavailable(f"the forward channel to {self.name} broke: "
                                    f"{error}") from error
        finally:
            self._waiting.pop(call_id, None)

    def cancel(self, tickets: list[int]) -> None:
        """Tells the worker to drop these tickets' rows not yet run; best
        effort (a lost connection cancels everything on the worker anyway)."""
        if self._broken is None:
            self._writer.writelines(encode_frame(("cancel", tickets)))

    async def _read_forever(self) -> None:
        try:
            while True:
                kind, call_id, outcomes = await read_frame(self._reader)
                if kind != "done":
                    raise FrameError(f"unknown message kind {kind!r}")
                future = self._waiting.get(call_id)
                if future is not None and not future.done():
                    future.set_result(outcomes)
        except asyncio.CancelledError:
            self._break("closed")
            raise
        except asyncio.IncompleteReadError:
            self._break("the worker closed the connection")
        except Exception as error:  # noqa: BLE001 - whatever it was, the stream is unusable
            self._break(f"{type(error).__name__}: {error}")

    def _break(self, why: str) -> None:
        if self._broken is not None:
            return
        self._broken = why
        self._writer.close()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WorkerUnavailable(
                    f"the forward channel to {self.name} broke ({why})"))
        if why != "closed":
            log.warning("forward channel to %s lost: %s", self.name, why)
            self._on_lost()

    def close(self) -> None:
        self._reading.cancel()
        self._break("closed")
