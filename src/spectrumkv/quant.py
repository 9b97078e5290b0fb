"""Quantize, pack and unpack KV tensors for the integer tiers.

All functions take `x` of shape [m, H, D] (tokens, KV heads, head dim) in any float dtype and return
plain tensors; the wire module turns them into bytes. The plain torch code here is the reference
implementation: faster kernels must produce the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    `minimum` is None. kivi keys: `scale`, `minimum` are [ceil(m/G), H, D] float16 (per channel,
    per block of G tokens).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor | None


def element_bytes(tier: Tier, heads: int, head_dim: int, quant: QuantConfig) -> int:
    """Wire bytes of one token of one layer for K *or* V at `tier` (0 for DROP).

    Exact for per-token schemes; not defined for `kivi`, whose key parameters are shared by
    blocks of tokens (use `section_bytes`)."""
    if tier == Tier.DROP:
        return 0
    if tier == Tier.FP16:
        return heads * head_dim * 2
    code = heads * head_dim * TIER_BITS[tier] // 8
    if quant.scheme == "sym-token":
        return code + 2
    if quant.scheme == "kivi":
        raise ValueError("kivi has no per-token size; use section_bytes")
    return code + heads * (head_dim // quant.group_for(head_dim)) * 4


def section_bytes(tier: Tier, m: int, heads: int, head_dim: int, quant: QuantConfig) -> int:
    """Exact wire bytes of `m` tokens of one layer at `tier`, K and V together."""
    if m == 0:
        return 0
    if quant.scheme != "kivi" or tier in (Tier.DROP, Tier.FP16):
        return 2 * m * element_bytes(tier, heads, head_dim, quant)
    code = heads * head_dim * TIER_BITS[tier] // 8
    blocks = -(-m // quant.group_size)
    keys = m * code + blocks * heads * head_dim * 4
    values = m * (code + heads * (head_dim // quant.group_for(head_dim)) * 4)
    return keys + values


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


def fwht(x: torch.Tensor) -> torch.Tensor:
    """`x @ hadamard(D)` for float32 x [..., D], as log2(D) stages of butterflies (D log D adds
    instead of D^2 multiply-adds). The fused kernel performs the same float operations in the same
    order, so both give identical bits."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {d}")
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape) * torch.tensor(1.0 / math.sqrt(d), dtype=torch.float32)


def rotate(x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """The codec's rotation of float32 x [..., D] (`Geometry.blocks`, summing to D): `fwht` of
    each block of consecutive channels, i.e. x times a block-diagonal matrix of orthonormal
    Hadamard blocks, symmetric, so also its own inverse. One block is plain `fwht`."""
    if len(blocks) == 1:
        return fwht(x)
    return torch.cat([fwht(part) for part in x.split(blocks, dim=-1)], dim=-1)


def quantize(x: torch.Tensor, tier: Tier, quant: QuantConfig, is_key: bool = False) -> Quantized:
    """Quantize [m, H, D] float32 to `tier` (INT8/INT4/INT2). `is_key` matters for `kivi`."""
    bits = TIER_BITS[tier]
    geo = quant.geometry(x.shape[-1])
    if geo.rotate:
        x = rotate(x.float(), geo.blocks)
    if quant.scheme == "sym-token":
        return _quantize_sym_token(x, bits)
    if quant.scheme == "kivi" and is_key:
        return _quantize_per_channel(x, bits, quant.group_size)
    return _quantize_asym_group(x, bits, geo.group)


def dequantize(
    q: Quantized, tier: Tier, quant: QuantConfig, head_dim: int, is_key: bool = False
) -> torch.Tensor:
    """Inverse of `quantize`, returns float32 [m, H, D]."""
    bits = TIER_BITS[tier]
    geo = quant.geometry(head_dim)
    codes = unpack(q.codes, bits).float()
    if quant.scheme == "kivi" and is_key:
        m = codes.shape[0]
        scale = q.scale.float().repeat_interleave(quant.group_size, 0)[:m]
        out = codes * scale + q.minimum.float().repeat_interleave(quant.group_size, 0)[:m]
    elif quant.scheme == "sym-token":
        half = float(1 << (bits - 1))
        out = (codes - half) * q.scale.float()[:, None, None]
    else:
        g = geo.group
        m, h = codes.shape[:2]
        codes = codes.view(m, h, head_dim // g, g)
        out = codes * q.scale.float()[..., None] + q.minimum.float()[..., None]
        out = out.view(m, h, head_dim)
    return rotate(out, geo.blocks) if geo.rotate else out


def _write_nan_groups(
    nan: torch.Tensor,
    codes: torch.Tensor,
    codes_of: Callable[[], torch.Tensor],
    *params: torch.Tensor,
) -> None:
    """Rewrite the groups flagged in `nan` (those holding a NaN, which the min/max reductions
    propagate) canonically: their FP16 `params` become NaN (0x7E00) and their (unrounded, float)
    `codes` 0, whatever the NaN's sign or payload, so they decode to NaN. A NaN code left to the
    uint8 cast would be arbitrary and could spill into a packed neighbour's bits. `codes_of()`:
    `nan` broadcast to the codes' shape, built only when some group holds a NaN."""
    if nan.any():
        for p in params:
            p.masked_fill_(nan, math.nan)
        codes.masked_fill_(codes_of(), 0)


def _quantize_asym_group(x: torch.Tensor, bits: int, g: int) -> Quantized:
    """Per (token, head, group of g channels): minimum and scale in FP16, codes
    round((x - minimum) / scale) in [0, 2^bits - 1]. Values are first clamped to the FP16 range
    (infinities saturate to +-65504). A group holding a NaN is written as scale = minimum = FP16
    NaN (0x7E00) and codes 0, so it decodes to NaN, as a raw transfer would carry it."""
    m, h, d = x.shape
    xg = x.float().reshape(m, h, d // g, g).clamp(-_FP16_MAX, _FP16_MAX)
    lo = xg.amin(dim=-1)
    hi = xg.amax(dim=-1)
    levels = (1 << bits) - 1
    minimum = lo.half()
    scale = ((hi - minimum.float()) / levels).clamp(max=_FP16_MAX).half()
    s = scale.float()
    inv = 1.0 / torch.where(s > 0, s, torch.ones_like(s))  # multiply: a divide costs 5x more
    codes = torch.round((xg - minimum.float()[..., None]) * inv[..., None]).clamp_(0, levels)
    nan = lo.isnan()
    _write_nan_groups(nan, codes, lambda: nan[..., None], scale, minimum)
    codes = codes.to(torch.uint8).reshape(m, h, d)
    return Quantized(pack(codes, bits), scale, minimum)


def _quantize_per_channel(x: torch.Tensor, bits: int, block: int) -> Quantized:
    """KIVI keys: min/scale per (block of `block` tokens, head, channel)."""
    m, h, d = x.shape
    nb = -(-m // block)
    xf = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    padded = torch.cat([xf, xf[-1:].expand(nb * block - m, h, d)]) if nb * block > m else xf
    blocks = padded.view(nb, block, h, d)
    levels = (1 << bits) - 1
    minimum = blocks.amin(dim=1).half()
    scale = ((blocks.amax(dim=1) - minimum.float()) / levels).clamp(max=_FP16_MAX).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s)).repeat_interleave(block, 0)[:m]
    lo = minimum.float().repeat_interleave(block, 0)[:m]
    codes = torch.round((xf - lo) / s).clamp_(0, levels)
    nan = minimum.isnan()  # per (block, head, channel)
    _write_nan_groups(nan, codes, lambda: nan.repeat_interleave(block, 0)[:m], scale, minimum)
    return Quantized(pack(codes.to(torch.uint8), bits), scale, minimum)


def _quantize_sym_token(x: torch.Tensor, bits: int) -> Quantized:
    m = x.shape[0]
    xf = x.float().clamp(-_FP16_MAX, _FP16_MAX)
    qmax = (1 << (bits - 1)) - 1
    absmax = xf.reshape(m, -1).abs().amax(dim=-1)
    scale = (absmax / qmax).half()
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(xf / s[:, None, None]).clamp_(-qmax, qmax) + (1 << (bits - 1))
    nan = absmax.isnan()  # per token
    _write_nan_groups(nan, codes, lambda: nan[:, None, None], scale)
    return Quantized(pack(codes.to(torch.uint8), bits), scale, None)
