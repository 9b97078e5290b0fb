"""Rotary position embeddings, removed with one model's settings and re-applied with another's.

Keys are cached post-RoPE: k_rot = k * cos + rotate_half(k) * sin, per pair of channels
(i, i + D/2) a rotation by the position's angle, scaled by the model's `attention_scaling`
(1 for plain RoPE). Models with several layer types (Gemma-3: sliding-window layers at one base
frequency, full-attention layers at another) rotate each layer with its own type's settings.
`remove` applies the inverse exactly (rotation by the negative angle,
divided by cos^2 + sin^2), so `remove(apply(k))` is k up to float rounding for any scaling.
"""

from __future__ import annotations

import torch


def rotary(
    model: torch.nn.Module, layer: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [n, head_dim] float32, of decoder layer `layer` of a HF decoder model
    at 1-D `positions`."""
    rot = model.model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    # one module for several layer types (Gemma-3) takes the layer's type
    kwargs = {"layer_type": model.config.layer_types[layer]} if hasattr(rot, "layer_types") else {}
    cos, sin = rot(x, positions.view(1, -1).long(), **kwargs)
    return cos[0].float(), sin[0].float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate keys [H, n, D] (float32) by (cos, sin) [n, D]."""
    return keys * cos + _rotate_half(keys) * sin


def remove(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of `apply` with the same (cos, sin): keys [H, n, D] float32."""
    return (keys * cos - _rotate_half(keys) * sin) / (cos * cos + sin * sin)
