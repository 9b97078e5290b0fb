"""The prefill worker: `spectrumkv serve prefill`.

Accepts authenticated TCP connections from decode workers. Per request it prefills the prompt,
plans and encodes layer by layer, and streams HEADER and FRAME messages (shaped to the requested
link rate, within protocol.py's bounds) followed by DONE with the stage times. One model, one
prefill at a time; requests on other connections queue. A bad request gets an ERROR message,
never a crash. A request whose decode worker closes the connection is cancelled: skipped if it
is still queued, stopped at the next layer if it is prefilling, its frames dropped if sending.
Frames wait to be sent in a queue bounded in bytes (the prefill thread waits when it is full).
One log line per request. With `--scd-artifacts DIR`, SCD requests (`Kind.SCD_REQUEST`) are
answered with SCD codes made during the prefill (scd/serve_prefill.py), through the same
`stream` path. With `--prefill-batch N` (N > 1), KV requests queued together are prefilled
together, up to N per forward (pd/batcher.py), each streamed as if alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
import torch

from ..engines import omp
from ..engines.hf import Engine
from ..errors import SpectrumKVError
from ..scd.serve_prefill import ArtifactStore, serve_scd
from ..transport.auth import server_handshake
from ..transport.framing import Channel, Kind, TransportError, serve
from ..transport.shaper import LinkShaper
from .batcher import PrefillBatcher
from .protocol import (
    ErrorReply,
    PrefillDone,
    PrefillRequest,
    decode_request,
    encode,
    policy_configs,
)
from .sampling import Cancelled
from .streaming import StreamingEncoder

log = logging.getLogger("spectrumkv.prefill")
IDLE_TIMEOUT_S = 600.0
ROLE = b"decode->prefill"
#: Encoded frames of one request waiting to be sent, at most (bytes; one larger frame may wait
#: alone).
SEND_QUEUE_BYTES = 64 << 20


class ByteGate:
    """Bounds the bytes queued between the prefill thread (`acquire`, blocking) and the sender
    (`release`). `acquire` raises Cancelled once `cancel` is set."""

    def __init__(self, limit: int, cancel: threading.Event) -> None:
        self.limit, self.cancel = limit, cancel
        self.queued = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.queued and self.queued + n > self.limit:
                if self.cancel.is_set():
                    raise Cancelled("the decode worker went away")
                self._cond.wait(0.1)
            if self.cancel.is_set():
                raise Cancelled("the decode worker went away")
            self.queued += n

    def release(self, n: int) -> None:
        with self._cond:
            self.queued -= n
            self._cond.notify_all()


class PrefillServer:
    """`scd`: the SCD artifacts this worker serves (None: SCD requests are refused).
    `batch`: KV requests prefilled together per forward, at most (1: one at a time)."""

    def __init__(
        self, engine: Engine, secret: bytes, scd: ArtifactStore | None = None, batch: int = 1
    ) -> None:
        self.engine = engine
        self.secret = secret
        self.scd = scd
        self.model_lock = threading.Lock()  # one forward at a time
        self.batcher = PrefillBatcher(engine, batch, self.model_lock)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")
        # batched KV requests wait in the batcher, one thread each (see pd/batcher.py)
        self.batch_executor = (
            ThreadPoolExecutor(max_workers=64, thread_name_prefix="prefill-batch")
            if self.batcher.size > 1
            else None
        )

    async def handle(self, ch: Channel) -> None:
        """One decode worker's connection (the channel is closed after it)."""
        try:
            await server_handshake(ch, self.secret, ROLE)
            while True:
                kind, body = await ch.recv(IDLE_TIMEOUT_S, max_bytes=16 << 20)
                if kind == Kind.SCD_REQUEST:
                    await serve_scd(self, body, ch)
                    continue
                if kind != Kind.REQUEST:
                    raise TransportError(f"expected a request, got {kind.name}")
                try:
                    req = decode_request(body)
                except msgspec.MsgspecError as e:
                    await self.refuse(ch, e)
                    continue
                await self.serve(req, ch)
        except TransportError as e:
            log.debug("connection ended: %s", e)

    async def refuse(self, ch: Channel, e: Exception) -> None:
        """Answer a request that does not parse with an ERROR message."""
        log.info("refused a malformed request from %s: %s", ch.peer, e)
        await ch.send(Kind.ERROR, encode(ErrorReply("", "BadRequest", str(e))))

    async def serve(self, req: PrefillRequest, ch: Channel) -> None:
        """One KV request; logs one line with its outcome."""
        what = f"{req.request_id}: {len(req.token_ids)} tokens, {req.options.policy} "
        await self.serve_one(what + f"b={req.options.budget}", req.request_id, ch,
                             lambda cancel: self._run(req, ch, cancel))  # fmt: skip

    async def serve_one(
        self,
        what: str,
        rid: str,
        ch: Channel,
        run: Callable[[threading.Event], Awaitable[PrefillDone]],
    ) -> None:
        """Run one request (`run(cancel)`, cancel set when the decode worker goes away): an
        ERROR message for a failure, one log line with the outcome."""
        t0 = time.perf_counter()
        cancel = threading.Event()
        watcher = asyncio.create_task(ch.wait_closed())
        watcher.add_done_callback(lambda _: cancel.set())
        try:
            done = await run(cancel)
        except (SpectrumKVError, ValueError) as e:
            outcome = f"{type(e).__name__}: {e}"
            if not isinstance(e, (Cancelled, TransportError)):
                err = ErrorReply(rid, type(e).__name__, str(e))
                with contextlib.suppress(TransportError):
                    await ch.send(Kind.ERROR, encode(err))
            log.info("%s -> %s after %.2f s", what, outcome, time.perf_counter() - t0)
            return
        finally:
            watcher.cancel()
        log.info(
            "%s -> ok: %d bytes (%.3f of fp16), queued %.2f s, prefill %.2f s, exposed %.3f s, "
            "total %.2f s",
            what,
            done.wire_bytes,
            done.wire_bytes / done.fp16_bytes if done.fp16_bytes else 0.0,
            done.queued_s,
            done.prefill_s,
            done.transfer_exposed_s,
            time.perf_counter() - t0,
        )

    async def _run(self, req: PrefillRequest, ch: Channel, cancel: threading.Event) -> PrefillDone:
        opt = req.options
        policy, scoring = policy_configs(opt)
        ids = torch.tensor(req.token_ids, dtype=torch.long)
        encoders: list[StreamingEncoder] = []

        def start(emit: Callable[[str, bytes], None]) -> Callable:
            encoders.append(StreamingEncoder(self.engine, ids, policy, scoring, emit))
            return encoders[0].on_layer

        def run(on_layer: Callable) -> float:
            return self.batcher.prefill(ids, on_layer, cancel)

        shaper = LinkShaper(opt.link_gbps, opt.link_latency_s)
        s = await self.stream(ch, cancel, shaper, opt.overlap, start, run, batched=True)
        enc = encoders[0]
        done = PrefillDone(
            request_id=req.request_id,
            prefill_s=s.prefill_s,
            queued_s=s.queued_s,
            encode_s=enc.encode_s,
            wire_s=shaper.wire_s,
            transfer_exposed_s=s.exposed_s,
            wire_bytes=s.sent,
            fp16_bytes=enc.plan.fp16_bytes if enc.plan else 0,
            nominal_budget=enc.plan.nominal_budget if enc.plan else 0.0,
        )
        await ch.send(Kind.DONE, encode(done))
        return done

    async def stream(
        self,
        ch: Channel,
        cancel: threading.Event,
        shaper: LinkShaper,
        overlap: bool,
        start: Callable[[Callable[[str, bytes], None]], Callable],
        run: Callable[[Callable], float | None],
        batched: bool = False,
    ) -> Streamed:
        """Send what a prefill emits while it runs. `start(emit)` (on the event loop) makes the
        encoder and returns its per-layer hook; `run(hook)` (on the prefill thread) prefills,
        calling the hook per layer. `emit(kind, chunk)` ("header" | "frame") queues a chunk
        (bounded by SEND_QUEUE_BYTES); a sender sends it through `shaper`. overlap=False:
        frames are made only after the whole prefill, as a pull-after-prefill connector does.
        batched=False: `run` runs on the one prefill thread under the model lock; True: `run`
        takes the lock itself (the batcher) and returns when its forward started."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gate = ByteGate(SEND_QUEUE_BYTES, cancel)
        sent = 0

        def emit(kind: str, chunk: bytes) -> None:
            gate.acquire(len(chunk))
            loop.call_soon_threadsafe(queue.put_nowait, (kind, chunk))

        hook = start(emit)

        async def sender() -> None:
            nonlocal sent
            while (item := await queue.get()) is not None:
                kind, chunk = item
                await shaper.transmit(len(chunk))
                await ch.send(Kind.HEADER if kind == "header" else Kind.FRAME, chunk)
                gate.release(len(chunk))
                sent += len(chunk)

        def on_layer(*args) -> None:
            if cancel.is_set():
                raise Cancelled("the decode worker went away")
            hook(*args)

        def forward(hook: Callable) -> None:
            nonlocal started
            if batched:
                started = run(hook) or started
                return
            with self.model_lock:
                run(hook)

        def run_prefill() -> float:
            try:
                return prefill_here()
            finally:  # the next forward may run on another thread (pd/batcher.py)
                omp.release()

        def prefill_here() -> float:
            nonlocal started
            started = time.perf_counter()
            if cancel.is_set():  # it left while this request queued
                raise Cancelled("the decode worker went away before prefill started")
            if overlap:
                forward(on_layer)
                return time.perf_counter()
            layers: list = []
            forward(lambda *a: layers.append(a))
            done = time.perf_counter()
            for layer in layers:
                on_layer(*layer)
            return done

        send_task = asyncio.create_task(sender())
        t0 = started = time.perf_counter()
        try:
            pool = self.batch_executor if batched and self.batch_executor else self.executor
            prefill_end = await loop.run_in_executor(pool, run_prefill)
            queue.put_nowait(None)
            closed = asyncio.create_task(ch.wait_closed())
            await asyncio.wait([send_task, closed], return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            if not send_task.done():
                raise Cancelled("the decode worker went away while frames were sent")
            send_task.result()
        finally:
            cancel.set()  # wakes a prefill thread waiting on the gate
            send_task.cancel()
        end = time.perf_counter()
        return Streamed(prefill_end - started, max(0.0, end - prefill_end), sent, started - t0)


@dataclass
class Streamed:
    """What `PrefillServer.stream` did: prefill seconds (from when the prefill thread took the
    request), seconds of sending left after the prefill ended, bytes sent, and seconds the
    request waited for the prefill thread (behind other requests) before that."""

    prefill_s: float
    exposed_s: float
    sent: int
    queued_s: float = 0.0


async def serve_prefill(
    engine: Engine,
    host: str,
    port: int,
    secret: bytes,
    tls: ssl.SSLContext | None = None,
    scd_artifacts: str | None = None,
    batch: int = 1,
) -> None:
    """Serve until cancelled. `tls`: a server context (transport.tls.server_context) or None.
    `scd_artifacts`: a directory of SCD artifacts this worker answers SCD requests with.
    `batch`: KV requests prefilled together per forward, at most (pd/batcher.py)."""
    scd = ArtifactStore(scd_artifacts, engine) if scd_artifacts else None
    server = PrefillServer(engine, secret, scd, batch)
    omp.hand_over()  # the forwards run on executor threads (engines.omp)
    srv = await serve(server.handle, host, port, tls)
    bound = srv.sockets[0].getsockname()[1]
    print(f"READY prefill {host}:{bound}", flush=True)
    async with srv:
        await srv.serve_forever()
