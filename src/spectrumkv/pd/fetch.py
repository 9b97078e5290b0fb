"""The decode worker's side of one transfer: send a request to the prefill worker, receive the
HEADER and FRAME messages into a `Receiver` (verified and decoded on the unpack thread, in
order, while the socket keeps receiving), then DONE or ERROR, all within one deadline.

Receivers: `KvReceiver` (a KV payload for the expected model: the decode worker's own, or model
A's for an explicit raw-reuse baseline) and `scd.serve_decode.ScdReceiver` (SCD codes rebuilt
into model B's cache as each frame arrives).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Protocol

import msgspec

from ..errors import IncompatiblePayloadError, SpectrumKVError
from ..kv import LayerKV
from ..payload import PayloadDecoder
from ..transport.framing import MAX_MESSAGE_BYTES, Channel, Kind, PeerTimeout, TransportError
from ..transport.unpack import Unpacker
from ..wire import Fingerprint
from .protocol import ErrorReply, PrefillDone

if TYPE_CHECKING:
    from ..serve.staged import StagedPrompt


@dataclass
class Transfer:
    """What arrived for one request, with stage times in seconds. `unpack_s`: all verify +
    decode work (for SCD including B's reconstruction, `reconstruct_s` of it);
    `unpack_tail_s`: the part left after the last byte arrived (the rest overlapped with the
    transfer). `method`: kv, scd or raw. `layers`: B's cache per layer, or (SCD on the batch
    engine) the StagedPrompt its layers were written into, already in pages."""

    layers: list[LayerKV] | StagedPrompt = field(default_factory=list)
    n_tokens: int = 0
    done: PrefillDone | None = None
    unpack_s: float = 0.0
    unpack_tail_s: float = 0.0
    method: str = "kv"
    reconstruct_s: float = 0.0


class TransferFailed(SpectrumKVError):
    """The prefill worker reported an error for this request; the message says which."""


class Receiver(Protocol):
    def max_bytes(self) -> int: ...  # the largest valid next message (checked before reading)
    def feed_header(self, body: bytes) -> None: ...
    def feed_frame(self, body: bytes) -> None: ...
    def finish(self) -> tuple[list[LayerKV] | StagedPrompt, int]: ...  # B's cache, its tokens


class KvReceiver:
    """A KV payload for the model of fingerprint `expect`, for the prompt of `digest`
    (`wire.tokens_digest`)."""

    def __init__(self, expect: Fingerprint, digest: int) -> None:
        self.dec, self.digest = PayloadDecoder(expect=expect), digest

    def max_bytes(self) -> int:
        return MAX_MESSAGE_BYTES

    def feed_header(self, body: bytes) -> None:
        self.dec.feed_header(body)

    def feed_frame(self, body: bytes) -> None:
        self.dec.feed_frame(body)

    def finish(self) -> tuple[list[LayerKV], int]:
        payload = self.dec.finish()
        if payload.header.tokens_digest != self.digest:
            raise IncompatiblePayloadError("the KV payload is not for this request's prompt")
        return payload.layers, payload.header.n_tokens


async def fetch(
    open_channel: Callable[[], Awaitable[Channel]],
    kind: Kind,
    request: bytes,
    rx: Receiver,
    deadline_s: float,
    executor: ThreadPoolExecutor,
) -> Transfer:
    """Send `request` (a message of `kind`) on a new channel and receive the answer into `rx`
    within `deadline_s` seconds. Raises PeerTimeout / TransportError (the peer),
    TransferFailed (the prefill worker's ERROR), or the receiver's typed errors."""
    out = Transfer()
    deadline = time.monotonic() + deadline_s
    ch: Channel | None = None
    unpacker = Unpacker(executor)
    try:
        async with asyncio.timeout(deadline_s):
            ch = await open_channel()
            await ch.send(kind, request)

        def unpack(feed, body: bytes) -> None:
            t0 = time.perf_counter()
            feed(body)
            out.unpack_s += time.perf_counter() - t0

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout("KV transfer deadline passed")
            kind_in, body = await ch.recv(left, max_bytes=rx.max_bytes())
            if kind_in in (Kind.HEADER, Kind.FRAME):
                feed = rx.feed_header if kind_in == Kind.HEADER else rx.feed_frame
                left = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(unpacker.feed(partial(unpack, feed), body), left)
            elif kind_in == Kind.DONE:
                out.done = msgspec.json.decode(body, type=PrefillDone)
                t_last = time.perf_counter()
                left = max(0.0, deadline - time.monotonic())
                await asyncio.wait_for(unpacker.drain(), left)
                out.unpack_tail_s = time.perf_counter() - t_last
                break
            elif kind_in == Kind.ERROR:
                err = msgspec.json.decode(body, type=ErrorReply)
                raise TransferFailed(f"prefill worker: {err.error}: {err.message}")
            else:
                raise TransportError(f"unexpected {kind_in.name} message")
        out.layers, out.n_tokens = rx.finish()
        return out
    except TimeoutError:
        raise PeerTimeout("KV transfer deadline passed") from None
    except msgspec.MsgspecError as e:  # a DONE or ERROR message that does not parse
        raise TransportError(f"malformed message from prefill worker: {e}") from None
    finally:
        if ch is not None:
            ch.close()  # also how the prefill worker learns a request was abandoned
        unpacker.abandon()  # after a failure: drop queued frames, collect their errors
