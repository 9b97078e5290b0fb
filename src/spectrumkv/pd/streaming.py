"""Layer-wise encoding on the prefill side: plan as soon as the scoring layers are done, then
emit the header and one frame per layer while later layers are still being computed."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..config import PolicyConfig, ScoreConfig
from ..engines.hf import Engine
from ..importance import WindowQueries, scoring_layers
from ..kv import LayerKV
from ..pipeline import make_header, plan_scores
from ..policy import Plan, layer_firsts, plan, reads_scores
from ..wire import Header, frame_bytes, header_bytes

Emit = Callable[[str, bytes], None]  # ("header" | "frame", bytes)


class StreamingEncoder:
    """Feed it `on_layer` from `engines.hf.prefill`; it calls `emit` with wire chunks.

    With `scoring.layers = k`, the plan is made as soon as the layers `importance.scoring_layers`
    picks are done (the first k that hold the whole prompt, or all of them if fewer) and frames
    flow from then on; with k = 0, or when no layer holds the whole prompt, the plan reads every
    layer and nothing leaves before prefill ends. A plan that reads no scores
    (`policy.reads_scores`: budget 1.0, or a policy that places tokens by position) is made at
    layer 0 without scoring, and every frame leaves as soon as its layer is computed.
    """

    def __init__(
        self,
        engine: Engine,
        context_ids: torch.Tensor,
        policy: PolicyConfig,
        scoring: ScoreConfig,
        emit: Emit,
    ) -> None:
        n_tokens = context_ids.numel()
        n_layers = engine.fingerprint.n_layers
        self.header: Header = make_header(engine, n_tokens, policy, context_ids)
        self.firsts = layer_firsts(self.header)
        scored = reads_scores(policy)
        #: layers computed before the plan: up to the last one scoring reads (1: no scoring)
        whole = [f == 0 for f in self.firsts]
        self.k = max(scoring_layers(whole, scoring.layers)) + 1 if scored else 1
        if scored and policy.name == "spectrum-layer" and self.k < n_layers:
            raise ValueError("spectrum-layer needs every layer's scores; it cannot stream early")
        self.engine, self.n, self.policy, self.scoring, self.emit = (
            engine,
            n_tokens,
            policy,
            scoring,
            emit,
        )
        self.layers: list[LayerKV] = []
        self.window: list[WindowQueries] = []
        self.plan: Plan | None = None
        self.encode_s = 0.0

    def on_layer(self, i: int, kv: LayerKV, wq: WindowQueries) -> None:
        self.layers.append(kv)
        self.window.append(wq)
        if self.plan is None:
            if i + 1 < self.k:
                return
            t0 = time.perf_counter()
            scores, layer_scores = plan_scores(
                self.policy, self.scoring, self.n, self.layers, self.window
            )
            self.plan = plan(scores, self.header, self.policy, layer_scores)
            self.emit("header", header_bytes(self.header))
            self.encode_s += time.perf_counter() - t0
            for j in range(i + 1):
                self._frame(j)
        else:
            self._frame(i)

    def _frame(self, i: int) -> None:
        t0 = time.perf_counter()
        first = self.firsts[i]
        chunk = frame_bytes(i, first, self.plan.tiers[i, first:], self.layers[i], self.header)
        self.encode_s += time.perf_counter() - t0
        self.emit("frame", chunk)
