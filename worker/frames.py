"""Length-prefixed pickle frames over asyncio streams, for the forward channel.

A frame is one Python object pickled with protocol 5; the buffers of
contiguous numpy arrays travel out of band, beside the pickle rather than
copied into it, and each array read back wraps the bytes it arrived in
(bfloat16 arrays, whose buffer numpy cannot export, go in band). The pool
keeps frames small (results over a few MiB go over Ray instead), so the
copies the transport makes on the way cost little.

    u32 n                      number of out-of-band buffers
    u64 size[0] .. size[n]     the pickle's size, then each buffer's
    pickle bytes, buffer 1 .. buffer n

Pickle runs code on load, so frames are only read from a peer that has
proven it holds the channel's token (channel_handshake.py); a frame's sizes
are checked before its parts are read.
"""

from __future__ import annotations

import asyncio
import pickle
import struct

_COUNT = struct.Struct("<I")
MAX_BUFFERS = 1 << 16          # arrays in one frame; a group carries a few per request
MAX_FRAME_BYTES = 1 << 30      # far above any frame the pool sends; a corrupt size fails here


class FrameError(ConnectionError):
    """The stream does not hold a well-formed frame (the peer is not ours, or
    the connection broke mid-frame)."""


def encode_frame(obj) -> list:
    """The frame's parts, ready for `StreamWriter.writelines` (the buffers
    are views of the objects' memory, not copies)."""
    buffers: list[pickle.PickleBuffer] = []
    body = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    sizes = struct.pack(f"<{len(views) + 1}Q", len(body), *(view.nbytes for view in views))
    return [_COUNT.pack(len(views)), sizes, body, *views]


async def read_frame(reader: asyncio.StreamReader):
    """The next frame's object; FrameError on a malformed frame,
    asyncio.IncompleteReadError when the peer closed between frames."""
    (count,) = _COUNT.unpack(await reader.readexactly(_COUNT.size))
    if count > MAX_BUFFERS:
        raise FrameError(f"a frame with {count} buffers (at most {MAX_BUFFERS})")
    sizes = struct.unpack(f"<{count + 1}Q", await _read(reader, 8 * (count + 1)))
    if sum(sizes) > MAX_FRAME_BYTES:
        raise FrameError(f"a frame of {sum(sizes)} bytes (at most {MAX_FRAME_BYTES})")
    body = await _read(reader, sizes[0])
    buffers = [await _read(reader, size) for size in sizes[1:]]
    try:
        return pickle.loads(body, buffers=buffers)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad frame
        raise FrameError(f"a frame that does not unpickle: {error!r}") from error


async def _read(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as error:  # mid-frame: not a clean close
        raise FrameError(f"the connection closed {len(error.partial)} bytes into a "
                         f"{size}-byte part of a frame") from None
