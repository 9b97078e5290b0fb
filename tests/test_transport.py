"""The KV channel's handshake, limits and TLS over real loopback sockets (no model)."""

import asyncio
import logging
import ssl
import subprocess

import pytest

from spectrumkv.transport.auth import AuthError, client_handshake, server_handshake
from spectrumkv.transport.framing import Kind, TransportError, recv_msg, send_msg
from spectrumkv.transport.tls import client_context, server_context

ROLE = b"test"


async def _serve(secret: bytes, tls=None, handler=None):
    """A server that runs the handshake then echoes one message; returns (server, port, log)."""
    events = []

    async def handle(reader, writer):
        try:
            if handler:
                await handler(reader, writer)
            else:
                await server_handshake(reader, writer, secret, ROLE)
                kind, body = await recv_msg(reader, 5)
                await send_msg(writer, kind, body)
            events.append("ok")
        except TransportError as e:
            events.append(type(e).__name__)
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    return srv, srv.sockets[0].getsockname()[1], events


def test_authenticated_round_trip_and_wrong_secret_refused(caplog):
    async def main():
        srv, port, events = await _serve(b"right")
        async with srv:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await client_handshake(r, w, b"right", ROLE)
            await send_msg(w, Kind.REQUEST, b"hello")
            assert await recv_msg(r, 5) == (Kind.REQUEST, b"hello")
            w.close()
            r, w = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(TransportError):
                await client_handshake(r, w, b"wrong", ROLE)
            w.close()
            await asyncio.sleep(0.1)
        return events

    with caplog.at_level(logging.WARNING, logger="spectrumkv.auth"):
        events = asyncio.run(main())
    assert events == ["ok", "AuthError"]
    assert "refused unauthenticated peer" in caplog.text


def test_recorded_answer_cannot_be_replayed():
    async def main():
        srv, port, events = await _serve(b"s3cret")
        async with srv:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            _, nonce = await recv_msg(r, 5)
            from spectrumkv.transport.auth import _answer

            recorded = _answer(b"s3cret", nonce, ROLE) + b"\0" * 32
            await send_msg(w, Kind.AUTH, recorded)
            assert (await recv_msg(r, 5))[0] == Kind.AUTH_OK
            w.close()
            # an eavesdropper replays the recorded answer on a new connection: a new nonce
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await recv_msg(r, 5)
            await send_msg(w, Kind.AUTH, recorded)
            with pytest.raises(TransportError):
                await recv_msg(r, 5)
            w.close()
            await asyncio.sleep(0.1)
        return events

    events = asyncio.run(main())
    assert events[-1] == "AuthError"


def test_client_refuses_a_server_that_does_not_know_the_secret():
    async def impostor(reader, writer):
        """Accepts anyone, then cannot prove it knows the secret."""
        await send_msg(writer, Kind.CHALLENGE, b"n" * 32)
        await recv_msg(reader, 5)
        await send_msg(writer, Kind.AUTH_OK, b"\0" * 32)

    async def main():
        srv, port, _ = await _serve(b"", handler=impostor)
        async with srv:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(AuthError):
                await client_handshake(r, w, b"real", ROLE)
            w.close()

    asyncio.run(main())


def test_oversized_message_is_refused_before_reading_its_body():
    async def main():
        got = {}

        async def handle(reader, writer):
            try:
                await recv_msg(reader, 5, max_bytes=1024)
            except TransportError as e:
                got["error"] = str(e)
            writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with srv:
            port = srv.sockets[0].getsockname()[1]
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write((1 << 30).to_bytes(4, "little") + bytes([int(Kind.FRAME)]))  # no body sent
            await w.drain()
            await asyncio.sleep(0.3)
            w.close()
        return got

    assert "limit 1024" in asyncio.run(main())["error"]


def test_tls_channel_works_and_plaintext_or_untrusted_clients_fail_fast(cert, tmp_path):
    crt, key = cert

    async def main():
        srv, port, events = await _serve(b"k", tls=server_context(crt, key))
        async with srv:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(crt))
            await client_handshake(r, w, b"k", ROLE)
            await send_msg(w, Kind.REQUEST, b"over tls")
            assert await recv_msg(r, 5) == (Kind.REQUEST, b"over tls")
            assert w.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            w.close()
            # plaintext client against the TLS server: a typed error within the timeout
            r, w = await asyncio.open_connection("127.0.0.1", port)
            with pytest.raises(TransportError):
                await client_handshake(r, w, b"k", ROLE)
            w.close()
            # a client that trusts another certificate refuses the server
            other = tmp_path / "other.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                 str(tmp_path / "k2.pem"), "-out", str(other), "-days", "1", "-subj", "/CN=x"],
                check=True, capture_output=True,
            )  # fmt: skip
            with pytest.raises(ssl.SSLError):
                await asyncio.open_connection("127.0.0.1", port, ssl=client_context(str(other)))

    asyncio.run(main())
