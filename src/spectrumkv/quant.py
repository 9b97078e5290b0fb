"""Quantize, pack and unpack KV tensors for the integer tiers.

All functions take `x` of shape [m, H, D] (tokens, KV heads, head dim) in float32 and return
plain tensors; the wire module turns them into bytes. The plain torch code here is the reference
implementation: faster kernels must produce the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from .config import QuantConfig
from .tiers import TIER_BITS, Tier

_FP16_MAX = 65504.0


@dataclass
class Quantized:
    """Codes packed along the last dim ([m, H, D*bits/8] uint8) plus FP16 parameters.

    asym-group: `scale`, `minimum` are [m, H, D/g] float16. sym-token: `scale` is [m] float16 and
    `minimum` is None.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None


def element_bytes(tier: Tier, heads: int, head_dim: int, quant: QuantConfig) -> int:
    """Wire bytes of one token of one layer for K *or* V at `tier` (0 for DROP)."""
    if tier == Tier.DROP:
        return 0
    if tier == Tier.FP16:
        return heads * head_dim * 2
    code = heads * head_dim * TIER_BITS[tier] // 8
    if quant.scheme == "sym-token":
        return code + 2
    return code + heads * (head_dim // quant.group_for(head_dim)) * 4


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits, uint8) along the last dim, low bits first."""
    if bits == 8:
        return codes.contiguous()
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).to(torch.uint8)
    out = c[..., 0].clone()
    for i in range(1, per):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: [..., D*bits/8] uint8 -> [..., D] uint8."""
    if bits == 8:
        return packed
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per)


@cache
def hadamard(n: int) -> torch.Tensor:
    """Orthonormal, symmetric Sylvester-Hadamard matrix of size n (a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / h.shape[0] ** 0.5).float()


def quantize(x: torch.Tensor, tier: Tier, quant: QuantConfig) -> Quantized:
    """Quantize [m, H, D] float32 to `tier` (INT8/INT4/INT2)."""
    bits = TIER_BITS[tier]
    if quant.rotate:
        x = x.float() @ hadamard(x.shape[-1])
    if quant.scheme == "sym-token":
        return _quantize_sym_token(x, bits)
    return _quantize_asym_group(x, bits, quant.group_for(x.shape[-1]))


def dequantize(q: Quantized, tier: Tier, quant: QuantConfig, head_dim: int) -> torch.Tensor:
    """Inverse of `quantize`, returns float32 [m, H, D]."""
    bits = TIER_BITS[tier]
    codes = unpack(q.codes, bits).float()
    if quant.scheme == "sym-token":
        half = float(1 << (bits - 1))
        out = (codes - half) * q.scale.float()[:, None, None]
    else:
        g = quant.group_for(head_dim)
        m, h = codes.shape[:2]
        codes = codes.view(m, h, head_dim // g, g)
        out = codes * q.scale.float()[..., None] + q.minimum.float()[..., None]
        out = out.view(m, h, head_dim)
    return out @ hadamard(head_dim) if quant.rotate else out


def _quantize_asym_group(x: torch.Tensor, bits: int, g: int) -> Quantized:
    m, h, d = x.shape
    xg = x.float().reshape(m, h, d // g, g).clamp(-_FP16_MAX, _FP16_MAX)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    levels = (1 << bits) - 1
    minimum = lo.half()
    scale = ((hi - minimum.float()) / levels).clamp(max=_FP16_MAX).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((xg - minimum.float()[..., None]) / s[..., None]).clamp_(0, levels)
    codes = codes.to(torch.uint8).reshape(m, h, d)
    return Quantized(pack(codes, bits), scale, minimum)


def _quantize_sym_token(x: torch.Tensor, bits: int) -> Quantized:
    m = x.shape[0]
    xf = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    qmax = (1 << (bits - 1)) - 1
    absmax = xf.reshape(m, -1).abs().amax(dim=-1)
    scale = (absmax / qmax).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(xf / s[:, None, None]).clamp_(-qmax, qmax) + (1 << (bits - 1))
    return Quantized(pack(codes.to(torch.uint8), bits), scale, None)
