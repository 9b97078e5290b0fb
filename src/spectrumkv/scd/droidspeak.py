"""The DroidSpeak baseline: B reuses A's KV cache for most layers and recomputes one contiguous
span of critical layers [start, stop) from A's residual hidden state at `start` (sent beside the
reused KV). Choosing the span as DroidSpeak does: per layer, the damage (KL against B's own
prefill) of reusing A's KV at that layer alone is profiled on dev text; the span of the given
width with the most summed damage is recomputed.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from ..engines.hf import Engine
from ..kv import LayerKV


def residual_hook(engine: Engine, layer: int, out: dict) -> torch.utils.hooks.RemovableHandle:
    """Store the residual hidden state entering decoder layer `layer` in out['hidden'] [n, d]."""

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out["hidden"] = hidden[0].detach().float().clone()

    return engine.model.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


@torch.inference_mode()
def recompute_span(
    engine_b: Engine, hidden: torch.Tensor, start: int, stop: int
) -> tuple[list[LayerKV], float]:
    """B's K/V of layers [start, stop) computed by B's own layers from `hidden` [n, d] (the
    residual stream entering `start`), in B's KV dtype; and the seconds it took."""
    model = engine_b.model
    n = hidden.shape[0]
    t0 = time.perf_counter()
    pos = torch.arange(n)[None]
    h = hidden[None].to(next(model.parameters()).dtype)
    cos_sin = model.model.rotary_emb(h, pos)
    mask = torch.full((n, n), torch.finfo(h.dtype).min).triu(1)[None, None]
    cache = DynamicCache(config=model.config)
    for i in range(start, stop):
        h = model.model.layers[i](
            h, attention_mask=mask, position_ids=pos, past_key_values=cache,
            use_cache=True, position_embeddings=cos_sin,
        )  # fmt: skip
        if isinstance(h, tuple):
            h = h[0]
    dt = engine_b.kv_dtype
    out = [
        LayerKV(cache.layers[i].keys[0].to(dt), cache.layers[i].values[0].to(dt), pos[0])
        for i in range(start, stop)
    ]
    return out, time.perf_counter() - t0


def choose_span(damage: list[float], width: int) -> int:
    """Start of the contiguous span of `width` layers with the largest summed damage."""
    width = max(1, min(width, len(damage)))
    sums = [sum(damage[s : s + width]) for s in range(len(damage) - width + 1)]
    return max(range(len(sums)), key=sums.__getitem__)
