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

from ..engines.hf import Engine, causal_masks, layer_kv
from ..kv import LayerKV
from . import rope


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
    residual stream entering `start`), in B's KV dtype, as B's own prefill caches them (a
    sliding-window layer keeps its window's last tokens); and the seconds it took."""
    model, fp = engine_b.model, engine_b.fingerprint
    n = hidden.shape[0]
    t0 = time.perf_counter()
    pos = torch.arange(n)
    h = hidden[None].to(engine_b.compute_dtype)
    masks = causal_masks(engine_b, pos)
    cache = DynamicCache(config=model.config)
    for i in range(start, stop):
        kind = "sliding_attention" if fp.is_sliding(i) else "full_attention"
        cos, sin = rope.rotary(model, i, pos)
        h = model.model.layers[i](
            h, attention_mask=masks[kind], position_ids=pos[None], past_key_values=cache,
            use_cache=True, position_embeddings=(cos[None].to(h.dtype), sin[None].to(h.dtype)),
        )  # fmt: skip
        if isinstance(h, tuple):
            h = h[0]
    out = [layer_kv(engine_b, cache, i, n) for i in range(start, stop)]
    return out, time.perf_counter() - t0


def choose_span(damage: list[float], width: int) -> int:
    """Start of the contiguous span of `width` layers with the largest summed damage."""
    width = max(1, min(width, len(damage)))
    sums = [sum(damage[s : s + width]) for s in range(len(damage) - width + 1)]
    return max(range(len(sums)), key=sums.__getitem__)
