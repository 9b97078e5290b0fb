"""The decode worker's SCD side (`serve decode --model B --scd ARTIFACT`): per request, B asks
model A's prefill worker for SCD codes (naming the artifact by digest), verifies each frame as it
arrives and rebuilds that layer of B's cache at once (`codes.reconstruct_layer`, on the unpack
thread, overlapping the transfer), then generates from it. On the batch engine each rebuilt layer
goes straight into the request's pages (reserved before the request is sent: `BatchEngine.stage`),
so the whole rebuilt cache never exists outside them; any failure aborts the staged pages. Codes
under a budget that drops tokens (`budget.may_drop`) are rebuilt into a list of layers holding the
kept positions, which the engine takes as it takes a received KV payload. So is the cache of an
artifact with a refresh (`head_tokens` / `tail_tokens`, `scd.refresh`): B asks for codes of all
but the prompt's last `tail_tokens` tokens, then recomputes those and the first `head_tokens`
itself (on the unpack thread, counted in `reconstruct_s`); the response's `fp16_bytes` (and so
`wire_ratio`) stay the raw FP16 KV of the whole prompt, what a raw transfer would send.

Methods (the request's `spectrumkv.method`; default `scd` on such a worker): `scd` (codes, FP16
or quantized under `spectrumkv.code_budget`), `recompute` (B's own prefill), `raw` (A's FP16 KV
used as-is by B: a baseline, only when a request asks for it by name), `kv` (a KV payload,
which from a prefill worker of another model is refused by its fingerprint and recomputed).
Failures end as KV failures do (recompute or HTTP 502), with the reason.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from ..engines.hf import Engine
from ..errors import IncompatiblePayloadError
from ..kv import LayerKV
from ..pd.fetch import KvReceiver, Transfer, fetch
from ..pd.openai import ApiError, Job
from ..pd.protocol import PrefillRequest, TransferOptions
from ..policy import raw_kv_bytes
from ..serve.engine import BatchEngine
from ..serve.staged import StagedPrompt
from ..transport.framing import Kind
from ..wire import tokens_digest
from .artifact import Artifact, ArtifactMismatchError, load
from .budget import may_drop
from .codes import reconstruct_layer
from .protocol import ScdRequest
from .refresh import coded_tokens, refresh
from .wire import Layout, ScdDecoder

METHODS = ("kv", "scd", "raw", "recompute")
_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ScdReceiver:
    """SCD codes for B (`engine`) rebuilt into B's cache one layer at a time, as each frame
    is verified: into `staged` pages when given (finish returns them), else into a list of
    LayerKV. `n_tokens` / `digest`: the prompt's length and `wire.tokens_digest`; every
    message is capped at the largest valid frame for n_tokens before it is read."""

    def __init__(
        self,
        art: Artifact,
        layout: Layout,
        engine: Engine,
        n_tokens: int,
        digest: int,
        staged: StagedPrompt | None = None,
    ) -> None:
        self.art, self.engine, self.digest, self.staged = art, engine, digest, staged
        self.dec = ScdDecoder(layout)
        self.cap = layout.max_message_bytes(n_tokens)
        self.layers: list[LayerKV] = []
        self.reconstruct_s = 0.0

    def max_bytes(self) -> int:
        return self.cap

    def feed_header(self, body: bytes) -> None:
        if self.dec.feed_header(body).tokens_digest != self.digest:
            raise IncompatiblePayloadError("the SCD payload is not for this request's prompt")

    def feed_frame(self, body: bytes) -> None:
        code = self.dec.feed_frame(body)
        t0 = time.perf_counter()
        kv = reconstruct_layer(self.art, self.engine, code)
        if self.staged is not None:
            self.staged.write(code.layer, kv)
        else:
            self.layers.append(kv)
        self.reconstruct_s += time.perf_counter() - t0

    def finish(self) -> tuple[list[LayerKV] | StagedPrompt, int]:
        header, _ = self.dec.finish()
        return (self.staged if self.staged is not None else self.layers), header.n_tokens


class ScdClient:
    """The artifact a decode worker of B serves with (checked against B at start-up), its
    metrics (in the worker's `registry`), and the per-request fetches."""

    def __init__(self, path: str, engine: Engine, registry: CollectorRegistry) -> None:
        self.art = load(path)
        if self.art.manifest.consumer != engine.fingerprint:
            raise ArtifactMismatchError(
                f"--scd {path} was calibrated for another consumer model than {engine.name}"
            )
        self.engine, self.layout = engine, Layout.of(self.art)
        self.bytes = Counter(
            "spectrumkv_scd_bytes",
            "SCD-path payload bytes received, by method (scd codes, raw KV of A)",
            ["method"],
            registry=registry,
        )
        self.reconstruct = Histogram(
            "spectrumkv_scd_reconstruct_seconds",
            "B's rebuild of its cache from SCD codes, per request",
            buckets=_BUCKETS,
            registry=registry,
        )

    async def fetch(self, worker, method: str, rid: str, job: Job) -> Transfer:
        """Codes (method scd) or A's raw FP16 KV (method raw) for the prompt of `job`, through
        `worker` (a pd.decode_worker.DecodeWorker: its channel, deadline, unpack thread). On
        the batch engine, scd rebuilds into the request's pages (Transfer.layers is then a
        StagedPrompt for serve.worker.generate_batched), aborted if the fetch fails."""
        ids, t = job.ids[:-1].tolist(), job.transfer
        m = self.art.manifest  # raw reuse, a baseline, gets no refresh
        head, tail = (0, 0) if method == "raw" else (m.head_tokens, m.tail_tokens)
        coded = ids[: coded_tokens(len(ids), tail)]
        fresh = len(coded) < len(ids) or head > 0
        digest = tokens_digest(coded)
        if method == "raw":
            self._check_raw()
            opt = TransferOptions("fp16", None, 0, t.link_gbps, t.link_latency_s, t.overlap)
            rx = KvReceiver(self.art.manifest.producer, digest)
            kind, body = Kind.REQUEST, msgspec.json.encode(PrefillRequest(rid, ids, opt))
        else:
            req = ScdRequest(
                rid,
                coded,
                self.layout.artifact,
                self.engine.fingerprint,
                job.code_budget,
                t.score_layers,
                t.link_gbps,
                t.link_latency_s,
                t.overlap,
            )
            # codes that may drop tokens leave holes: their rebuilt layers go to the engine
            # whole (kept rows at their positions), not into pages staged for every position
            holes = may_drop(self.layout, len(coded), job.code_budget)
            staged = None if holes or fresh else await _stage(worker.batch, job, len(ids))
            rx = ScdReceiver(self.art, self.layout, self.engine, len(coded), digest, staged)
            kind, body = Kind.SCD_REQUEST, msgspec.json.encode(req)
        try:
            out = await fetch(
                worker.open_channel, kind, body, rx, worker.cfg.deadline_s, worker.unpacker
            )
        except BaseException:
            if isinstance(rx, ScdReceiver) and rx.staged is not None:
                rx.staged.abort()
            raise
        out.method = method
        if isinstance(rx, ScdReceiver):
            if fresh:
                t0 = time.perf_counter()
                out.layers = await asyncio.get_running_loop().run_in_executor(
                    worker.unpacker, refresh, self.engine, out.layers, len(coded),
                    job.ids[:-1], head,
                )  # fmt: skip
                out.n_tokens = len(ids)
                rx.reconstruct_s += time.perf_counter() - t0
                if out.done is not None:  # A's counter covers the coded tokens only
                    whole = raw_kv_bytes(self.art.manifest.consumer, len(ids))
                    out.done = msgspec.structs.replace(out.done, fp16_bytes=whole)
            out.reconstruct_s = rx.reconstruct_s
            self.reconstruct.observe(rx.reconstruct_s)
        if out.done is not None:
            self.bytes.labels(method).inc(out.done.wire_bytes)
        return out

    def _check_raw(self) -> None:
        a, b = self.art.manifest.producer, self.art.manifest.consumer
        if (a.rope, a.kv_dtype) != (b.rope, b.kv_dtype):
            raise IncompatiblePayloadError(
                "raw reuse needs the same RoPE settings and KV dtype in both models"
            )


async def _stage(batch: BatchEngine | None, job: Job, n_tokens: int) -> StagedPrompt | None:
    """Pages for the prompt's rebuilt cache on the batch engine (None: the sequential engine,
    whose rebuilt layers go into a list), waited for without blocking the event loop; the
    engine's PoolBusy after its queue timeout."""
    if batch is None:
        return None
    staged = batch.stage(replace(job.sampling, n=1), n_tokens)
    try:
        while not staged.wait_admitted(0):
            await asyncio.sleep(0.002)
    except BaseException:
        staged.abort()
        raise
    return staged


def resolve_method(job: Job, scd: ScdClient | None) -> str:
    """The method a request runs: its `spectrumkv.method`, else scd on a worker started with
    --scd, kv otherwise. ApiError 400 for scd/raw without --scd, or a code_budget without scd."""
    method = job.method or ("scd" if scd is not None else "kv")
    if method in ("scd", "raw") and scd is None:
        raise ApiError(
            400,
            f"method {method!r} needs a decode worker started with --scd ARTIFACT",
            param="spectrumkv.method",
            code="invalid_value",
        )
    if job.code_budget is not None and method != "scd":
        raise ApiError(
            400,
            "code_budget applies to method 'scd' only",
            param="spectrumkv.code_budget",
            code="invalid_value",
        )
    return method
