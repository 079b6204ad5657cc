"""The worker's end of the forward channel: a socket beside the Ray actor.

A Ray actor call costs about 1.4 ms of latency and 1.6 ms of CPU across
both processes on the 2-core CI machine, whatever it carries; a frame on a
socket the coordinator keeps open costs about 0.2 ms of each (measured in
the same script). So forward work, the one call made per request, travels
here; everything else (placement, restarts, adapter payloads, fine-tuning,
info, and results too large for one frame) stays on Ray.

The protocol, after the handshake (channel_handshake.py), in frames
(frames.py):

    coordinator -> worker   ("call", call_id, [(ticket, ForwardWork), ...])
                            ("cancel", [ticket, ...])
    worker -> coordinator   ("done", call_id, [(index, ForwardResult | exception), ...])

A call's requests are answered as they finish, those finishing together (one
batch) in one "done" frame, `index` their place in the call: a call whose
rows the batcher split over two batches does not hold the first batch's
answers back for a whole second batch (which kept 16 closed-loop clients
out of step: a third of the calls split, batches of 1 to 4 rows among the 8s).
Every request of every call gets its answer, whatever fails on the way; when
a connection closes, its requests still running are cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Awaitable, Callable

from worker.channel_handshake import HandshakeFailed, new_token, prove_to_coordinator
from worker.frames import FrameError, encode_frame, read_frame

log = logging.getLogger("gemma_serve.worker")

StartGroup = Callable[[list], list[asyncio.Future]]   # BackboneWorker.start_forward
CancelTickets = Callable[[list], Awaitable[None]]


class ForwardServer:
    """Serves `start_group` and `cancel` to connections that pass the
    handshake.

    Args:
        start_group: starts a group of (ticket, work) pairs; returns a future
            per pair whose result is its outcome (result or exception),
            picklable; cancelling a future stops its work.
        cancel: drops the named tickets' rows not yet run.
    """

    def __init__(self, start_group: StartGroup, cancel: CancelTickets):
        self._start_group = start_group
        self._cancel = cancel
        self.token = new_token()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.address: tuple[str, int] | None = None
        self.calls = 0  # groups received over the channel

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
            await prove_to_coordinator(reader, writer, self.token)
            while True:
                try:
                    message = await read_frame(reader)
                except asyncio.IncompleteReadError:
                    return  # the coordinator closed between frames
                kind = message[0]
                if kind == "call":
                    self.calls += 1
                    task = asyncio.ensure_future(self._answer(message[1], message[2], writer))
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                elif kind == "cancel":
                    await self._cancel(message[1])
                else:
                    raise FrameError(f"unknown message kind {kind!r}")
        except asyncio.CancelledError:
            raise
        except HandshakeFailed as error:
            log.warning("forward channel from %s refused: %s", peer, error)
        except Exception as error:  # noqa: BLE001 - a broken or foreign stream: drop it
            log.warning("forward channel from %s broke: %s: %s", peer, type(error).__name__,
                        error)
        finally:
            for task in calls:  # nobody is left to read their results
                task.cancel()
            self._connections.discard(writer)
            writer.close()

    async def _answer(self, call_id: int, group: list, writer: asyncio.StreamWriter) -> None:
        try:
            futures = self._start_group(group)
        except Exception as error:  # noqa: BLE001 - the caller must hear back either way
            log.error("forward call %d could not start", call_id, exc_info=error)
            await self._send(writer, call_id, [(i, error) for i in range(len(group))])
            return
        finished: list[tuple[int, object]] = []
        some_finished = asyncio.Event()

        def on_done(index: int, future: asyncio.Future) -> None:
            finished.append((index, _outcome(future)))
            some_finished.set()

        for index, future in enumerate(futures):
            future.add_done_callback(functools.partial(on_done, index))
        unanswered = len(futures)
        try:
            while unanswered:
                # Whatever finished in the same turns of the loop (a batch's
                # requests) goes in one frame.
                await some_finished.wait()
                some_finished.clear()
                ready, finished[:] = finished[:], []
                unanswered -= len(ready)
                await self._send(writer, call_id, ready)
        except asyncio.CancelledError:
            for future in futures:  # nobody is left to read them
                future.cancel()
            raise

    async def _send(self, writer: asyncio.StreamWriter, call_id: int, outcomes: list) -> None:
        try:
            parts = encode_frame(("done", call_id, outcomes))
        except Exception:  # noqa: BLE001 - e.g. a result that does not pickle
            # Only the answers that do not encode become errors.
            parts = encode_frame(("done", call_id,
                                  [(i, _encodable(call_id, outcome)) for i, outcome in outcomes]))
        try:
            # One writelines per frame: frames never interleave on the socket.
            writer.writelines(parts)
            await writer.drain()
        except OSError:
            writer.close()  # the connection is gone: the coordinator sees it broken

    async def close(self) -> None:
        """Stops listening and closes every connection (their calls are
        cancelled, their coordinators told by the closed socket)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()


def _outcome(future: asyncio.Future):
    """What a finished future sends back: its result, or what stopped it."""
    if future.cancelled():
        return asyncio.CancelledError()
    error = future.exception()
    return error if error is not None else future.result()


def _encodable(call_id: int, outcome):
    """`outcome`, or an error saying why it could not be sent."""
    try:
        encode_frame(outcome)
        return outcome
    except Exception as error:  # noqa: BLE001
        log.error("forward call %d: an answer that could not be sent", call_id, exc_info=error)
        return RuntimeError(f"the worker could not answer: {type(error).__name__}: {error}")
