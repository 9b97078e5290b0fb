"""The prefill worker: `spectrumkv serve prefill`.

Accepts authenticated TCP connections from decode workers. Per request it prefills the prompt,
plans and encodes layer by layer, and streams HEADER and FRAME messages (shaped to the requested
link rate) followed by DONE with the stage times. One model, one prefill at a time; requests on
other connections queue. A bad request gets an ERROR message, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import msgspec
import torch

from ..config import PolicyConfig, ScoreConfig
from ..engines.hf import Engine, prefill
from ..errors import SpectrumKVError
from ..transport.auth import server_handshake
from ..transport.framing import Channel, Kind, TransportError, serve
from ..transport.shaper import LinkShaper
from .protocol import ErrorReply, PrefillDone, PrefillRequest, decode_request, encode
from .streaming import StreamingEncoder

log = logging.getLogger("spectrumkv.prefill")
IDLE_TIMEOUT_S = 600.0
ROLE = b"decode->prefill"


class PrefillServer:
    def __init__(self, engine: Engine, secret: bytes) -> None:
        self.engine = engine
        self.secret = secret
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill")

    async def handle(self, ch: Channel) -> None:
        """One decode worker's connection (the channel is closed after it)."""
        try:
            await server_handshake(ch, self.secret, ROLE)
            while True:
                kind, body = await ch.recv(IDLE_TIMEOUT_S, max_bytes=16 << 20)
                if kind != Kind.REQUEST:
                    raise TransportError(f"expected a request, got {kind.name}")
                try:
                    req = decode_request(body)
                except msgspec.MsgspecError as e:
                    await ch.send(Kind.ERROR, encode(ErrorReply("", "BadRequest", str(e))))
                    continue
                await self.serve(req, ch)
        except TransportError as e:
            log.debug("connection ended: %s", e)

    async def serve(self, req: PrefillRequest, ch: Channel) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, chunk: bytes) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, chunk))

        try:
            opt = req.options
            policy = PolicyConfig(opt.policy, budget=opt.budget)
            scoring = ScoreConfig(layers=opt.score_layers)
            ids = torch.tensor(req.token_ids, dtype=torch.long)
            enc = StreamingEncoder(self.engine, ids, policy, scoring, emit)
        except (SpectrumKVError, ValueError) as e:
            err = ErrorReply(req.request_id, type(e).__name__, str(e))
            await ch.send(Kind.ERROR, encode(err))
            return

        shaper = LinkShaper(opt.link_gbps, opt.link_latency_s)
        sent = {"bytes": 0}

        async def sender() -> None:
            while (item := await queue.get()) is not None:
                kind, chunk = item
                await shaper.transmit(len(chunk))
                await ch.send(Kind.HEADER if kind == "header" else Kind.FRAME, chunk)
                sent["bytes"] += len(chunk)

        def run_prefill() -> float:
            if opt.overlap:
                prefill(self.engine, ids, on_layer=enc.on_layer)
                return time.perf_counter()
            layers: list = []
            prefill(self.engine, ids, on_layer=lambda i, kv, wq: layers.append((i, kv, wq)))
            done = time.perf_counter()
            for i, kv, wq in layers:
                enc.on_layer(i, kv, wq)
            return done

        send_task = asyncio.create_task(sender())
        t0 = time.perf_counter()
        try:
            prefill_end = await loop.run_in_executor(self.executor, run_prefill)
        except (SpectrumKVError, ValueError) as e:
            send_task.cancel()
            err = ErrorReply(req.request_id, type(e).__name__, str(e))
            await ch.send(Kind.ERROR, encode(err))
            return
        queue.put_nowait(None)
        await send_task
        sent_end = time.perf_counter()
        done = PrefillDone(
            request_id=req.request_id,
            prefill_s=prefill_end - t0,
            encode_s=enc.encode_s,
            wire_s=shaper.wire_s,
            transfer_exposed_s=max(0.0, sent_end - prefill_end),
            wire_bytes=sent["bytes"],
            fp16_bytes=enc.plan.fp16_bytes if enc.plan else 0,
            nominal_budget=enc.plan.nominal_budget if enc.plan else 0.0,
        )
        await ch.send(Kind.DONE, encode(done))


async def serve_prefill(
    engine: Engine, host: str, port: int, secret: bytes, tls: ssl.SSLContext | None = None
) -> None:
    """Serve until cancelled. `tls`: a server context (transport.tls.server_context) or None."""
    server = PrefillServer(engine, secret)
    srv = await serve(server.handle, host, port, tls)
    bound = srv.sockets[0].getsockname()[1]
    print(f"READY prefill {host}:{bound}", flush=True)
    async with srv:
        await srv.serve_forever()
