"""The worker's end of the forward channel: a socket beside the Ray actor.

A Ray actor call costs about 1.4 ms of latency and 1.6 ms of CPU across
both processes on the 2-core CI machine, whatever it carries; a frame on a
socket the coordinator keeps open costs about 0.2 ms of each (measured in
the same script). So forward work, the one call made per request, travels
here; everything else (placement, restarts, adapter payloads, fine-tuning,
info) stays on Ray.

The protocol, one frame each way per group (see frames.py):

    coordinator -> worker   ("call", call_id, [(ticket, ForwardWork), ...])
                            ("cancel", [ticket, ...])
    worker -> coordinator   ("done", call_id, [ForwardResult | exception, ...])

A connection must first send the worker's token (32 random bytes the
coordinator got over Ray); anything else is dropped before a byte of it is
unpickled. When a connection closes, its calls still running are cancelled.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from typing import Awaitable, Callable

from worker.frames import FrameError, read_frame, write_frame

log = logging.getLogger("gemma_serve.worker")

TOKEN_BYTES = 32
HELLO_TIMEOUT_S = 10.0  # a connection that does not authenticate by then is dropped

RunGroup = Callable[[list], Awaitable[list]]   # BackboneWorker.forward_many
CancelTickets = Callable[[list], Awaitable[None]]


class ForwardServer:
    """Serves `run_group` and `cancel` to authenticated connections.

    Args:
        run_group: runs a group of (ticket, work) pairs; returns one outcome
            (result or exception) per pair, picklable.
        cancel: drops the named tickets' rows not yet run.
    """

    def __init__(self, run_group: RunGroup, cancel: CancelTickets):
        self._run_group = run_group
        self._cancel = cancel
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None

    async def start(self, host: str) -> tuple[str, int]:
        """Listens on `host` (the node's address), a free port; idempotent."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, host, 0)
            self.address = (host, self._server.sockets[0].getsockname()[1])
        return self.address

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        calls: set[asyncio.Task] = set()
        self._connections.add(writer)
        try:
            try:
                hello = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), HELLO_TIMEOUT_S)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                log.warning("forward channel from %s: no token; closed", peer)
                return
            if not hmac.compare_digest(hello, self.token):
                log.warning("forward channel from %s: wrong token; closed", peer)
                return
            lock = asyncio.Lock()  # one frame at a time on the socket
            while True:
                try:
                    message = await read_frame(reader)
                except asyncio.IncompleteReadError:
                    return  # the coordinator closed between frames
                kind = message[0]
                if kind == "call":
                    task = asyncio.ensure_future(self._answer(message[1], message[2],
                                                              writer, lock))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                elif kind == "cancel":
                    await self._cancel(message[1])
                else:
                    raise FrameError(f"unknown message kind {kind!r}")
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a broken or foreign stream: drop it
            log.warning("forward channel from %s broke: %s: %s", peer, type(error).__name__,
                        error)
        finally:
            for task in calls:  # nobody is left to read their results
                task.cancel()
            self._connections.discard(writer)
            writer.close()

    async def _answer(self, call_id: int, group: list, writer: asyncio.StreamWriter,
                      lock: asyncio.Lock) -> None:
        outcomes = await self._run_group(group)
        async with lock:
            try:
                await write_frame(writer, ("done", call_id, outcomes))
            except ConnectionError:
                pass  # the reader side notices and cleans up

    async def close(self) -> None:
        """Stops listening and closes every connection (their calls are
        cancelled, their coordinators told by the closed socket)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
