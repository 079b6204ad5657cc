"""The coordinator's end of the forward channel to one worker.

One TCP connection per worker, opened with the token the worker handed out
over Ray (both ends prove they hold it, channel_handshake.py), carrying
groups of forward work and their outcomes (protocol in forward_server.py).
Many calls share it; each outcome frame names its call. When the
connection breaks, every call waiting on it fails with ChannelBroken and
`on_lost` is told, once. Keepalive probes notice a peer that vanished
without closing (a lost node) within about a minute instead of the
kernel's quarter of an hour; the pool also watches the worker through Ray.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Callable

from worker.channel_handshake import prove_to_worker
from worker.errors import ChannelBroken
from worker.forward_work import Deliver
from worker.frames import FrameError, encode_frame, read_frame

log = logging.getLogger("gemma_serve.worker_pool")

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE = {"TCP_KEEPIDLE": 20, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 6}  # seconds, probes


def _keep_alive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _Call:
    """One call's answers as they arrive, in any order, a frame at a time."""

    _MISSING = object()

    def __init__(self, size: int, deliver: Deliver | None):
        self.outcomes = [self._MISSING] * size
        self.unanswered = size
        self.deliver = deliver
        self.done = asyncio.get_running_loop().create_future()
        if not size:
            self.done.set_result([])  # a worker sends nothing for an empty call

    def receive(self, answers: list) -> None:
        for index, outcome in answers:
            if not 0 <= index < len(self.outcomes):
                raise FrameError(f"an answer for request {index} of a call of "
                                 f"{len(self.outcomes)}")
            if self.outcomes[index] is not self._MISSING:
                continue  # a worker answers once; ignore an echo rather than miscount
            self.outcomes[index] = outcome
            self.unanswered -= 1
            if self.deliver is not None:
                try:
                    self.deliver(index, outcome)
                except Exception:  # noqa: BLE001 - one caller's bug must not break the channel
                    log.exception("delivering an answer failed")
        if not self.unanswered and not self.done.done():
            self.done.set_result(self.outcomes)


class ForwardChannel:
    """Calls `BackboneWorker.start_forward` over a socket. Make with `open`."""

    def __init__(self, name: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, on_lost: Callable[[], None]):
        self.name = name
        self._reader, self._writer = reader, writer
        self._on_lost = on_lost
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Call] = {}
        self._broken: str | None = None  # why, once it is
        self._reading = asyncio.get_running_loop().create_task(self._read_forever())

    @classmethod
    async def open(cls, name: str, host: str, port: int, token: bytes,
                   on_lost: Callable[[], None]) -> "ForwardChannel":
        """Connects and runs the handshake; OSError (HandshakeFailed among
        them) or TimeoutError if it cannot."""
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                CONNECT_TIMEOUT_S)
        try:
            _keep_alive(writer.get_extra_info("socket"))
            await prove_to_worker(reader, writer, token)
        except BaseException:
            writer.close()
            raise
        return cls(name, reader, writer, on_lost)

    @property
    def usable(self) -> bool:
        return self._broken is None

    async def call(self, group: list, deliver: Deliver | None = None) -> list:
        """One outcome per (ticket, work) pair of `group`, as forward_many
        returns them; ChannelBroken if the connection is or goes down before
        the last arrives. The worker answers requests as they finish:
        `deliver(index, outcome)`, if given, hears each as it arrives."""
        if self._broken is not None:
            raise ChannelBroken(f"the forward channel to {self.name} is down: {self._broken}")
        call_id = next(self._ids)
        call = self._waiting[call_id] = _Call(len(group), deliver)
        try:
            self._writer.writelines(encode_frame(("call", call_id, group)))
            await self._writer.drain()
            return await call.done
        except OSError as error:  # reset, unreachable, keepalive timeout
            self._break(f"{type(error).__name__}: {error}")
            raise ChannelBroken(f"the forward channel to {self.name} broke: "
                                f"{self._broken}") from error
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
                kind, call_id, answers = await read_frame(self._reader)
                if kind != "done":
                    raise FrameError(f"unknown message kind {kind!r}")
                call = self._waiting.get(call_id)
                if call is not None:
                    call.receive(answers)
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
        for call in self._waiting.values():
            if not call.done.done():
                call.done.set_exception(ChannelBroken(
                    f"the forward channel to {self.name} broke ({why})"))
        if why != "closed":
            log.warning("forward channel to %s lost: %s", self.name, why)
            self._on_lost()

    def close(self) -> None:
        """Closes it from this side: waiting calls fail, `on_lost` is not told."""
        self._reading.cancel()
        self._break("closed")
