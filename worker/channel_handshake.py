"""Mutual proof of the forward channel's token, before any frame is read.

Both ends hold a random token the worker made and handed to the coordinator
over Ray. Each proves it to the other with an HMAC of a fresh nonce the other
chose, so the token itself never crosses the socket and neither end
unpickles a byte from a peer that has not proven it:

    coordinator -> worker        nonce_c
    worker -> coordinator        HMAC(token, "worker" + nonce_c), nonce_w
    coordinator -> worker        HMAC(token, "coordinator" + nonce_w)
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

TOKEN_BYTES = 32
NONCE_BYTES = 16
PROOF_BYTES = hashlib.sha256().digest_size
HANDSHAKE_TIMEOUT_S = 5.0


class HandshakeFailed(ConnectionError):
    """The peer did not prove it holds the token (or went silent)."""


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def _proof(token: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, role + nonce, hashlib.sha256).digest()


async def _read(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await asyncio.wait_for(reader.readexactly(size), HANDSHAKE_TIMEOUT_S)
    except (asyncio.TimeoutError, asyncio.IncompleteReadError):
        raise HandshakeFailed("the peer went silent during the handshake") from None


async def prove_to_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          token: bytes) -> None:
    """The coordinator's side: checks the worker's proof, then gives its own."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    writer.write(nonce)
    reply = await _read(reader, PROOF_BYTES + NONCE_BYTES)
    if not hmac.compare_digest(reply[:PROOF_BYTES], _proof(token, b"worker", nonce)):
        raise HandshakeFailed("the listener is not the worker that handed out the token")
    writer.write(_proof(token, b"coordinator", reply[PROOF_BYTES:]))
    await writer.drain()


async def prove_to_coordinator(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               token: bytes) -> None:
    """The worker's side: gives its proof, then checks the coordinator's."""
    their_nonce = await _read(reader, NONCE_BYTES)
    nonce = secrets.token_bytes(NONCE_BYTES)
    writer.write(_proof(token, b"worker", their_nonce) + nonce)
    await writer.drain()
    answer = await _read(reader, PROOF_BYTES)
    if not hmac.compare_digest(answer, _proof(token, b"coordinator", nonce)):
        raise HandshakeFailed("the peer does not hold the token")
