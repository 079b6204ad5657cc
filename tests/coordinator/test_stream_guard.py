"""Stream bounds on their own: upload slots per tenant, idle and total
timeouts of client streams, bounded writes of response streams."""

import asyncio
import time

import pytest

from coordinator.errors import DeadlineExceeded, ResourceExhausted
from coordinator.stream_guard import (ResponseWatch, StreamLimits, UploadGuard,
                                      receive_to_file)


async def trickle(count, every_s):
    for index in range(count):
        await asyncio.sleep(every_s)
        yield index


async def read_all(guard, tenant, messages):
    with guard.upload(tenant, messages) as bounded:
        return [message async for message in bounded]


def test_uploads_are_capped_per_tenant_and_slots_come_back():
    async def main():
        guard = UploadGuard(StreamLimits(max_uploads_per_tenant=2))
        with guard.upload("acme", trickle(0, 0)), guard.upload("acme", trickle(0, 0)):
            with pytest.raises(ResourceExhausted, match="2 uploads in progress.*"
                                                        "--tenant-max-uploads 2") as caught:
                with guard.upload("acme", trickle(0, 0)):
                    pass
            assert caught.value.retry_after_ms == 1000
            assert await read_all(guard, "globex", trickle(2, 0)) == [0, 1]  # not affected
        with pytest.raises(ValueError):  # a failed upload gives its slot back too
            with guard.upload("acme", trickle(0, 0)):
                raise ValueError
        assert guard.open_uploads("acme") == 0
    asyncio.run(main())


def test_an_idle_upload_ends_deadline_exceeded():
    async def main():
        guard = UploadGuard(StreamLimits(idle_timeout_s=0.2))
        assert await read_all(guard, "acme", trickle(3, 0.05)) == [0, 1, 2]
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no message came for 0.2 s "
                                                   r"\(--stream-idle-timeout-s\)"):
            await read_all(guard, "acme", trickle(3, 5.0))
        assert time.monotonic() - started < 2
        assert guard.open_uploads("acme") == 0
    asyncio.run(main())


def test_a_trickling_upload_ends_at_its_time_limit():
    async def main():
        guard = UploadGuard(StreamLimits(idle_timeout_s=1.0, upload_timeout_s=0.3))
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"longer than 0.3 s \(--upload-timeout-s\)"):
            await read_all(guard, "acme", trickle(100, 0.05))  # never idle for a second
        assert time.monotonic() - started < 2
    asyncio.run(main())


def test_receive_to_file_stops_at_the_size_cap(tmp_path):
    async def chunks():
        for _ in range(10):
            yield b"x" * 100

    async def main():
        assert await receive_to_file(chunks(), tmp_path / "whole", 1000, "too big") == 1000
        with pytest.raises(ResourceExhausted, match="too big"):
            await receive_to_file(chunks(), tmp_path / "cut", 999, "too big")
    asyncio.run(main())
    assert (tmp_path / "whole").stat().st_size == 1000


class StuckContext:
    """A response stream whose client never takes a message."""

    def __init__(self):
        self.written = []

    async def write(self, message):
        if self.written:
            await asyncio.Event().wait()  # flow control: never
        self.written.append(message)


async def respond(context, messages, timeout_s, pause_s=0.0):
    async with ResponseWatch(timeout_s) as watch:
        for message in messages:
            await asyncio.sleep(pause_s)
            await watch.write(context, message)


def test_a_write_the_client_does_not_take_ends_deadline_exceeded():
    async def main():
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="took no message for 0.2 s"):
            await respond(StuckContext(), ["first", "second"], 0.2, pause_s=0.1)
        # The write began at 0.1 s; it is given up 0.2 s later.
        assert 0.25 < time.monotonic() - started < 1.5
        assert not asyncio.current_task().cancelling()
    asyncio.run(main())


class TakingContext:
    def __init__(self):
        self.written = []

    async def write(self, message):
        await asyncio.sleep(0)
        self.written.append(message)


def test_a_stream_may_be_quiet_between_writes_and_cancels_stay_cancels():
    async def main():
        context = TakingContext()
        await respond(context, ["a", "b", "c"], 0.1, pause_s=0.25)  # quiet, not stuck
        assert context.written == ["a", "b", "c"]
        task = asyncio.create_task(respond(StuckContext(), ["first", "second"], 5.0))
        await asyncio.sleep(0.1)
        task.cancel()  # the client went away: CANCELLED, not a deadline
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())


def test_limits_are_checked():
    for bad in (dict(idle_timeout_s=0), dict(upload_timeout_s=-1),
                dict(max_uploads_per_tenant=0)):
        with pytest.raises(ValueError):
            StreamLimits(**bad)


class ClosingContext:
    """A stuck write whose cancellation comes out as another error (as a
    generator's cleanup may turn it)."""

    async def write(self, message):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("the stream was closed") from None


def test_an_expired_watch_undoes_its_cancel_whatever_error_ends_the_block():
    async def main():
        with pytest.raises(DeadlineExceeded, match="took no message for 0.1 s") as caught:
            async with ResponseWatch(0.1) as watch:
                await watch.write(ClosingContext(), "first")
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert asyncio.current_task().cancelling() == 0  # nothing left pending
        async with asyncio.timeout(0.05):  # timeouts after it still work as timeouts
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)

        async def swallowing():  # the cancel swallowed, the block ends normally
            context = StuckContext()
            async with ResponseWatch(0.1) as watch:
                try:
                    await watch.write(context, "one")
                    await watch.write(context, "two")  # stuck
                except asyncio.CancelledError:
                    pass
        await swallowing()
        assert asyncio.current_task().cancelling() == 0
    asyncio.run(main())


def test_data_chunks_yields_the_data_and_refuses_a_second_header():
    from coordinator.errors import InvalidArgument
    from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
    from coordinator.stream_guard import data_chunks

    async def messages(*items):
        for item in items:
            yield item

    async def main():
        data = [fpb.UploadDatasetRequest(data=b"ab"), fpb.UploadDatasetRequest(data=b"c")]
        assert [c async for c in data_chunks(messages(*data), "name")] == [b"ab", b"c"]
        with pytest.raises(InvalidArgument, match="name: send the name once, first"):
            [c async for c in data_chunks(messages(data[0], fpb.UploadDatasetRequest(
                name="again")), "name")]
    asyncio.run(main())
