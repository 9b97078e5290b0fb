"""The decode worker: `spectrumkv serve decode`, with an OpenAI-compatible HTTP front.

POST /v1/completions and /v1/chat/completions (openai.py validates the request; `stream`,
`temperature`, `top_p`, `n`, `seed`, `stop` are honored, anything else is refused by name): the
worker tokenizes, asks the prefill worker for the KV of all prompt tokens but the last (over an
authenticated TCP connection), verifies and unpacks frames as they arrive, and generates.
GET /v1/models, /health (reports the prefill peer; 503 while it is unusable), /metrics.

Every wait has a deadline; a lost peer, a bad frame or a missing layer ends either in a local
recompute (`on_failure="recompute"`: this worker prefills the prompt itself, and the response
says why) or in an HTTP 502 (`on_failure="fail"`), never in a hang or a broken cache. A peer
that keeps failing opens a circuit breaker (breaker.py). A client that goes away stops its
generation before the next token and closes its KV transfer, which cancels the prefill.

With `--scd ARTIFACT` (model B served from model A's prefill worker) the request's
`spectrumkv.method` picks SCD codes, A's raw KV, recompute or a KV payload
(scd/serve_decode.py); the receive loop for every method is pd/fetch.py's.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..engines import omp
from ..engines.hf import Engine, decode_state, prefill
from ..errors import SpectrumKVError
from ..pipeline import reference_state, split_prompt
from ..scd.serve_decode import ScdClient, resolve_method
from ..serve.requests import PoolBusy, RequestTooLarge
from ..transport.auth import AuthError, client_handshake
from ..transport.framing import Channel, Kind, TransportError, connect
from ..transport.tls import client_context
from ..wire import tokens_digest
from . import openai
from .breaker import CircuitBreaker
from .fetch import KvReceiver, Transfer, fetch
from .metrics import Metrics
from .openai import ApiError, Job, ServerDefaults
from .prefill_worker import ROLE
from .protocol import PrefillRequest
from .sampling import Cancelled, generate_choices

log = logging.getLogger("spectrumkv.decode")
#: How long /health waits for the prefill peer to connect and authenticate (seconds).
HEALTH_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class DecodeConfig:
    """prefill_host/port: the prefill worker. deadline_s: for the whole KV transfer (seconds).
    `defaults`: what requests get for what they do not say. `tls_ca`: PEM file of the CA (or
    self-signed certificate) the prefill worker's TLS certificate must chain to; None = plain
    TCP. breaker_threshold / breaker_cooldown_s: see breaker.py (0 = no breaker)."""

    prefill_host: str
    prefill_port: int
    secret: bytes
    deadline_s: float = 60.0
    defaults: ServerDefaults = ServerDefaults()
    tls_ca: str | None = None
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 10.0
    engine: str = "batched"  # serve.BatchEngine (continuous batching) or "sequential"
    kv_pool_mb: float = 0.0  # batched: KV page pool, MiB (0 = serve.engine.default_pool_mb)
    attention_route: str = "adaptive"  # batched: paged decode-attention route
    attention_profile: str | None = None  # batched: machine profile JSON (None: this machine's)
    kv_queue_timeout_s: float = 30.0  # batched: longest wait for KV pages, then HTTP 503
    scd_artifact: str | None = None  # SCD artifact dir: B rebuilds its cache from A's codes


class DecodeWorker:
    def __init__(self, engine: Engine, cfg: DecodeConfig) -> None:
        openai.validate_defaults(cfg.defaults)
        self.engine, self.cfg = engine, cfg
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        # verify + decode frames off the event loop, in arrival order, while the socket keeps
        # receiving (the codec releases the GIL); its torch ops (an SCD rebuild's matmuls too)
        # run on this one thread, beside the engine's team, not as a second team (engines.omp)
        self.unpacker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="unpack", initializer=omp.single
        )
        self.in_flight: dict[str, float] = {}
        self.tls = client_context(cfg.tls_ca) if cfg.tls_ca else None
        self.breaker = CircuitBreaker(cfg.breaker_threshold, cfg.breaker_cooldown_s)
        self.scd = None  # --scd: B rebuilds its cache from model A's SCD codes
        if cfg.scd_artifact:
            self.scd = ScdClient(cfg.scd_artifact, engine, self.metrics.registry)
        self.batch = None
        if cfg.engine == "batched":
            from ..serve import metrics as engine_metrics
            from ..serve.engine import BatchEngine, EngineConfig, default_pool_mb

            pool = cfg.kv_pool_mb or default_pool_mb()
            ecfg = EngineConfig(pool_mb=pool, queue_timeout_s=cfg.kv_queue_timeout_s,
                                route=cfg.attention_route,
                                attention_profile=cfg.attention_profile)  # fmt: skip
            self.batch = BatchEngine(engine, ecfg)
            engine_metrics.attach(self.batch, self.metrics.registry)
            # one blocked thread per request waiting on the engine (the engine has its own)
            self.waiters = ThreadPoolExecutor(
                max_workers=256, thread_name_prefix="batch-wait", initializer=omp.single
            )
        elif cfg.engine != "sequential":
            raise ValueError(f"engine must be sequential or batched, got {cfg.engine!r}")

    def close(self) -> None:
        """Stop the batch engine's thread (requests still in it fail with "the engine was
        closed") and the worker's thread pools. Idempotent; the worker serves nothing after."""
        if self.batch is not None:
            self.batch.close()
            self.waiters.shutdown(wait=False, cancel_futures=True)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.unpacker.shutdown(wait=False, cancel_futures=True)

    async def open_channel(self) -> Channel:
        """Connect and authenticate to the prefill worker (the caller bounds the time)."""
        ch = await connect(self.cfg.prefill_host, self.cfg.prefill_port, self.tls)
        try:
            await client_handshake(ch, self.cfg.secret, ROLE)
        except BaseException:
            ch.close()
            raise
        return ch

    async def fetch_kv(self, req: PrefillRequest) -> Transfer:
        """Receive and verify the KV of `req` from the prefill worker within the deadline."""
        rx = KvReceiver(self.engine.fingerprint, tokens_digest(req.token_ids))
        body = msgspec.json.encode(req)
        return await fetch(self.open_channel, Kind.REQUEST, body, rx, self.cfg.deadline_s,
                           self.unpacker)  # fmt: skip

    async def _transfer(
        self, rid: str, job: Job, method: str
    ) -> tuple[Transfer | None, str | None]:
        """The request's KV (method kv), SCD-rebuilt cache (scd) or A's raw KV (raw), or
        (None, why) when it will be recomputed ((None, None) for method recompute). Raises
        ApiError 502 with on_failure="fail"."""
        if method == "recompute":
            return None, None
        if not self.breaker.allow():
            left = self.breaker.cooldown_s - (time.monotonic() - (self.breaker.opened_at or 0))
            why = f"circuit open for {max(0.0, left):.1f} s more after: {self.breaker.last_error}"
            return None, self._fallback(rid, job, why)
        req = PrefillRequest(rid, job.ids[:-1].tolist(), job.transfer)
        try:
            if method == "kv":
                transfer = await self.fetch_kv(req)
            else:
                transfer = await self.scd.fetch(self, method, rid, job)
        except (PoolBusy, RequestTooLarge) as e:  # no pages for the rebuilt cache (SCD)
            raise pool_error(e) from None
        except TransportError as e:  # the peer: unreachable, refused, closed, stalled
            self.breaker.failure(f"{type(e).__name__}: {e}")
            return None, self._fallback(rid, job, f"{type(e).__name__}: {e}")
        except SpectrumKVError as e:  # this request: its plan, a frame, the payload
            self.breaker.success()
            return None, self._fallback(rid, job, f"{type(e).__name__}: {e}")
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        return transfer, None

    def _fallback(self, rid: str, job: Job, why: str) -> str:
        log.warning("%s: KV transfer failed (%s): %s", rid, job.on_failure, why)
        if job.on_failure != "recompute":
            self.metrics.requests.labels("failed").inc()
            raise ApiError(
                502, f"KV transfer failed: {why}", type="server_error", code="kv_transfer_failed"
            )
        return why

    def _generate(self, job: Job, transfer: Transfer | None, on_piece, cancel: threading.Event):
        """Model work, on the decode thread. `transfer` None = recompute locally."""
        context, last = split_prompt(job.ids)
        if transfer is None:

            def check(*_) -> None:
                if cancel.is_set():
                    raise Cancelled("the client went away")

            state = reference_state(self.engine, prefill(self.engine, context, on_layer=check))
        else:
            state = decode_state(self.engine, transfer.layers, transfer.n_tokens)
        return generate_choices(self.engine, state, last, job.sampling, on_piece, cancel)

    def _generate_batched(self, job: Job, transfer: Transfer | None, on_piece, cancel):
        """`_generate` on the batch engine; a full pool is HTTP 503 with Retry-After."""
        from ..serve.worker import generate_batched

        layers, n = (transfer.layers, transfer.n_tokens) if transfer is not None else (None, 0)
        try:
            return generate_batched(self.batch, job.ids, layers, n, job.sampling, on_piece, cancel)
        except (PoolBusy, RequestTooLarge) as e:
            raise pool_error(e) from None

    async def run(self, job: Job, rid: str, on_piece) -> dict:
        """Serve one validated request; `on_piece(index, text)` is awaited for each non-empty
        piece of text. Cancelling the task stops generation and the transfer at once."""
        t_start = time.perf_counter()
        self.in_flight[rid] = t_start
        self.metrics.in_flight.inc()
        cancel = threading.Event()
        try:
            method = resolve_method(job, self.scd)
            transfer, why = await self._transfer(rid, job, method)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()

            def piece(index: int, text: str) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, text))

            if self.batch is None:
                fut = loop.run_in_executor(
                    self.executor, self._generate, job, transfer, piece, cancel
                )
            else:
                fut = loop.run_in_executor(
                    self.waiters, self._generate_batched, job, transfer, piece, cancel
                )

            def finished(f: asyncio.Future) -> None:
                if not f.cancelled():
                    f.exception()  # retrieved here; `await fut` re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, None)

            fut.add_done_callback(finished)
            ttft = None
            while (item := await queue.get()) is not None:
                if ttft is None:
                    ttft = time.perf_counter() - t_start
                if item[1]:
                    await on_piece(*item)
            choices = await fut
            outcome = "ok" if why is None else "recomputed"
            stats = self._stats(transfer, ttft, outcome) | {"method": method}
            if why is not None:
                stats["reason"] = why
            self.metrics.requests.labels(outcome).inc()
            return openai.response(job, rid, self.engine.name, choices, stats)
        except (asyncio.CancelledError, ConnectionResetError):
            waited = time.perf_counter() - t_start
            log.info("%s: client went away after %.1f s: generation stopped", rid, waited)
            self.metrics.requests.labels("cancelled").inc()
            raise
        finally:
            cancel.set()
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
                prefill_queued_s=d.queued_s,
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
            if transfer.method == "scd":
                stats["reconstruct_s"] = transfer.reconstruct_s
            m.record_transfer(d.wire_bytes, d.fp16_bytes)
            for stage in ("prefill", "encode", "transfer_exposed"):
                m.stage.labels(stage).observe(getattr(d, f"{stage}_s"))
            m.stage.labels("unpack").observe(transfer.unpack_s)
            m.stage.labels("unpack_tail").observe(transfer.unpack_tail_s)
        return stats

    async def peer_health(self) -> dict:
        """Connect and authenticate to the prefill worker now (HEALTH_TIMEOUT_S at most)."""
        peer = {
            "address": f"{self.cfg.prefill_host}:{self.cfg.prefill_port}",
            "reachable": False,
            "authenticated": False,
            "breaker": self.breaker.state,
            "error": None,
        }
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                ch = await connect(self.cfg.prefill_host, self.cfg.prefill_port, self.tls)
                peer["reachable"] = True
                try:
                    await client_handshake(ch, self.cfg.secret, ROLE)
                finally:
                    ch.close()
            peer["authenticated"] = True
        except AuthError as e:
            peer["error"] = str(e)
        except TransportError as e:
            peer["error"] = f"{type(e).__name__}: {e}"
        except TimeoutError:
            peer["error"] = f"no answer within {HEALTH_TIMEOUT_S} s"
        return peer

    # --- HTTP -----------------------------------------------------------------------------
    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        job = openai.parse(self.engine, self.cfg.defaults, await request.read(), chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        if not job.stream:

            async def ignore(index: int, text: str) -> None:
                return None

            return web.json_response(await self.run(job, rid, ignore))
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

        async def send(index: int, text: str) -> None:
            if not resp.prepared:  # headers go out with the first token: errors before it
                await resp.prepare(request)  # are plain HTTP errors
            await resp.write(openai.sse(openai.chunk(job, rid, self.engine.name, index, text)))

        try:
            final = await self.run(job, rid, send)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as e:
            if not resp.prepared:
                raise  # a plain HTTP error (openai.json_errors)
            if not isinstance(e, ApiError):
                log.exception("%s: failed while streaming", rid)
                e = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            await resp.write(openai.sse(e.body()))  # one well-formed error event
        else:
            if not resp.prepared:
                await resp.prepare(request)
            await resp.write(openai.sse(openai.final_chunk(final)))
        await resp.write(openai.sse("[DONE]"))
        return resp

    async def http_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def http_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def http_models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.engine.name,
            "object": "model",
            "created": 0,
            "owned_by": "spectrumkv",
            "max_model_len": openai.context_limit(self.engine),
        }
        return web.json_response({"object": "list", "data": [model]})

    async def http_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def http_health(self, request: web.Request) -> web.Response:
        peer = await self.peer_health()
        ok = peer["authenticated"] and peer["breaker"] != "open"
        body = {"ok": ok, "in_flight": len(self.in_flight), "prefill": peer}
        if self.batch is not None:  # where the adaptive route's cost model comes from
            body["attention_profile"] = self.batch.profile_source
        return web.json_response(body, status=200 if ok else 503)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 << 20, middlewares=[openai.json_errors])
        app.router.add_post("/v1/completions", self.http_completions)
        app.router.add_post("/v1/chat/completions", self.http_chat)
        app.router.add_get("/v1/models", self.http_models)
        app.router.add_get("/metrics", self.http_metrics)
        app.router.add_get("/health", self.http_health)
        return app


def pool_error(e: PoolBusy | RequestTooLarge) -> ApiError:
    """The batch engine's refusal as the client sees it: a full pool is 503 with Retry-After, a
    request larger than the whole pool 400."""
    if isinstance(e, RequestTooLarge):
        return ApiError(400, str(e), param="max_tokens", code="kv_pool_too_small")
    retry = {"Retry-After": str(math.ceil(e.retry_after_s))}
    return ApiError(503, str(e), "server_error", code="kv_pool_full", headers=retry)


async def serve_decode(engine: Engine, cfg: DecodeConfig, host: str, port: int) -> None:
    worker = DecodeWorker(engine, cfg)
    # the model runs on the engine's (or the sequential executor's) thread: this one, which
    # loaded it and now serves HTTP, releases its OpenMP team so that one keeps spinning
    # workers (engines.omp)
    omp.hand_over()
    # handler_cancellation: a client that disconnects cancels its handler (and so its work)
    runner = web.AppRunner(worker.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"READY decode {host}:{bound}", flush=True)
    await asyncio.Event().wait()
