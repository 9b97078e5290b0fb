"""Attention of several prompts packed into one sequence: one causal SDPA per prompt.

`engines.hf.prefill_batch` runs several prompts through one forward, packed end to end, so the
linear layers see one large batch of rows (on this CPU a packed bf16 linear does ~1.0 TFLOP/s at
480 rows and ~1.6 at 2,048). Attention must keep each prompt to itself. A block-diagonal mask
over the packed sequence does that, but SDPA then computes every masked-out pair too: the
attention work grows with the square of the packed total instead of the sum of each prompt's
square. `segments(model, spans)` switches the model's attention, for the duration of a `with`
block on the calling thread, to `segment_attention`, registered with transformers'
`AttentionInterface` under `ATTENTION`: each span alone, causally, through `engines.flash`'s
kernel where it applies (bf16, head_dim 64 or 128), else SDPA with `is_causal=True` and the
grouped K/V heads expanded per span. The mask the model passes is ignored.

Contract: the model's forward runs on the thread that entered `segments`, with an empty cache,
so keys and values hold exactly the packed sequence's tokens; the spans tile that sequence.
Calling the attention function any other way raises RuntimeError.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from . import flash
from .attention import use_attention

ATTENTION = "spectrumkv_segments"
_active = threading.local()


def causal_spans(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    spans: list[tuple[int, int]],
    scale: float | None = None,
) -> torch.Tensor:
    """query [Hq, T, D], key/value [Hkv, T, D] (any token stride) -> [T, Hq, D]: each span
    (start, end) of the T tokens attends causally to itself only, through engines.flash's
    kernel where it fits, else SDPA with the grouped K/V heads expanded per span."""
    group = query.shape[0] // key.shape[0]
    out = query.new_empty(query.shape[1], query.shape[0], query.shape[2])
    for a, b in spans:
        q, k, v = query[:, a:b], key[:, a:b], value[:, a:b]
        if flash.fits(q, k, v):
            out[a:b] = flash.causal(q, k, v, scale)
            continue
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale)
        out[a:b] = o[0].transpose(0, 1)
    return out


def segment_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """query [1, Hq, T, D], key/value [1, Hkv, T, D] (the whole packed sequence, post-RoPE).
    Returns ([1, T, Hq, D], None), each span attending causally to itself only."""
    spans: list[tuple[int, int]] | None = getattr(_active, "spans", None)
    t = query.shape[2]
    if spans is None or key.shape[2] != t or spans[-1][1] != t:
        raise RuntimeError("segment attention runs only inside segments(), over one packed "
                           "sequence with an empty cache")  # fmt: skip
    return causal_spans(query[0], key[0], value[0], spans, scaling)[None], None


AttentionInterface.register(ATTENTION, segment_attention)


@contextlib.contextmanager
def segments(model: torch.nn.Module, spans: list[tuple[int, int]]) -> Iterator[None]:
    """Within the block, `model`'s attention treats the packed sequence as the prompts
    `spans` ((start, end) token indices, in order, tiling the sequence). Restores the model's
    attention implementation on exit."""
    if (
        not spans
        or spans[0][0] != 0
        or any(b <= a for a, b in spans)
        or any(spans[i][1] != spans[i + 1][0] for i in range(len(spans) - 1))
    ):
        raise ValueError(f"spans must tile the packed sequence from 0, got {spans}")
    _active.spans = spans
    try:
        with use_attention(model, ATTENTION):
            yield
    finally:
        _active.spans = None
