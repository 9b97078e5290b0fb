"""Prefill through the hand-written Llama forward (`engines.llama_step`) instead of the HF one.

A bf16 SmolLM2 prefill of 2,048 tokens through the HF forward spends about 40 % of its time outside
the GEMMs and attention: per layer ~15 small torch ops over [T, features] (RMSNorm's float32
statistics in five ops, RoPE through `rotate_half`, residual adds, dtype copies). `LlamaStep` runs
the same arithmetic in a few fused row ops (`engines.rowops`, spread over torch's threads for a
prefill's thousands of rows), so `engines.hf.prefill` and `engines.hf.prefill_batch` run through it
where `step_for` allows: bf16 Llama-family models, no sliding-window layers. Attention goes through
`engines.segments.causal_spans`, as the HF path's does: the AMX kernel where `engines.flash` takes
the model (SmolLM2 on an AMX CPU), else SDPA (CPUs without AMX, other head sizes). Everything else
keeps the HF forward. `SPECTRUMKV_STEP_PREFILL=0` in the environment turns it off (for A/B runs;
`SPECTRUMKV_FLASH_PREFILL=0` turns off only the AMX kernel, the step then runs with SDPA).

Numerics: the same weights and modules; RoPE bit-identical to HF's, RMSNorm's sum of squares in
another order (engines.rowops), attention the same kernel as the HF path on the same CPU. K/V agree
with the HF forward's within bf16 rounding (tests/test_flash.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..importance import WindowQueries
from ..kv import LayerKV
from . import llama_step
from .segments import causal_spans

if TYPE_CHECKING:
    from .hf import Engine

ENABLED = os.environ.get("SPECTRUMKV_STEP_PREFILL", "1") != "0"

LayerHook = Callable[[int, LayerKV, WindowQueries], None]


def step_for(engine: Engine) -> llama_step.LlamaStep | None:
    """The step `engine`'s prefills run through, or None (the HF forward): enabled, a bf16 model
    with no sliding-window layers that `llama_step` reproduces, and no forward hook is registered on
    its layers or their modules (the step calls only the projections: SCD's captures and
    DroidSpeak's layer inputs hook the attention and decoder-layer modules, so their prefills keep
    the HF forward)."""
    if not ENABLED or engine.fingerprint.sliding_layers or engine.model.dtype != torch.bfloat16:
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in engine.model.model.layers.modules()):
        return None
    return llama_step.build(engine.model)


class _AllStopped(Exception):
    """Raised inside the forward once every context's hook has failed."""


def run(
    engine: Engine,
    step: llama_step.LlamaStep,
    contexts: list[torch.Tensor],
    on_layer: list[LayerHook],
    window: int = 32,
) -> list[Exception | None]:
    """Prefill `contexts` (1-D token ids, each >= 1 token) packed as the rows of one forward of
    `step`, each attending causally to itself only, at its own positions 0..n-1. Per layer and
    context, `on_layer[j](i, kv, window_queries)` gets the context's keys and values ([Hkv, n, D]
    in the engine's KV dtype, positions 0..n-1) and the post-RoPE queries of its last `window`
    tokens (float32), as `engines.hf.prefill_batch`'s hooks do. A hook that raises stops only
    its own context (its exception is returned in its slot; None: every layer was reported);
    the forward stops once every hook has raised."""
    sizes = [int(c.numel()) for c in contexts]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    spans = [(e - n, e) for n, e in zip(sizes, ends, strict=True)]
    errors: list[Exception | None] = [None] * len(contexts)
    kv_dtype = engine.kv_dtype

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        # q [T, Hq, D], k / v [T, Hkv, D]: attention takes [H, T, D] views of any token stride
        out = causal_spans(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), spans, scale)
        for j, (a, b) in enumerate(spans):
            if errors[j] is not None:
                continue
            kv = LayerKV(
                k[a:b].transpose(0, 1).to(kv_dtype).contiguous(),
                v[a:b].transpose(0, 1).to(kv_dtype).contiguous(),
                torch.arange(b - a),
            )
            wq = q[max(a, b - window) : b].transpose(0, 1).float().contiguous()
            try:
                on_layer[j](i, kv, WindowQueries(wq, scale, engine.layer_window(i)))
            except Exception as e:  # isolated: the other contexts go on
                errors[j] = e
        if all(e is not None for e in errors):
            raise _AllStopped
        return out

    tokens = torch.cat(contexts)
    positions = torch.cat([torch.arange(n) for n in sizes])
    with contextlib.suppress(_AllStopped):  # no row needs logits: only the KV is kept
        step(tokens, positions, attend, rows=torch.empty(0, dtype=torch.long))
    return errors
