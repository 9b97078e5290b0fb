"""The KV channel's handshake, limits and TLS over real loopback sockets (no model)."""

import asyncio
import logging
import subprocess

import pytest

from spectrumkv.transport.auth import REFUSED, AuthError, client_handshake, server_handshake
from spectrumkv.transport.framing import Channel, Kind, PeerTimeout, TransportError, connect, serve
from spectrumkv.transport.tls import client_context, server_context

ROLE = b"test"


async def _serve(secret: bytes, tls=None, handler=None):
    """A server that runs the handshake then echoes one message; returns (server, port, log)."""
    events = []

    async def handle(ch: Channel):
        try:
            if handler:
                await handler(ch)
            else:
                await server_handshake(ch, secret, ROLE)
                kind, body = await ch.recv(5)
                await ch.send(kind, body)
            events.append("ok")
        except TransportError as e:
            events.append(type(e).__name__)

    srv = await serve(handle, "127.0.0.1", 0, tls)
    return srv, srv.sockets[0].getsockname()[1], events


def test_authenticated_round_trip_and_wrong_secret_refused(caplog):
    async def main():
        srv, port, events = await _serve(b"right")
        async with srv:
            ch = await connect("127.0.0.1", port)
            await client_handshake(ch, b"right", ROLE)
            await ch.send(Kind.REQUEST, b"hello")
            assert await ch.recv(5) == (Kind.REQUEST, b"hello")
            ch.close()
            ch = await connect("127.0.0.1", port)
            with pytest.raises(AuthError, match="authentication failed: .* refused our secret"):
                await client_handshake(ch, b"wrong", ROLE)
            ch.close()
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
            ch = await connect("127.0.0.1", port)
            _, nonce = await ch.recv(5)
            from spectrumkv.transport.auth import _answer

            recorded = _answer(b"s3cret", bytes(nonce), ROLE) + b"\0" * 32
            await ch.send(Kind.AUTH, recorded)
            assert (await ch.recv(5))[0] == Kind.AUTH_OK
            ch.close()
            # an eavesdropper replays the recorded answer on a new connection: a new nonce
            ch = await connect("127.0.0.1", port)
            await ch.recv(5)
            await ch.send(Kind.AUTH, recorded)
            assert await ch.recv(5) == (Kind.ERROR, REFUSED)  # told why, never AUTH_OK
            with pytest.raises(TransportError):  # then closed
                await ch.recv(5)
            ch.close()
            await asyncio.sleep(0.1)
        return events

    events = asyncio.run(main())
    assert events[-1] == "AuthError"


def test_client_refuses_a_server_that_does_not_know_the_secret():
    async def impostor(ch: Channel):
        """Accepts anyone, then cannot prove it knows the secret."""
        await ch.send(Kind.CHALLENGE, b"n" * 32)
        await ch.recv(5)
        await ch.send(Kind.AUTH_OK, b"\0" * 32)

    async def main():
        srv, port, _ = await _serve(b"", handler=impostor)
        async with srv:
            ch = await connect("127.0.0.1", port)
            with pytest.raises(AuthError):
                await client_handshake(ch, b"real", ROLE)
            ch.close()

    asyncio.run(main())


def test_oversized_message_is_refused_before_reading_its_body():
    async def main():
        got = {}

        async def handle(ch: Channel):
            try:
                await ch.recv(5, max_bytes=1024)
            except TransportError as e:
                got["error"] = str(e)

        srv = await serve(handle, "127.0.0.1", 0)
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
            ch = await connect("127.0.0.1", port, client_context(crt))
            await client_handshake(ch, b"k", ROLE)
            big = bytes(range(256)) * 40_000  # 10 MB: many TLS records into one body buffer
            await ch.send(Kind.FRAME, big)
            assert await ch.recv(5) == (Kind.FRAME, big)
            assert ch._transport.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
            ch.close()
            # plaintext client against the TLS server: a typed error within the timeout
            ch = await connect("127.0.0.1", port)
            with pytest.raises(TransportError):
                await client_handshake(ch, b"k", ROLE)
            ch.close()
            # a client that trusts another certificate refuses the server
            other = tmp_path / "other.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                 str(tmp_path / "k2.pem"), "-out", str(other), "-days", "1", "-subj", "/CN=x"],
                check=True, capture_output=True,
            )  # fmt: skip
            with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
                await connect("127.0.0.1", port, client_context(str(other)))

    asyncio.run(main())


async def _raw_server(messages: list, timeout: float = 5):
    """A channel server that records every message it receives (as (kind, bytes)) until the
    peer leaves; returns (server, port, done future)."""
    done = asyncio.get_running_loop().create_future()

    async def handle(ch: Channel):
        try:
            while True:
                kind, body = await ch.recv(timeout)
                assert isinstance(body, bytearray)  # its own buffer, filled in place
                messages.append((kind, bytes(body)))
        except TransportError as e:
            done.set_result(e)

    srv = await serve(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], done


def _wire(kind: Kind, body: bytes) -> bytes:
    return len(body).to_bytes(4, "little") + bytes([int(kind)]) + body


def _send_in_pieces(stream: bytes, cut: int) -> list:
    """Write `stream` to a recording channel server in `cut`-byte writes; what it received."""

    async def main():
        got: list = []
        srv, port, done = await _raw_server(got)
        async with srv:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for i in range(0, len(stream), cut):
                w.write(stream[i : i + cut])
                await w.drain()
            w.close()
            assert isinstance(await asyncio.wait_for(done, 10), TransportError)
        return got

    return asyncio.run(main())


def test_messages_survive_any_split_or_coalescing_of_the_byte_stream():
    """Heads and bodies cut at odd places, several messages per write, a body far larger than
    the staging buffer, an empty body: each arrives whole and in order."""
    small = [(Kind.REQUEST, b"a"), (Kind.DONE, b""), (Kind.HEADER, b"xyz" * 7)]
    large = [(Kind.FRAME, bytes(range(256)) * 1024), (Kind.FRAME, b"\x01" * 70_000)]
    sent = [small[0], large[0], small[1], small[2], large[1]]
    stream = b"".join(_wire(k, b) for k, b in sent)
    assert _send_in_pieces(b"".join(_wire(k, b) for k, b in small), 1) == small  # byte by byte
    for cut in (3, 4096, 65_541, len(stream)):
        assert _send_in_pieces(stream, cut) == sent


def test_recv_abandoned_mid_body_leaves_the_channel_in_sync_and_a_cut_body_fails():
    async def main():
        result = {}

        async def handle(ch: Channel):
            with pytest.raises(PeerTimeout):
                await ch.recv(0.2)  # the body is still coming when this gives up
            result["late"] = await ch.recv(5)  # ... and the next recv gets it whole
            try:
                await ch.recv(5)
            except TransportError as e:
                result["cut"] = str(e)

        srv = await serve(handle, "127.0.0.1", 0)
        async with srv:
            port = srv.sockets[0].getsockname()[1]
            _, w = await asyncio.open_connection("127.0.0.1", port)
            msg = _wire(Kind.FRAME, b"z" * 100_000)
            w.write(msg[:50_000])
            await w.drain()
            await asyncio.sleep(0.5)
            w.write(msg[50_000:])
            w.write(_wire(Kind.FRAME, b"q" * 1000)[:600])  # the peer dies mid-body
            await w.drain()
            await asyncio.sleep(0.2)
            w.close()
            await asyncio.sleep(0.3)
        return result

    result = asyncio.run(main())
    assert result["late"] == (Kind.FRAME, b"z" * 100_000)
    assert "peer closed the connection" in result["cut"]


def test_unknown_kind_breaks_reading_but_the_reason_can_still_be_sent():
    async def main():
        async def handle(ch: Channel):
            try:
                await ch.recv(5)
            except TransportError as e:
                await ch.send(Kind.ERROR, str(e).encode())
                with pytest.raises(TransportError, match="unknown message kind"):
                    await ch.recv(5)  # reading stays broken

        srv = await serve(handle, "127.0.0.1", 0)
        async with srv:
            port = srv.sockets[0].getsockname()[1]
            ch = await connect("127.0.0.1", port)
            ch._transport.write(b"\x03\0\0\0\x63abc")  # kind 99
            reply = await ch.recv(5)
            ch.close()
        return reply

    kind, body = asyncio.run(main())
    assert kind == Kind.ERROR and b"unknown message kind 99" in body


def test_message_delivered_to_a_recv_cancelled_in_the_same_turn_is_not_lost():
    """The deadline fires after the message reached the waiting recv but before it returned:
    the next recv still gets the message (no transport needed: bytes are fed to the protocol)."""

    async def main():
        ch = Channel()
        task = asyncio.create_task(ch.recv(5))
        await asyncio.sleep(0)  # the recv is waiting
        msg = _wire(Kind.DONE, b"kept")
        ch.get_buffer(-1)[: len(msg)] = msg
        ch.buffer_updated(len(msg))  # hands the message to the waiting recv ...
        task.cancel()  # ... which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        return await ch.recv(1)

    assert asyncio.run(main()) == (Kind.DONE, b"kept")
