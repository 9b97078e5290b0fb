"""Push transfers: a sender connects to a receiver and pushes one payload per connection.

This is the direction a serving engine's connector needs (the prefill side pushes as soon as a
prompt's KV is ready; the decode side claims it when the request arrives). Per connection:

    sender                                  receiver
    <- CHALLENGE / AUTH / AUTH_OK ->        (mutual HMAC, auth.py)
    REQUEST  {transfer_id, error}    ->     error set: the sender gave up; the claim fails now
    HEADER, FRAME x n_layers, DONE   ->     strict decode (payload.PayloadDecoder, expected model)
                                     <-     DONE (stored) | ERROR (refused, with the reason)

The receiver keeps decoded payloads in a `KVInbox` until claimed, bounded in bytes and age.
Nothing is unpickled: control bodies are msgspec JSON, payload bodies go to the strict decoder.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from ..errors import SpectrumKVError
from ..payload import Payload, PayloadDecoder
from ..policy import fp16_bytes
from ..wire import Fingerprint
from .auth import client_handshake, server_handshake
from .framing import Channel, Kind, PeerTimeout, TransportError, connect, serve
from .shaper import LinkShaper
from .unpack import Unpacker

log = logging.getLogger("spectrumkv.push")
ROLE = b"prefill->decode push"
#: Longest a receiver waits for the next message of a transfer it has started (seconds).
MESSAGE_TIMEOUT_S = 30.0
MAX_TRANSFER_ID = 128

T = TypeVar("T")


class TransferFailed(SpectrumKVError):
    """A transfer ended without a usable payload: refused, aborted by the sender, or expired."""


class PushStart(msgspec.Struct, forbid_unknown_fields=True):
    """First message of a push. `error`: the sender could not produce the payload (the
    receiver records the failure so the claim fails at once instead of timing out)."""

    transfer_id: str
    error: str = ""


class PushReply(msgspec.Struct):
    ok: bool
    message: str = ""


@dataclass
class _Entry:
    payload: Payload | None
    error: str
    nbytes: int
    wire_bytes: int
    arrived: float


def payload_nbytes(p: Payload) -> int:
    """Bytes held by a decoded payload's tensors."""
    return sum(kv.keys.nbytes + kv.values.nbytes + kv.positions.nbytes for kv in p.layers)


class KVInbox:
    """Decoded payloads waiting for their request, keyed by transfer id (thread-safe).

    Holds at most `max_bytes` of decoded tensors; an entry not claimed within `ttl_s` seconds is
    dropped (its request, if it ever comes, fails its claim and recomputes).
    """

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._entries: dict[str, _Entry] = {}
        self._held = 0
        self._cond = threading.Condition()
        self.expired = 0

    @property
    def held_bytes(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._entries)

    def reserve_ok(self, nbytes: int) -> bool:
        """Whether `nbytes` more would fit under the cap (after dropping expired entries)."""
        with self._cond:
            self._expire(time.monotonic())
            return self._held + nbytes <= self.max_bytes

    def put(self, transfer_id: str, payload: Payload, wire_bytes: int) -> None:
        """Store a verified payload (`wire_bytes`: its size on the wire)."""
        nbytes = payload_nbytes(payload)
        with self._cond:
            now = time.monotonic()
            self._expire(now)
            if self._held + nbytes > self.max_bytes:
                raise TransferFailed(
                    f"inbox full: {self._held} + {nbytes} bytes over the {self.max_bytes}-byte cap"
                )
            self._store(transfer_id, _Entry(payload, "", nbytes, wire_bytes, now))

    def fail(self, transfer_id: str, error: str) -> None:
        """Record that a transfer failed, so its claim fails at once."""
        with self._cond:
            self._store(transfer_id, _Entry(None, error, 0, 0, time.monotonic()))

    def _store(self, transfer_id: str, entry: _Entry) -> None:
        old = self._entries.pop(transfer_id, None)
        if old is not None:
            self._held -= old.nbytes
        self._entries[transfer_id] = entry
        self._held += entry.nbytes
        self._cond.notify_all()

    def take(self, transfer_id: str, timeout_s: float) -> tuple[Payload, int]:
        """Claim a payload and its wire size, waiting up to `timeout_s` seconds for it.

        Raises TransferFailed if the transfer failed or did not arrive in time."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while transfer_id not in self._entries:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferFailed(
                        f"transfer {transfer_id!r} did not arrive within {timeout_s:.1f} s"
                    )
                self._cond.wait(left)
            entry = self._entries.pop(transfer_id)
            self._held -= entry.nbytes
        if entry.payload is None:
            raise TransferFailed(f"transfer {transfer_id!r} failed: {entry.error}")
        return entry.payload, entry.wire_bytes

    def _expire(self, now: float) -> None:
        for tid in [t for t, e in self._entries.items() if now - e.arrived > self.ttl_s]:
            self._held -= self._entries.pop(tid).nbytes
            self.expired += 1


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, for callers that are not async (an engine's
    worker). `run` blocks the caller until the coroutine finishes or `timeout_s` passes."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout_s)
        except TimeoutError:
            fut.cancel()
            raise PeerTimeout(f"operation did not finish within {timeout_s:.1f} s") from None

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


async def push_payload(
    host: str,
    port: int,
    secret: bytes,
    transfer_id: str,
    chunks: Iterable[bytes | memoryview],
    shaper: LinkShaper | None = None,
    tls: ssl.SSLContext | None = None,
    error: str = "",
) -> int:
    """Push one payload (header chunk, then one chunk per layer frame) and wait for the
    receiver's verdict. With `error` set, send only the failure notice. Returns the bytes of
    payload sent; raises TransferFailed if the receiver refused it, TransportError on a lost
    peer (callers bound the whole call with a deadline)."""
    ch = await connect(host, port, tls)
    sent = 0
    try:
        await client_handshake(ch, secret, ROLE)
        await ch.send(Kind.REQUEST, msgspec.json.encode(PushStart(transfer_id, error)))
        if not error:
            for i, chunk in enumerate(chunks):
                if shaper is not None:
                    await shaper.transmit(len(chunk))
                await ch.send(Kind.HEADER if i == 0 else Kind.FRAME, chunk)
                sent += len(chunk)
            await ch.send(Kind.DONE, b"")
        kind, body = await ch.recv(MESSAGE_TIMEOUT_S, max_bytes=1 << 16)
        reply = msgspec.json.decode(body, type=PushReply)
        if kind != Kind.DONE or not reply.ok:
            raise TransferFailed(f"receiver refused transfer {transfer_id!r}: {reply.message}")
        return sent
    except msgspec.MsgspecError as e:
        raise TransportError(f"malformed reply from receiver: {e}") from None
    finally:
        ch.close()


class PushReceiver:
    """Accepts pushes into an inbox. `expect`: the model a payload must be for. Frames are
    verified and decoded on one worker thread, in arrival order, while the event loop keeps
    receiving (this and other connections)."""

    def __init__(self, inbox: KVInbox, secret: bytes, expect: Fingerprint) -> None:
        self.inbox = inbox
        self.secret = secret
        self.expect = expect
        self.received = 0
        self.refused = 0
        self.unpacker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push-unpack")

    async def handle(self, ch: Channel) -> None:
        """One push connection (run by `start_receiver`; the channel is closed after it)."""
        transfer_id = ""
        try:
            await server_handshake(ch, self.secret, ROLE)
            kind, body = await ch.recv(MESSAGE_TIMEOUT_S, max_bytes=4096)
            start = msgspec.json.decode(body, type=PushStart) if kind == Kind.REQUEST else None
            if start is None or not 0 < len(start.transfer_id) <= MAX_TRANSFER_ID:
                raise TransportError("a push must start with a valid REQUEST")
            transfer_id = start.transfer_id
            if start.error:
                self.inbox.fail(transfer_id, f"sender gave up: {start.error}")
                await self._reply(ch, True, "failure recorded")
                return
            payload, wire_bytes = await self._receive(ch)
            self.inbox.put(transfer_id, payload, wire_bytes)
            self.received += 1
            await self._reply(ch, True)
        except (SpectrumKVError, msgspec.MsgspecError) as e:
            self.refused += 1
            log.warning("refused push %r: %s: %s", transfer_id, type(e).__name__, e)
            if transfer_id:
                self.inbox.fail(transfer_id, f"{type(e).__name__}: {e}")
            with contextlib.suppress(TransportError):
                await self._reply(ch, False, f"{type(e).__name__}: {e}")

    async def _receive(self, ch: Channel) -> tuple[Payload, int]:
        dec = PayloadDecoder(self.expect)
        kind, body = await ch.recv(MESSAGE_TIMEOUT_S)
        if kind != Kind.HEADER:
            raise TransportError(f"expected HEADER, got {kind.name}")
        header = dec.feed_header(body)
        wire_bytes = len(body)
        need = fp16_bytes(header)  # what the decoded 16-bit tensors will hold
        if not self.inbox.reserve_ok(need):
            raise TransferFailed(f"inbox cannot hold {need} more bytes")
        unpacker = Unpacker(self.unpacker)
        try:
            while True:
                kind, body = await ch.recv(MESSAGE_TIMEOUT_S)
                async with asyncio.timeout(MESSAGE_TIMEOUT_S):  # decoding the frames before it
                    if kind == Kind.DONE:
                        await unpacker.drain()
                        return dec.finish(), wire_bytes
                    if kind != Kind.FRAME:
                        raise TransportError(f"expected FRAME or DONE, got {kind.name}")
                    await unpacker.feed(dec.feed_frame, body)
                wire_bytes += len(body)
        except TimeoutError:
            raise PeerTimeout(f"decoding fell {MESSAGE_TIMEOUT_S:.0f} s behind") from None
        finally:
            unpacker.abandon()

    @staticmethod
    async def _reply(ch: Channel, ok: bool, message: str = "") -> None:
        await ch.send(Kind.DONE if ok else Kind.ERROR, msgspec.json.encode(PushReply(ok, message)))


async def start_receiver(
    receiver: PushReceiver, host: str, port: int, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Listen for pushes; port 0 picks a free port (read it from the server's sockets)."""
    return await serve(receiver.handle, host, port, tls)
