"""Optional TLS for the KV channel: confidentiality and server identity on top of the HMAC
handshake (which authenticates both peers either way)."""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS >= 1.2 server context from PEM certificate and key files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def client_context(ca: str) -> ssl.SSLContext:
    """A TLS >= 1.2 client context that trusts only the CA (or self-signed certificate) in `ca`
    and checks the server's name or IP against its certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
