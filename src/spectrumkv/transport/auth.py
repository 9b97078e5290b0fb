"""Mutual shared-secret challenge-response.

The server sends a fresh 32-byte nonce; the client answers HMAC-SHA256(secret, nonce | role)
plus a fresh nonce of its own; the server checks the answer in constant time and proves itself
with HMAC-SHA256(secret, client_nonce | role | "server"). Fresh nonces on both sides mean a
recorded answer cannot be replayed in either direction, and a decode worker never takes KV from
a server that does not know the secret. Refusals are logged with the peer's address. (For
confidentiality on the wire, run it inside TLS: see tls.py.)
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets

from ..errors import ConfigError
from .framing import Channel, Kind, TransportError

log = logging.getLogger("spectrumkv.auth")
AUTH_TIMEOUT_S = 5.0


class AuthError(TransportError):
    """The peer failed authentication."""


NONCE_BYTES = 32
SECRET_ENV = "SPECTRUMKV_SECRET"


def secret_from_env(var: str = SECRET_ENV) -> bytes:
    """The shared secret both ends of a transfer know, from the environment (>= 16 chars)."""
    secret = os.environ.get(var, "")
    if len(secret) < 16:
        raise ConfigError(f"set {var} (>= 16 characters), shared by both ends of the transfer")
    return secret.encode()


def _answer(secret: bytes, nonce: bytes, role: bytes) -> bytes:
    return hmac.new(secret, nonce + b"|" + role, hashlib.sha256).digest()


async def server_handshake(ch: Channel, secret: bytes, role: bytes) -> None:
    nonce = secrets.token_bytes(NONCE_BYTES)
    await ch.send(Kind.CHALLENGE, nonce)
    kind, body = await ch.recv(AUTH_TIMEOUT_S, max_bytes=128)
    answer, client_nonce = body[:-NONCE_BYTES], body[-NONCE_BYTES:]
    ok = kind == Kind.AUTH and len(body) == 32 + NONCE_BYTES
    if not (ok and hmac.compare_digest(answer, _answer(secret, nonce, role))):
        peer = ch.peer
        log.warning("refused unauthenticated peer %s", peer)
        raise AuthError(f"peer {peer} failed authentication")
    await ch.send(Kind.AUTH_OK, _answer(secret, client_nonce, role + b"|server"))


async def client_handshake(ch: Channel, secret: bytes, role: bytes) -> None:
    kind, nonce = await ch.recv(AUTH_TIMEOUT_S, max_bytes=128)
    if kind != Kind.CHALLENGE or len(nonce) != NONCE_BYTES:
        raise AuthError("peer did not send a challenge")
    mine = secrets.token_bytes(NONCE_BYTES)
    await ch.send(Kind.AUTH, _answer(secret, nonce, role) + mine)
    kind, proof = await ch.recv(AUTH_TIMEOUT_S, max_bytes=128)
    if kind != Kind.AUTH_OK:
        raise AuthError("peer refused our credentials")
    if not hmac.compare_digest(proof, _answer(secret, mine, role + b"|server")):
        peer = ch.peer
        log.warning("server %s failed to prove it knows the secret", peer)
        raise AuthError(f"server {peer} failed authentication")
