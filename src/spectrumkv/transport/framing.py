"""Length-prefixed messages over a TCP (or TLS) connection: u32 length | u8 kind | body.

A `Channel` is the connection's asyncio protocol. It reads each message body straight into a
buffer of exactly the body's size (`asyncio.BufferedProtocol`: the socket's `recv_into`, or the
TLS layer's read, writes into it), so a received frame is never copied in Python; only message
heads and the odd bytes that arrive with them pass through a small staging buffer. Sending
writes the head and the caller's buffer without joining them.

Every read has a deadline, and the size cap is checked before the body's buffer is allocated.
Nothing is ever unpickled: bodies are raw payload bytes or msgspec-encoded structs.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Awaitable, Callable
from enum import IntEnum

from ..errors import SpectrumKVError

_HEAD = struct.Struct("<IB")
MAX_MESSAGE_BYTES = 1 << 30
#: Initial size of the staging buffer for message heads (bytes); bodies never go through it.
STAGE_BYTES = 64 << 10


class Kind(IntEnum):
    CHALLENGE = 1
    AUTH = 2
    AUTH_OK = 3
    REQUEST = 4
    HEADER = 5
    FRAME = 6
    DONE = 7
    ERROR = 8
    SCD_REQUEST = 9  # spectrumkv.scd.protocol.ScdRequest


class TransportError(SpectrumKVError):
    """The peer went away, sent garbage, or missed a deadline."""


class PeerTimeout(TransportError):
    """A deadline passed while waiting for the peer."""


class Channel(asyncio.BufferedProtocol):
    """One connection, as messages. Make one with `connect` or `serve`.

    Reading parses a head only while a `recv` waits (so its size cap applies before anything
    is allocated), then fills that body straight from the connection. A `recv` abandoned by a
    deadline leaves the channel in sync: the body keeps filling and the next `recv` gets it.
    A malformed head (unknown kind, over the cap) breaks reading for good; sending still works
    until the channel is closed.
    """

    def __init__(self) -> None:
        self._transport: asyncio.BaseTransport | None = None
        self._stage = bytearray(STAGE_BYTES)
        self._staged = 0  # bytes of _stage holding received, unparsed data
        self._body: bytearray | None = None  # the body being filled, and its kind
        self._kind = Kind.ERROR
        self._filled = 0
        self._ready: tuple[Kind, bytearray] | None = None  # a whole message no recv took yet
        self._waiter: asyncio.Future[tuple[Kind, bytearray]] | None = None
        self._limit = MAX_MESSAGE_BYTES
        self._error: TransportError | None = None  # the channel is broken or closed
        self._reading = True
        self._writable = asyncio.Event()
        self._writable.set()
        self._closed = asyncio.Event()
        self.on_connect: Callable[[Channel], None] | None = None

    # -- the caller's side

    @property
    def peer(self) -> object:
        return self._transport.get_extra_info("peername") if self._transport else None

    async def recv(
        self, timeout: float, max_bytes: int = MAX_MESSAGE_BYTES
    ) -> tuple[Kind, bytearray]:
        """The next message, within `timeout` seconds; its body is a buffer of its own.
        Raises PeerTimeout, or TransportError if the peer left or sent a bad head."""
        if self._waiter is not None:
            raise RuntimeError("a recv is already waiting on this channel")
        w = self._waiter = asyncio.get_running_loop().create_future()
        self._limit = max_bytes
        self._advance()
        try:
            async with asyncio.timeout(timeout):
                return await w
        except TimeoutError:
            self._keep_unclaimed(w)
            raise PeerTimeout(f"no message from peer within {timeout:.1f} s") from None
        except asyncio.CancelledError:
            self._keep_unclaimed(w)
            raise
        finally:
            self._waiter = None

    def _keep_unclaimed(self, w: asyncio.Future) -> None:
        """A message handed to a recv that was cancelled before it could return it (deadline and
        arrival in the same loop turn) goes back for the next recv: nothing is lost."""
        if w.done() and not w.cancelled() and w.exception() is None:
            self._ready = w.result()

    async def send(self, kind: Kind, body: bytes | bytearray | memoryview) -> None:
        """Queue one message (the body is not copied into a joined buffer) and wait until the
        connection takes more. Raises TransportError if the peer left."""
        t = self._transport
        if t is None or t.is_closing():
            raise self._error or TransportError("peer closed the connection")
        t.write(_HEAD.pack(len(body), int(kind)))
        t.write(body)
        if not self._writable.is_set():
            await self._writable.wait()
            if t.is_closing():
                raise self._error or TransportError("peer closed the connection")

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def wait_closed(self) -> None:
        """Return once the connection is lost (the peer left, or `close` took effect)."""
        await self._closed.wait()

    # -- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if self.on_connect is not None:
            self.on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._filled :]
        if self._staged == len(self._stage):  # a TLS layer may deliver past a pause
            self._stage.extend(bytes(len(self._stage)))
        return memoryview(self._stage)[self._staged :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._filled += nbytes
            if self._filled == len(self._body):
                self._ready, self._body = (self._kind, self._body), None
        else:
            self._staged += nbytes
        self._advance()

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {type(exc).__name__}" if exc else ""
        self._break(TransportError(f"peer closed the connection{detail}"))
        self._advance()
        self._writable.set()
        self._closed.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- the reading state machine

    def _advance(self) -> None:
        """Hand a finished message to a waiting recv, or start the next body, and pause or
        resume reading so that at most one staging buffer of data waits unclaimed."""
        w = self._waiter
        if w is not None and not w.done():
            if self._ready is None and self._body is None and self._staged >= _HEAD.size:
                self._start_body()
            if self._ready is not None:
                w.set_result(self._ready)
                self._ready = None
            elif self._error is not None:
                w.set_exception(self._error)
        want = self._error is None and (self._body is not None or self._staged < len(self._stage))
        if want != self._reading and isinstance(self._transport, asyncio.ReadTransport):
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _start_body(self) -> None:
        length, kind = _HEAD.unpack_from(self._stage)
        if length > self._limit:
            return self._break(
                TransportError(f"peer announced a {length}-byte message (limit {self._limit})")
            )
        try:
            self._kind = Kind(kind)
        except ValueError:
            return self._break(TransportError(f"unknown message kind {kind}"))
        body = bytearray(length)
        take = min(length, self._staged - _HEAD.size)
        end = _HEAD.size + take
        body[:take] = memoryview(self._stage)[_HEAD.size : end]
        self._stage[: self._staged - end] = self._stage[end : self._staged]
        self._staged -= end
        if take == length:
            self._ready = (self._kind, body)
        else:
            self._body, self._filled = body, take

    def _break(self, error: TransportError) -> None:
        """Reading cannot go on: fail the waiting recv and later ones, stop reading. Sending
        still works (e.g. to tell the peer why) until the owner closes the channel."""
        if self._error is None:
            self._error = error
        self._body = None


async def connect(host: str, port: int, tls: ssl.SSLContext | None = None) -> Channel:
    """Open a channel to a listening peer. Raises TransportError if it cannot be reached."""
    loop = asyncio.get_running_loop()
    try:
        _, ch = await loop.create_connection(Channel, host, port, ssl=tls)
    except OSError as e:
        raise TransportError(f"cannot reach {host}:{port}: {e}") from None
    return ch


async def serve(
    handler: Callable[[Channel], Awaitable[None]],
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
) -> asyncio.Server:
    """Listen; each connection runs `handler(channel)` as a task and is closed when it returns.
    Port 0 picks a free port (read it from the server's sockets)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    async def run(ch: Channel) -> None:
        try:
            await handler(ch)
        finally:
            ch.close()

    def start(ch: Channel) -> None:
        task = loop.create_task(run(ch))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def factory() -> Channel:
        ch = Channel()
        ch.on_connect = start
        return ch

    return await loop.create_server(factory, host, port, ssl=tls)
