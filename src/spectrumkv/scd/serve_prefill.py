"""The prefill worker's SCD side (`serve prefill --scd-artifacts DIR`): the artifacts it holds,
and the streaming encoder that turns A's prefill into an SCD payload layer by layer.

Artifacts are loaded (and verified: `artifact.load`) once at start-up, those calibrated for
this worker's model only, and found by digest per request. A request for an artifact not held
here, or held for another consumer, is refused with ArtifactMismatchError (the decode worker
then recomputes or fails, as it chose).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import msgspec
import torch

from ..config import ScoreConfig
from ..engines.hf import Engine
from ..importance import score_tokens, scoring_layers
from ..pd.protocol import PrefillDone, encode
from ..policy import raw_kv_bytes
from ..transport.framing import Kind
from ..transport.shaper import LinkShaper
from ..wire import new_payload_id, tokens_digest
from .artifact import Artifact, ArtifactError, ArtifactMismatchError, digest, load
from .budget import code_plan, code_tiers, placed_tiers
from .capture import capture
from .codes import LayerCode, encode_layer
from .protocol import ScdRequest, decode_request
from .wire import Layout, ScdHeader, frame_bytes, header_bytes

log = logging.getLogger("spectrumkv.prefill")


class ArtifactStore:
    """The SCD artifacts of a directory (itself one, or one per subdirectory) whose producer is
    `engine`'s model, by digest."""

    def __init__(self, root: str | Path, engine: Engine) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ArtifactError(f"--scd-artifacts {root} is not a directory")
        self.by_digest: dict[str, tuple[Artifact, Layout]] = {}
        dirs = [root] if (root / "manifest.json").is_file() else sorted(root.iterdir())
        for d in dirs:
            if not (d / "manifest.json").is_file():
                continue
            art = load(d)
            if art.manifest.producer != engine.fingerprint:
                log.info("SCD artifact %s is for another producer model: skipped", d)
                continue
            self.by_digest[digest(art)] = (art, Layout.of(art))
            log.info("SCD artifact %s: digest %s", d, digest(art)[:16])

    def get(self, req: ScdRequest) -> tuple[Artifact, Layout]:
        """The artifact the request names, checked against its consumer."""
        if req.artifact not in self.by_digest:
            held = ", ".join(d[:16] for d in self.by_digest) or "none"
            raise ArtifactMismatchError(
                f"no SCD artifact with digest {req.artifact[:16]}... on this prefill worker "
                f"(held for this model: {held})"
            )
        art, layout = self.by_digest[req.artifact]
        if art.manifest.consumer != req.consumer:
            raise ArtifactMismatchError(
                "the artifact was calibrated for another consumer model than the requester's"
            )
        return art, layout


class ScdStreamer:
    """Feed it `on_layer` from `capture`; it calls `emit(kind, bytes)` with the header (at
    once) and each layer's frame. With a code budget, the INT8 (or dropped) tokens are chosen
    from the project's importance scores over the first `score_layers` layers that hold the whole
    prompt, so frames wait until those layers are done (as KV streaming does)."""

    def __init__(self, engine: Engine, art: Artifact, layout: Layout, ids, req: ScdRequest, emit):
        n = int(ids.numel())
        self.engine, self.art, self.layout, self.emit, self.n = engine, art, layout, emit, n
        self.scoring = ScoreConfig(layers=req.score_layers)
        self.header = ScdHeader(
            engine.fingerprint, art.manifest.consumer, layout.artifact, n,
            payload_id=new_payload_id(), tokens_digest=tokens_digest(ids),
        )  # fmt: skip
        head = header_bytes(self.header)
        self.raw_bytes = raw_kv_bytes(art.manifest.consumer, n)
        self.budget, self.head_len = req.code_budget, len(head)
        self.plan = code_plan(layout, n, req.code_budget, len(head))
        plan_now = not self.plan.needs_scores(n)
        n_layers = len(layout.widths)
        whole = [layout.first(i, n) == 0 for i in range(n_layers)]
        self.k = 0 if plan_now else max(scoring_layers(whole, req.score_layers)) + 1
        self.tiers = code_tiers(n, None, self.plan) if plan_now else None
        self.kv: list = []
        self.window: list = []
        self.held: list[LayerCode] = []
        self.encode_s = 0.0
        emit("header", head)

    def on_layer(self, i: int, kv, attn_input, window) -> None:
        t0 = time.perf_counter()
        self.held.append(encode_layer(self.art, self.engine, i, kv, attn_input))
        if self.tiers is None:  # quantized codes: plan once the scoring layers are done
            self.kv.append(kv)
            self.window.append(window)
            if i + 1 < self.k:
                self.encode_s += time.perf_counter() - t0
                return
            scores, _ = score_tokens(self.scoring, self.n, self.kv, self.window)
            self.tiers = placed_tiers(
                self.layout, self.n, self.budget, self.head_len, scores, self.plan
            )
            self.kv, self.window = [], []
        self.encode_s += time.perf_counter() - t0
        ready, self.held = self.held, []
        for code in ready:
            self._frame(code)

    def _frame(self, code: LayerCode) -> None:
        t0 = time.perf_counter()
        chunk = frame_bytes(code, self.tiers, self.header, self.layout)
        self.encode_s += time.perf_counter() - t0
        self.emit("frame", chunk)


async def serve_scd(server, body: bytes, ch) -> None:
    """One SCD request on `server` (a `pd.prefill_worker.PrefillServer`): refused with an
    ERROR message when it does not parse, when this worker holds no matching artifact, or when
    its code budget cannot be met; else HEADER, FRAMEs (made while A's prefill runs), DONE."""
    try:
        req = decode_request(body)
    except msgspec.MsgspecError as e:
        await server.refuse(ch, e)
        return
    ids = torch.tensor(req.token_ids, dtype=torch.long)
    what = f"{req.request_id}: {ids.numel()} tokens, scd {req.artifact[:12]} b={req.code_budget}"

    async def run(cancel) -> PrefillDone:
        if server.scd is None:
            raise ArtifactMismatchError(
                "this prefill worker serves no SCD artifacts (start it with --scd-artifacts DIR)"
            )
        art, layout = server.scd.get(req)
        streamers: list[ScdStreamer] = []

        def start(emit):
            streamers.append(ScdStreamer(server.engine, art, layout, ids, req, emit))
            return streamers[0].on_layer

        def prefill(hook) -> None:
            capture(server.engine, ids, input_layers=art.manifest.patch_layers, on_layer=hook)

        shaper = LinkShaper(req.link_gbps, req.link_latency_s)
        s = await server.stream(ch, cancel, shaper, req.overlap, start, prefill)
        done = PrefillDone(
            request_id=req.request_id,
            prefill_s=s.prefill_s,
            queued_s=s.queued_s,
            encode_s=streamers[0].encode_s,
            wire_s=shaper.wire_s,
            transfer_exposed_s=s.exposed_s,
            wire_bytes=s.sent,
            fp16_bytes=streamers[0].raw_bytes,
            nominal_budget=req.code_budget or 0.0,
        )
        await ch.send(Kind.DONE, encode(done))
        return done

    await server.serve_one(what, req.request_id, ch, run)
