"""Token importance scores (higher = more important).

Every scorer returns a per-token score [n]; `attention` also returns per-layer scores [L, n].
Sinks are not handled here: the policy ranks the first `sinks` positions first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ScoreConfig
from .kv import LayerKV


@dataclass
class WindowQueries:
    """Post-RoPE queries of the last W context tokens of one layer: [Hq, W, D], the softmax
    scale the layer uses, and the layer's sliding window (0 = full attention)."""

    queries: torch.Tensor
    scaling: float
    sliding_window: int


def positional_scores(n: int, decay: float = 3.0, tail: float = 0.2) -> torch.Tensor:
    """The SpectrumKV authors' heuristic: exponential decay from the start of the prompt, the last
    `tail` fraction boosted above every non-sink token (sinks are ranked first by the policy)."""
    pos = torch.arange(n, dtype=torch.float64)
    s = torch.exp(-decay * pos / max(n, 1))
    s[pos >= math.floor((1.0 - tail) * n)] += 1.0
    return s.float()


def keynorm_scores(layers: list[LayerKV], n: int) -> torch.Tensor:
    """Tokens with *small* key norms attract the most attention (Devoto et al., 2024), so the score
    is minus the mean L2 norm of the token's keys over heads and the layers that hold it."""
    total = torch.zeros(n)
    count = torch.zeros(n)
    for kv in layers:
        total.index_add_(0, kv.positions, kv.keys.float().norm(dim=-1).mean(0))
        count.index_add_(0, kv.positions, torch.ones(kv.positions.numel()))
    return -(total / count.clamp(min=1))


def layer_attention_scores(wq: WindowQueries, kv: LayerKV, n: int, pool: int) -> torch.Tensor:
    """Mean attention that the window queries of one layer pay to each of the n context tokens.

    Memory is O(Hq * W * n_layer): the window's scores only, never an n x n matrix.
    """
    q = wq.queries.float()
    hq, w, d = q.shape
    hkv = kv.keys.shape[0]
    qpos = torch.arange(n - w, n)
    kpos = kv.positions
    logits = torch.einsum("hgwd,hkd->hgwk", q.view(hkv, hq // hkv, w, d), kv.keys.float())
    visible = kpos[None, :] <= qpos[:, None]
    if wq.sliding_window > 0:
        visible &= (qpos[:, None] - kpos[None, :]) < wq.sliding_window
    logits = (logits * wq.scaling).masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    per_slot = probs.mean(dim=(0, 1, 2))
    out = torch.zeros(n)
    out[kpos] = per_slot
    if pool > 1:
        out = F.max_pool1d(out[None, None], pool, stride=1, padding=pool // 2)[0, 0]
    return out


def attention_scores(
    window: list[WindowQueries], layers: list[LayerKV], n: int, cfg: ScoreConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """SnapKV-style observation-window attention.

    Returns (per-token [n], per-layer [L, n]). Each layer's row is its share of the window's
    attention (rows sum to 1 before pooling), so rows compare across layers. The per-token score
    averages the full-attention layers (sliding layers only see the recent window). In both, the
    observation window itself is ranked above every other token, most recent first, since its
    own queries barely see it.
    """
    per_layer = torch.stack(
        [layer_attention_scores(wq, kv, n, cfg.pool) for wq, kv in zip(window, layers, strict=True)]
    )
    full = [i for i, wq in enumerate(window) if wq.sliding_window == 0]
    token = per_layer[full].mean(0) if full else per_layer.mean(0)
    w = window[0].queries.shape[1]
    if w:
        recency = torch.arange(1, w + 1) / w
        token[n - w :] = token.max() + 1.0 + recency
        per_layer[:, n - w :] = per_layer.max() + 1.0 + recency
    return token, per_layer


def scoring_layers(whole: Sequence[bool], k: int) -> list[int]:
    """The layers scored with `ScoreConfig.layers` = k, given which layers hold the whole
    prompt (`whole[i]`: layer i caches every prompt position; a sliding-window layer does so
    only while the prompt fits its window). k > 0: the first k such layers, or every such layer
    if there are fewer; every layer if none is (or k = 0). A sliding layer scores only the
    tokens inside its window, everything older at exactly 0, so an early plan taken from
    Gemma-3's first layers (all sliding) would rank the rest of the prompt by position."""
    held = [i for i, w in enumerate(whole) if w]
    if k == 0 or not held:
        return list(range(len(whole)))
    return held[:k]


def score_tokens(
    cfg: ScoreConfig, n: int, layers: list[LayerKV], window: list[WindowQueries] | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Importance with the configured method: (per-token [n], per-layer [L, n] or None).

    With `cfg.layers` = k > 0 only the layers `scoring_layers` picks among `layers` are used
    (per-layer scores: None); a streaming caller passes the layers computed so far, up to the
    last one picked."""
    if cfg.layers:
        picked = scoring_layers([kv.positions.numel() == n for kv in layers], cfg.layers)
        layers = [layers[i] for i in picked]
        window = [window[i] for i in picked] if window is not None else None
    if cfg.method == "attention":
        if window is None:
            raise ValueError("attention scoring needs the window queries captured at prefill")
        token, per_layer = attention_scores(window, layers, n, cfg)
        return token, None if cfg.layers else per_layer
    if cfg.method == "positional":
        return positional_scores(n), None
    if cfg.method == "keynorm":
        return keynorm_scores(layers, n), None
    return torch.rand(n, generator=torch.Generator().manual_seed(cfg.seed)), None
