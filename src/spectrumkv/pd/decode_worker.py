"""The decode worker: `spectrumkv serve decode`, with an OpenAI-compatible HTTP front.

POST /v1/completions {prompt, max_tokens, stream, spectrumkv: {policy, budget, ...}}: the worker
tokenizes, asks the prefill worker for the KV of all prompt tokens but the last (over an
authenticated TCP connection), verifies and unpacks frames as they arrive, and generates.
GET /metrics: Prometheus. Every wait has a deadline; a lost peer, a bad frame or a missing layer
ends either in a local recompute (`on_failure="recompute"`: this worker prefills the prompt
itself) or in a clear HTTP error (`on_failure="fail"`), never in a hang or a broken cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import msgspec
import torch
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..engines.hf import Engine, decode_state, generate, prefill
from ..errors import IncompatiblePayloadError, SpectrumKVError
from ..payload import PayloadDecoder
from ..pipeline import reference_state, split_prompt
from ..transport.auth import client_handshake
from ..transport.framing import Channel, Kind, PeerTimeout, TransportError, connect
from ..transport.tls import client_context
from ..transport.unpack import Unpacker
from ..wire import tokens_digest
from .metrics import Metrics
from .prefill_worker import ROLE
from .protocol import ErrorReply, PrefillDone, PrefillRequest, TransferOptions, with_overrides

log = logging.getLogger("spectrumkv.decode")


@dataclass(frozen=True)
class DecodeConfig:
    """prefill_host/port: the prefill worker. deadline_s: for the whole KV transfer (seconds).
    on_failure: "recompute" or "fail". `transfer`: defaults for requests that do not say
    otherwise (a request's `spectrumkv` field may override any of them). `tls_ca`: PEM file of
    the CA (or self-signed certificate) the prefill worker's TLS certificate must chain to;
    None = plain TCP."""

    prefill_host: str
    prefill_port: int
    secret: bytes
    deadline_s: float = 60.0
    on_failure: str = "recompute"
    transfer: TransferOptions = TransferOptions()
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if self.on_failure not in ("recompute", "fail"):
            raise ValueError(f"on_failure must be recompute or fail, got {self.on_failure!r}")


@dataclass
class Transfer:
    """What arrived for one request, with stage times in seconds. `unpack_s`: all verify +
    decode work; `unpack_tail_s`: the part left after the last byte arrived (the rest overlapped
    with the transfer)."""

    layers: list = field(default_factory=list)
    n_tokens: int = 0
    done: PrefillDone | None = None
    unpack_s: float = 0.0
    unpack_tail_s: float = 0.0


class TransferFailed(SpectrumKVError):
    """The KV transfer failed; the message says why."""


class DecodeWorker:
    def __init__(self, engine: Engine, cfg: DecodeConfig) -> None:
        self.engine, self.cfg = engine, cfg
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        # verify + decode frames off the event loop, in arrival order, while the socket keeps
        # receiving (the codec releases the GIL)
        self.unpacker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unpack")
        self.in_flight: dict[str, float] = {}
        self.tls = client_context(cfg.tls_ca) if cfg.tls_ca else None

    async def fetch_kv(self, req: PrefillRequest) -> Transfer:
        """Receive and verify the KV of `req` from the prefill worker within the deadline."""
        out = Transfer()
        dec = PayloadDecoder(expect=self.engine.fingerprint)
        deadline = time.monotonic() + self.cfg.deadline_s
        ch: Channel | None = None
        unpacker = Unpacker(self.unpacker)
        try:
            async with asyncio.timeout(self.cfg.deadline_s):
                ch = await connect(self.cfg.prefill_host, self.cfg.prefill_port, self.tls)
                await client_handshake(ch, self.cfg.secret, ROLE)
                await ch.send(Kind.REQUEST, msgspec.json.encode(req))

            def unpack(feed, body: bytes) -> None:
                t0 = time.perf_counter()
                feed(body)
                out.unpack_s += time.perf_counter() - t0

            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeout("KV transfer deadline passed")
                kind, body = await ch.recv(left)
                if kind in (Kind.HEADER, Kind.FRAME):
                    feed = dec.feed_header if kind == Kind.HEADER else dec.feed_frame
                    left = max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(unpacker.feed(partial(unpack, feed), body), left)
                elif kind == Kind.DONE:
                    out.done = msgspec.json.decode(body, type=PrefillDone)
                    t_last = time.perf_counter()
                    left = max(0.0, deadline - time.monotonic())
                    await asyncio.wait_for(unpacker.drain(), left)
                    out.unpack_tail_s = time.perf_counter() - t_last
                    break
                elif kind == Kind.ERROR:
                    err = msgspec.json.decode(body, type=ErrorReply)
                    raise TransferFailed(f"prefill worker: {err.error}: {err.message}")
                else:
                    raise TransportError(f"unexpected {kind.name} message")
            payload = dec.finish()
            if payload.header.tokens_digest != tokens_digest(req.token_ids):
                raise IncompatiblePayloadError("the KV payload is not for this request's prompt")
            out.layers, out.n_tokens = payload.layers, payload.header.n_tokens
            return out
        except TimeoutError:
            raise PeerTimeout("KV transfer deadline passed") from None
        except msgspec.MsgspecError as e:  # a DONE or ERROR message that does not parse
            raise TransportError(f"malformed message from prefill worker: {e}") from None
        finally:
            if ch is not None:
                ch.close()
            unpacker.abandon()  # after a failure: drop queued frames, collect their errors

    def _generate(self, ids: torch.Tensor, transfer: Transfer | None, max_tokens: int, emit):
        """Model work, on the decode thread. `transfer` None = recompute locally."""
        context, last = split_prompt(ids)
        if transfer is None:
            state = reference_state(self.engine, prefill(self.engine, context))
        else:
            state = decode_state(self.engine, transfer.layers, transfer.n_tokens)
        generate(self.engine, state, last, max_tokens, emit)

    async def complete(self, body: dict, on_token) -> dict:
        """Run one completion; `on_token(text_piece)` is awaited for every generated token."""
        rid = f"cmpl-{uuid.uuid4().hex[:16]}"
        t_start = time.perf_counter()
        opts = dict(body.get("spectrumkv") or {})
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "prompt must be a non-empty string"})
            )
        max_tokens = int(body.get("max_tokens", 16))
        if not 1 <= max_tokens <= 4096:
            raise web.HTTPBadRequest(text=json.dumps({"error": "max_tokens must be in 1..4096"}))
        tok = self.engine.tokenizer
        if opts.get("chat"):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"][0]
        else:
            ids = tok(prompt, return_tensors="pt")["input_ids"][0]
        if ids.numel() < 2:
            raise web.HTTPBadRequest(text=json.dumps({"error": "prompt needs >= 2 tokens"}))
        on_failure = opts.pop("on_failure", self.cfg.on_failure)
        opts.pop("chat", None)
        try:
            options = with_overrides(self.cfg.transfer, opts)
        except msgspec.ValidationError as e:
            msg = json.dumps({"error": f"bad spectrumkv options: {e}"})
            raise web.HTTPBadRequest(text=msg) from None
        req = PrefillRequest(request_id=rid, token_ids=ids[:-1].tolist(), options=options)
        self.in_flight[rid] = t_start
        self.metrics.in_flight.inc()
        try:
            transfer: Transfer | None
            outcome = "ok"
            try:
                transfer = await self.fetch_kv(req)
            except SpectrumKVError as e:
                log.warning("%s: KV transfer failed: %s: %s", rid, type(e).__name__, e)
                if on_failure != "recompute":
                    self.metrics.requests.labels("failed").inc()
                    raise web.HTTPBadGateway(
                        text=json.dumps({"error": f"KV transfer failed: {type(e).__name__}: {e}"}),
                        content_type="application/json",
                    ) from None
                transfer, outcome = None, "recomputed"
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def emit(t: int) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, t)

            job = loop.run_in_executor(
                self.executor, self._generate, ids, transfer, max_tokens, emit
            )
            job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
            tokens: list[int] = []
            ttft = None
            while (t := await queue.get()) is not None:
                if ttft is None:
                    ttft = time.perf_counter() - t_start
                tokens.append(t)
                await on_token(tok.decode([t], skip_special_tokens=True))
            await job
            stats = self._stats(transfer, ttft, outcome)
            stats["token_ids"] = tokens
            self.metrics.requests.labels(outcome).inc()
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.engine.name,
                "choices": [
                    {
                        "index": 0,
                        "text": tok.decode(tokens, skip_special_tokens=True),
                        "finish_reason": "length" if len(tokens) >= max_tokens else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": int(ids.numel()),
                    "completion_tokens": len(tokens),
                    "total_tokens": int(ids.numel()) + len(tokens),
                },
                "spectrumkv": stats,
            }
        finally:
            self.in_flight.pop(rid, None)
            self.metrics.in_flight.dec()

    def _stats(self, transfer: Transfer | None, ttft: float | None, outcome: str) -> dict:
        stats: dict = {"outcome": outcome, "ttft_s": ttft}
        m = self.metrics
        if ttft is not None:
            m.stage.labels("ttft").observe(ttft)
        if transfer is not None and transfer.done is not None:
            d = transfer.done
            stats.update(
                prefill_s=d.prefill_s,
                encode_s=d.encode_s,
                wire_s=d.wire_s,
                transfer_exposed_s=d.transfer_exposed_s,
                unpack_s=transfer.unpack_s,
                unpack_tail_s=transfer.unpack_tail_s,
                wire_bytes=d.wire_bytes,
                fp16_bytes=d.fp16_bytes,
                wire_ratio=d.wire_bytes / d.fp16_bytes if d.fp16_bytes else None,
            )
            m.record_transfer(d.wire_bytes, d.fp16_bytes)
            for stage in ("prefill", "encode", "transfer_exposed"):
                m.stage.labels(stage).observe(getattr(d, f"{stage}_s"))
            m.stage.labels("unpack").observe(transfer.unpack_s)
            m.stage.labels("unpack_tail").observe(transfer.unpack_tail_s)
        return stats

    # --- HTTP -----------------------------------------------------------------------------
    async def http_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise web.HTTPBadRequest(text=json.dumps({"error": "body must be JSON"})) from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "body must be a JSON object"}))
        if not body.get("stream"):

            async def ignore(_: str) -> None:
                return None

            return web.json_response(await self.complete(body, ignore))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send_piece(text: str) -> None:
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": text}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        try:
            final = await self.complete(body, send_piece)
            final["choices"][0]["text"] = ""
            await resp.write(f"data: {json.dumps(final)}\n\n".encode())
        except web.HTTPException as e:
            await resp.write(f"data: {json.dumps({'error': e.text})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def http_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def http_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "in_flight": len(self.in_flight)})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/v1/completions", self.http_completions)
        app.router.add_get("/metrics", self.http_metrics)
        app.router.add_get("/health", self.http_health)
        return app


async def serve_decode(engine: Engine, cfg: DecodeConfig, host: str, port: int) -> None:
    worker = DecodeWorker(engine, cfg)
    runner = web.AppRunner(worker.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"READY decode {host}:{bound}", flush=True)
    await asyncio.Event().wait()
