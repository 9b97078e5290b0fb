"""`spectrumkv bench push`: the receive path of a push transfer against raw loopback TCP.

For each policy, one payload of the `bench codec` cache is encoded once, then timed three ways
on loopback, sender and receiver on one event loop as in a single test process:

- `raw`: the payload's bytes through a plain TCP socket pair (`sock_sendall` into
  `sock_recv_into` one preallocated buffer): what the kernel alone costs on this machine.
- `push`: `push_payload` into a `PushReceiver`: authentication, framing, every checksum, the
  strict decoder writing the payload's tensors, and the receiver's verdict.
- `decode`: the same decoder on the same bytes without a socket, to split `push` into its
  decoding and its transport share.

Throughputs are GB/s of wire bytes; each figure is the best of `repeats`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import asdict, dataclass

import torch

from ..config import PolicyConfig, ScoreConfig
from ..importance import score_tokens
from ..payload import PayloadDecoder
from ..policy import plan
from ..transport.push import KVInbox, PushReceiver, push_payload, start_receiver
from ..wire import Header, header_bytes
from .codec import CacheShape, encode_all, synthetic_cache, synthetic_header

SECRET = b"bench-push-secret-32-bytes-long!"


@dataclass
class PushRecord:
    policy: str
    budget: float | None
    dtype: str
    wire_bytes: int
    raw_gbps: float
    push_gbps: float
    decode_gbps: float
    push_over_raw: float  # push throughput / raw loopback throughput
    transport_s: float  # push seconds minus decode seconds


def encode_payload(
    shape: CacheShape, dtype: str, policy: str, budget: float | None
) -> tuple[list[bytes], Header]:
    """The header and frame chunks of one payload of the synthetic cache (tiers planned on key
    norms), and its header."""
    layers = synthetic_cache(shape, getattr(torch, dtype))
    header = synthetic_header(shape, dtype, policy, budget)
    scores, per_layer = score_tokens(ScoreConfig(method="keynorm"), shape.tokens, layers, None)
    p = plan(scores, header, PolicyConfig(policy, budget=budget), per_layer)
    frames = [bytes(f) for f in encode_all(layers, header, p.tiers, use_fused=True)]
    return [header_bytes(header), *frames], header


async def raw_seconds(chunks: list[bytes]) -> float:
    """Seconds to move the chunks' bytes through a loopback TCP connection."""
    loop = asyncio.get_running_loop()
    total = sum(len(c) for c in chunks)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        dest = memoryview(bytearray(total))

        async def receive() -> None:
            got = 0
            while got < total:
                n = await loop.sock_recv_into(b, dest[got:])
                if n == 0:
                    raise ConnectionError("loopback peer closed early")
                got += n

        async def send() -> None:
            for c in chunks:
                await loop.sock_sendall(a, c)

        t0 = time.perf_counter()
        await asyncio.gather(send(), receive())
        return time.perf_counter() - t0


async def push_seconds(chunks: list[bytes], header: Header, repeats: int) -> float:
    """Best seconds of `repeats` pushes into a receiver (verified, decoded, stored, claimed)."""
    inbox = KVInbox(max_bytes=1 << 34, ttl_s=600)
    srv = await start_receiver(PushReceiver(inbox, SECRET, header.fingerprint), "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    best = float("inf")
    try:
        for i in range(repeats):
            t0 = time.perf_counter()
            await push_payload("127.0.0.1", port, SECRET, f"bench-{i}", chunks)
            best = min(best, time.perf_counter() - t0)
            inbox.take(f"bench-{i}", 1.0)
    finally:
        srv.close()
        await srv.wait_closed()
    return best


def decode_seconds(chunks: list[bytes], header: Header, repeats: int) -> float:
    """Best seconds of `repeats` runs of the receiver's decoder over the same chunks."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dec = PayloadDecoder(header.fingerprint)
        dec.feed_header(chunks[0])
        for c in chunks[1:]:
            dec.feed_frame(c)
        dec.finish()
        best = min(best, time.perf_counter() - t0)
    return best


async def _loopback_seconds(
    chunks: list[bytes], header: Header, repeats: int
) -> tuple[float, float]:
    """(best raw seconds, best push seconds)."""
    raw = min([await raw_seconds(chunks) for _ in range(repeats)])
    return raw, await push_seconds(chunks, header, repeats)


def run_push(
    shape: CacheShape, dtype: str, policies: list[tuple[str, float | None]], repeats: int
) -> list[PushRecord]:
    records = []
    for name, budget in policies:
        chunks, header = encode_payload(shape, dtype, name, budget)
        wire = sum(len(c) for c in chunks)

        raw, push = asyncio.run(_loopback_seconds(chunks, header, repeats))
        dec = decode_seconds(chunks, header, repeats)
        records.append(
            PushRecord(
                policy=name, budget=budget, dtype=dtype, wire_bytes=wire,
                raw_gbps=wire / raw / 1e9, push_gbps=wire / push / 1e9,
                decode_gbps=wire / dec / 1e9, push_over_raw=raw / push,
                transport_s=push - dec,
            )
        )  # fmt: skip
        print_row(records[-1])
    return records


def print_header(shape: CacheShape, dtype: str) -> None:
    print(
        f"payloads of a {shape.layers} x {shape.kv_heads} x {shape.head_dim} x {shape.tokens} "
        f"{dtype} cache over loopback TCP; GB/s of wire bytes, best of the runs"
    )
    print(
        f"{'policy':>13} {'budget':>6} {'wire_MB':>8} {'raw_gbps':>8} {'push_gbps':>9} "
        f"{'push/raw':>8} {'decode_gbps':>11} {'transport_ms':>12}"
    )


def print_row(r: PushRecord) -> None:
    print(
        f"{r.policy:>13} {str(r.budget):>6} {r.wire_bytes / 1e6:8.1f} {r.raw_gbps:8.2f} "
        f"{r.push_gbps:9.2f} {r.push_over_raw:8.1%} {r.decode_gbps:11.2f} "
        f"{r.transport_s * 1e3:12.1f}",
        flush=True,
    )


def write_json(records: list[PushRecord], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=1)
