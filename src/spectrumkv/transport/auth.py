"""Mutual shared-secret challenge-response.

The server sends a fresh 32-byte nonce; the client answers HMAC-SHA256(secret, nonce | role)
plus a fresh nonce of its own; the server checks the answer in constant time and proves itself
with HMAC-SHA256(secret, client_nonce | role | "server"), or sends ERROR "authentication failed"
and closes (so the client can say so instead of "peer closed the connection"). Fresh nonces on
both sides mean a recorded answer cannot be replayed in either direction, and a decode worker
never takes KV from a server that does not know the secret. Refusals are logged with the peer's
address. (For confidentiality and integrity on the wire, run it inside TLS: see tls.py.)
"""

from __future__ import annotations

import contextlib
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
#: The ERROR body a server sends before closing on a client that failed authentication.
REFUSED = b"authentication failed"


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
        with contextlib.suppress(TransportError):  # say why before closing
            await ch.send(Kind.ERROR, REFUSED)
        raise AuthError(f"peer {peer} failed authentication")
    await ch.send(Kind.AUTH_OK, _answer(secret, client_nonce, role + b"|server"))


async def client_handshake(ch: Channel, secret: bytes, role: bytes) -> None:
    kind, nonce = await ch.recv(AUTH_TIMEOUT_S, max_bytes=128)
    if kind != Kind.CHALLENGE or len(nonce) != NONCE_BYTES:
        raise AuthError("peer did not send a challenge")
    mine = secrets.token_bytes(NONCE_BYTES)
    await ch.send(Kind.AUTH, _answer(secret, nonce, role) + mine)
    try:
        kind, proof = await ch.recv(AUTH_TIMEOUT_S, max_bytes=128)
    except TransportError as e:
        raise AuthError(f"authentication failed: {e}") from None
    if kind == Kind.ERROR and bytes(proof) == REFUSED:
        raise AuthError(f"authentication failed: {ch.peer} refused our secret ({SECRET_ENV})")
    if kind != Kind.AUTH_OK:
        raise AuthError(f"authentication failed: unexpected {kind.name} from {ch.peer}")
    if not hmac.compare_digest(proof, _answer(secret, mine, role + b"|server")):
        peer = ch.peer
        log.warning("server %s failed to prove it knows the secret", peer)
        raise AuthError(f"server {peer} failed authentication")
