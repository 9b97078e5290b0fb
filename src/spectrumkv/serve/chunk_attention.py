"""Attention of a local prefill's chunk inside a decode step ("mixed" prefill mode).

A chunk is C consecutive tokens of one request at slots (= positions: a recompute keeps every
token) start .. start + C - 1. Per layer: its K/V (post-RoPE) are written into the request's
pages first (rounded to the KV dtype, as a received prompt is), then its queries attend over the
request's pages [0, start + C) causally, query i seeing slots <= start + i: the request's pages
are gathered once per layer (`PagedKVCache.read`) into dense float32 K/V [1, Hkv, start + C, D]
and go through torch's SDPA in float32 (as the paged kernel accumulates; bf16 SDPA took 16 ms a
layer here vs 8 ms float32) with an additive mask (one read of the context for all C queries; the
paged decode kernel, one query a row, would read it C times). Measured (torch 2.13 CPU, 2
threads, 9 query / 3 KV heads, C 256 over 1,024 slots, float32): 4-D inputs with a float mask
and `enable_gqa` take the flash kernel, 8 ms a layer; 3-D inputs or a boolean mask fall back to
the math kernel or its mask handling, 17-94 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..paged.cache import PagedKVCache


@dataclass
class Chunk:
    """The chunk fed in a step: `tokens` (ids) of request `rid` at slots `start`.. (the request
    holds exactly `start` slots before the step)."""

    rid: Any
    tokens: list[int]
    start: int


@dataclass
class ChunkStep:
    """What the chunk's attention needs in one step: the additive causal mask [1, 1, C,
    start + C] (0 or -inf)."""

    cache: PagedKVCache
    chunk: Chunk
    mask: torch.Tensor

    @classmethod
    def prepare(cls, cache: PagedKVCache, chunk: Chunk) -> ChunkStep:
        """Grow the request by the chunk's slots; build the step's mask."""
        cache.extend(chunk.rid, len(chunk.tokens))
        end = chunk.start + len(chunk.tokens)
        hidden = torch.arange(end)[None, :] > torch.arange(chunk.start, end)[:, None]
        mask = torch.zeros(hidden.shape).masked_fill_(hidden, float("-inf"))
        return cls(cache, chunk, mask[None, None])


def chunk_attention(cs: ChunkStep, layer: int, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
    """q [C, Hq, D], k, v [C, Hkv, D] (post-RoPE) of the chunk: write k, v into its slots, then
    attend over the request's slots [0, start + C) causally. Returns [C, Hq, D], q's dtype."""
    cache, ch = cs.cache, cs.chunk
    cache.write(layer, ch.rid, ch.start, k.transpose(0, 1), v.transpose(0, 1))
    dense_k, dense_v = (x[None].float() for x in cache.read(layer, ch.rid, cs.mask.shape[-1]))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None].float(), dense_k, dense_v,
                                         attn_mask=cs.mask, scale=scaling,
                                         enable_gqa=True)  # fmt: skip
    return out[0].transpose(0, 1).to(q.dtype)
