"""The forward channel's two ends on a real loopback socket.

The worker's side runs plain async functions in place of
BackboneWorker.start_forward / cancel_forward (the real ones are covered
through the service in tests/serving)."""

import asyncio
import struct

import numpy as np
import pytest

from worker.channel_handshake import (NONCE_BYTES, PROOF_BYTES, TOKEN_BYTES, HandshakeFailed,
                                      prove_to_worker)
from worker.errors import ChannelBroken, DeadlineExpired, WorkerUnavailable
from worker.forward_channel import ForwardChannel
from worker.forward_server import ForwardServer
from worker.forward_work import ForwardResult, ForwardWork
from worker.frames import MAX_BUFFERS, FrameError, encode_frame, read_frame


def work(name, length=3):
    return ForwardWork(name, (np.arange(1, length + 1, dtype="int32"),), (1,))


class Handler:
    """Answers each request once the test releases it (or at once; a request
    named "later" waits for `release_later`); a request named "fail" gets
    DeadlineExpired; records groups and cancels; counts requests running."""

    def __init__(self, hold=False):
        self.groups, self.cancelled, self.hold = [], [], hold
        self.release, self.release_later = asyncio.Event(), asyncio.Event()
        self.running = 0

    def start_group(self, group):
        self.groups.append(group)
        return [asyncio.ensure_future(self._one(ticket, w)) for ticket, w in group]

    async def _one(self, ticket, w):
        if w.request_id == "unsendable":
            return ForwardResult("w", [[lambda: None]])  # pickle refuses a lambda
        self.running += 1
        try:
            if self.hold:
                await self.release.wait()
            if w.request_id == "later":
                await self.release_later.wait()
        finally:
            self.running -= 1
        if w.request_id == "fail":
            return DeadlineExpired(w.request_id)
        return ForwardResult("w", [[np.full((len(w.sequences[0]), 4), ticket, "float32")]])

    async def cancel(self, tickets):
        self.cancelled += tickets


async def serve(handler):
    server = ForwardServer(handler.start_group, handler.cancel)
    host, port = await server.start("127.0.0.1")
    return server, host, port


async def connected(handler):
    """(server, channel, lost): a server for `handler`, a channel to it, and
    the list `on_lost` appends to."""
    server, host, port = await serve(handler)
    lost = []
    channel = await ForwardChannel.open("w0", host, port, server.token,
                                        on_lost=lambda: lost.append(1))
    return server, channel, lost


async def until(condition, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_frames_round_trip_arrays_out_of_band():
    async def main():
        big = np.random.default_rng(0).standard_normal((1024, 2048)).astype("float32")  # 8 MiB
        message = ("done", 7, [ForwardResult("w", [[big, big[:, :3]]]), ValueError("x")])
        parts = encode_frame(message)
        assert sum(memoryview(p).nbytes for p in parts) < big.nbytes + 64 * 1024
        reader = asyncio.StreamReader()
        for part in parts:
            reader.feed_data(bytes(part))
        kind, call_id, outcomes = await read_frame(reader)
        assert (kind, call_id) == ("done", 7)
        got = outcomes[0].tensors[0]
        np.testing.assert_array_equal(got[0], big)
        np.testing.assert_array_equal(got[1], big[:, :3])  # not contiguous: in band
        assert isinstance(outcomes[1], ValueError) and str(outcomes[1]) == "x"
    asyncio.run(main())


def test_malformed_frames_are_refused_before_allocation():
    async def main():
        too_many = asyncio.StreamReader()
        too_many.feed_data(struct.pack("<I", MAX_BUFFERS + 1))
        with pytest.raises(FrameError, match="buffers"):
            await read_frame(too_many)

        huge = asyncio.StreamReader()
        huge.feed_data(struct.pack("<IQ", 0, 1 << 50))
        with pytest.raises(FrameError, match="bytes"):
            await read_frame(huge)

        cut = asyncio.StreamReader()
        cut.feed_data(b"".join(bytes(p) for p in encode_frame(("x", 1)))[:-2])
        cut.feed_eof()
        with pytest.raises(FrameError, match="closed"):
            await read_frame(cut)

        garbage = asyncio.StreamReader()
        garbage.feed_data(struct.pack("<IQ", 0, 5) + b"\x80\x05junk")
        with pytest.raises(FrameError, match="unpickle"):
            await read_frame(garbage)
    asyncio.run(main())


def test_calls_share_one_connection_and_get_their_own_outcomes():
    async def main():
        handler = Handler()
        server, channel, _ = await connected(handler)
        groups = [[(10 * i + j, work(f"r{i}{j}", length=i + j + 1)) for j in range(3)]
                  for i in range(8)]
        outcomes = await asyncio.gather(*(channel.call(g) for g in groups))
        for group, results in zip(groups, outcomes):
            for (ticket, w), result in zip(group, results):
                tensor = result.tensors[0][0]
                assert tensor.shape == (len(w.sequences[0]), 4) and (tensor == ticket).all()
        failed = await channel.call([(99, work("fail"))])
        assert isinstance(failed[0], DeadlineExpired)
        channel.cancel([3, 4])
        await until(lambda: handler.cancelled == [3, 4])
        channel.close()
        await server.close()
    asyncio.run(main())


def test_each_request_is_answered_when_it_finishes_not_with_its_call():
    # A call whose rows the batcher split over two batches: the first
    # batch's answers must not wait for the second.
    async def main():
        handler = Handler()
        server, channel, _ = await connected(handler)
        heard = []
        call = asyncio.ensure_future(channel.call(
            [(1, work("now")), (2, work("later")), (3, work("now too"))],
            deliver=lambda index, outcome: heard.append(index)))
        await until(lambda: sorted(heard) == [0, 2])
        assert not call.done() and handler.running == 1
        handler.release_later.set()
        outcomes = await call
        assert heard[-1] == 1 and sorted(heard) == [0, 1, 2]
        assert [int(o.tensors[0][0][0, 0]) for o in outcomes] == [1, 2, 3]
        channel.close()
        await server.close()
    asyncio.run(main())


def test_a_broken_channel_keeps_the_answers_already_given():
    async def main():
        handler = Handler()
        server, channel, _ = await connected(handler)
        heard = {}
        call = asyncio.ensure_future(channel.call(
            [(1, work("now")), (2, work("later"))],
            deliver=lambda index, outcome: heard.setdefault(index, outcome)))
        await until(lambda: 0 in heard)
        await server.close()
        with pytest.raises(ChannelBroken):
            await call
        assert list(heard) == [0] and (heard[0].tensors[0][0] == 1).all()
        await until(lambda: handler.running == 0)  # the unanswered one was stopped
    asyncio.run(main())


def test_a_coordinator_without_the_token_gets_nothing_run():
    async def main():
        handler = Handler()
        server, host, port = await serve(handler)
        with pytest.raises(HandshakeFailed):
            await ForwardChannel.open("w0", host, port, b"\0" * TOKEN_BYTES,
                                      on_lost=lambda: None)
        # By hand: a peer that answers the worker's proof with garbage and
        # sends a call anyway is cut off before the frame is read.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"n" * NONCE_BYTES)
        await reader.readexactly(PROOF_BYTES + NONCE_BYTES)
        writer.write(b"p" * PROOF_BYTES)
        writer.writelines(encode_frame(("call", 1, [(1, work("sneaky"))])))
        assert await reader.read() == b""  # closed by the worker
        writer.close()
        assert handler.groups == [] and server.calls == 0
        await server.close()
    asyncio.run(main())


def test_a_listener_without_the_token_is_not_believed():
    async def impostor(reader, writer):  # answers the handshake, then sends a frame
        await reader.readexactly(NONCE_BYTES)
        writer.write(b"x" * (PROOF_BYTES + NONCE_BYTES))
        writer.writelines(encode_frame(("done", 1, ["from an impostor"])))

    async def main():
        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        with pytest.raises(HandshakeFailed, match="not the worker"):
            await prove_to_worker(reader, writer, b"t" * TOKEN_BYTES)
        writer.close()
        server.close()
    asyncio.run(main())


def test_a_result_that_cannot_be_sent_still_gets_an_answer():
    async def main():
        handler = Handler()
        server, channel, _ = await connected(handler)
        (outcome,) = await asyncio.wait_for(channel.call([(1, work("unsendable"))]), 10)
        assert isinstance(outcome, RuntimeError) and "could not answer" in str(outcome)
        assert channel.usable  # and the channel goes on
        (ok,) = await channel.call([(2, work("fine"))])
        assert (ok.tensors[0][0] == 2).all()
        # In one frame with a good answer: only the bad one becomes an error.
        bad, good = await channel.call([(3, work("unsendable")), (4, work("fine"))])
        assert isinstance(bad, RuntimeError) and (good.tensors[0][0] == 4).all()
        channel.close()
        await server.close()
    asyncio.run(main())


def test_a_lost_worker_fails_waiting_calls_and_tells_once():
    async def main():
        handler = Handler(hold=True)
        server, channel, lost = await connected(handler)
        calls = [asyncio.ensure_future(channel.call([(i, work(str(i)))])) for i in range(3)]
        await until(lambda: handler.running == 3)
        await server.close()  # the worker going away: its sockets close
        results = await asyncio.gather(*calls, return_exceptions=True)
        # ChannelBroken: a WorkerUnavailable the pool may retry on the same worker
        assert all(isinstance(r, ChannelBroken) for r in results), results
        assert issubclass(ChannelBroken, WorkerUnavailable)
        assert lost == [1] and not channel.usable
        with pytest.raises(ChannelBroken, match="down"):
            await channel.call([(9, work("late"))])
        await until(lambda: handler.running == 0)  # its calls were cancelled on the worker
    asyncio.run(main())


def test_closing_the_channel_cancels_the_workers_calls_without_calling_it_lost():
    async def main():
        handler = Handler(hold=True)
        server, channel, lost = await connected(handler)
        call = asyncio.ensure_future(channel.call([(1, work("a"))]))
        await until(lambda: handler.running == 1)
        channel.close()
        with pytest.raises(WorkerUnavailable):
            await call
        await until(lambda: handler.running == 0)  # nobody reads it: the worker stops it
        assert lost == []
        await server.close()
    asyncio.run(main())
