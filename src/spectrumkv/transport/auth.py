"""Shared-secret challenge-response: the server sends a fresh 32-byte nonce, the client answers
HMAC-SHA256(secret, nonce | role), the server compares in constant time. A fresh nonce per
connection means a recorded answer cannot be replayed."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets

from .framing import Kind, TransportError, recv_msg, send_msg

log = logging.getLogger("spectrumkv.auth")
AUTH_TIMEOUT_S = 5.0


class AuthError(TransportError):
    """The peer failed authentication."""


def _answer(secret: bytes, nonce: bytes, role: bytes) -> bytes:
    return hmac.new(secret, nonce + b"|" + role, hashlib.sha256).digest()


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes, role: bytes
) -> None:
    nonce = secrets.token_bytes(32)
    await send_msg(writer, Kind.CHALLENGE, nonce)
    kind, body = await recv_msg(reader, AUTH_TIMEOUT_S, max_bytes=64)
    if kind != Kind.AUTH or not hmac.compare_digest(body, _answer(secret, nonce, role)):
        peer = writer.get_extra_info("peername")
        log.warning("refused unauthenticated peer %s", peer)
        raise AuthError(f"peer {peer} failed authentication")
    await send_msg(writer, Kind.AUTH_OK, b"")


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes, role: bytes
) -> None:
    kind, nonce = await recv_msg(reader, AUTH_TIMEOUT_S, max_bytes=64)
    if kind != Kind.CHALLENGE or len(nonce) != 32:
        raise AuthError("peer did not send a challenge")
    await send_msg(writer, Kind.AUTH, _answer(secret, nonce, role))
    kind, _ = await recv_msg(reader, AUTH_TIMEOUT_S, max_bytes=64)
    if kind != Kind.AUTH_OK:
        raise AuthError("peer refused our credentials")
