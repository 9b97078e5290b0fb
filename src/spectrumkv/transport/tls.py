"""Optional TLS for the KV channel: confidentiality and server identity on top of the HMAC
handshake (which authenticates both peers either way)."""

from __future__ import annotations

import ipaddress
import ssl

from ..errors import ConfigError


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


def is_loopback(host: str) -> bool:
    """True for a loopback address or "localhost" (a name is otherwise taken as remote)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_tls_off_loopback(host: str, tls: bool, insecure: bool, what: str) -> None:
    """Refuse a KV channel that leaves the machine without TLS unless `insecure`.

    Without TLS the channel has no integrity against an on-path attacker: the handshake is
    mutual, but frames carry xxh3 checksums, which anyone can recompute after tampering (and
    nothing is confidential). Raises ConfigError naming `what` (e.g. "--host 0.0.0.0")."""
    if not tls and not insecure and not is_loopback(host):
        raise ConfigError(
            f"{what} is not a loopback address and the KV channel has no TLS: frames could be "
            "read or altered on the way (their checksums are not keyed). Configure TLS "
            "(--tls-cert/--tls-key on the prefill worker, --tls-ca on the decode worker) or "
            "pass --insecure on a network you trust"
        )
