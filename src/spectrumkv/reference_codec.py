"""The torch reference of a frame body's codec: tier map, then each stored tier's K and V sections.

It is the readable definition of the body layout in `wire.py` and the codec that runs where the
compiled one (`fused.py`) does not: the `sym-token` and `kivi` schemes, builds without the C
extension, and `SPECTRUMKV_CODEC=reference`. Both write and read the same bytes (tests compare
them bit for bit). Frame heads, lengths and checksums are `wire.py`'s; callers here have checked
the tier list (`tiers.as_tier_codes`) and the layer's shape against the header.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import QuantConfig
from .errors import WireFormatError
from .kv import LayerKV, check_source
from .quant import Quantized, dequantize, quantize
from .tiers import STORED_TIERS, TIER_BITS, Tier


def pack_tier_map(tiers: torch.Tensor) -> bytes:
    """n uint8 Tier codes -> ceil(n/2) bytes, two 4-bit codes a byte, low nibble first."""
    t = tiers.to(torch.uint8)
    if t.numel() % 2:
        t = torch.cat([t, t.new_zeros(1)])
    return (t[0::2] | (t[1::2] << 4)).numpy().tobytes()


def unpack_tier_map(raw: bytes | memoryview, n_slots: int) -> np.ndarray:
    """The reverse of `pack_tier_map`: n_slots uint8 Tier codes. WireFormatError on an unknown
    code or a nonzero padding nibble."""
    b = np.frombuffer(raw, dtype=np.uint8)
    t = np.empty(2 * b.size, dtype=np.uint8)
    t[0::2], t[1::2] = b & 0xF, b >> 4
    if t.size > n_slots and t[n_slots:].any():
        raise WireFormatError("tier map padding nibble is not zero")
    t = t[:n_slots]
    if t.size and int(t.max()) > int(Tier.FP16):
        raise WireFormatError("invalid tier code in tier map")
    return t


def encode_body(
    body: memoryview, tiers: torch.Tensor, kv: LayerKV, wire_dtype: torch.dtype, q: QuantConfig
) -> None:
    """Write a frame body into `body` (exactly its size): the tier map, then for each stored tier
    present, K then V. FP16-tier tokens go out in `wire_dtype` (the engine's 16-bit KV dtype)."""
    check_source(kv.keys, kv.values)
    parts = [pack_tier_map(tiers)]
    for tier in STORED_TIERS:
        idx = (tiers == int(tier)).nonzero().flatten()
        if idx.numel() == 0:
            continue
        for x, is_key in ((kv.keys, True), (kv.values, False)):
            sel = x.index_select(1, idx).transpose(0, 1)  # [m, H, D]
            if tier == Tier.FP16:
                parts.append(sel.to(wire_dtype))
                continue
            qz = quantize(sel, tier, q, is_key)
            parts += [qz.codes, qz.scale] + ([qz.minimum] if qz.minimum is not None else [])
    pos = 0
    for part in parts:
        raw = part if isinstance(part, bytes) else part.contiguous().view(torch.uint8).numpy()
        raw = memoryview(raw).cast("B")
        body[pos : pos + len(raw)] = raw
        pos += len(raw)
    if pos != len(body):
        raise RuntimeError(f"reference encoder wrote {pos} bytes, frame_size says {len(body)}")


def decode_body(
    sections: memoryview,
    tiers: torch.Tensor,
    counts: dict[Tier, int],
    kept: torch.Tensor,
    heads: int,
    head_dim: int,
    wire_dtype: torch.dtype,
    q: QuantConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a frame body's sections (after the tier map; lengths already checked against
    `counts`, the slots per stored tier). `kept`: the slot indices of the kept tokens, in order.
    Returns [heads, kept, head_dim] keys and values in `wire_dtype`."""
    body = bytearray(sections)  # torch.frombuffer needs a writable buffer
    keys = torch.empty(kept.numel(), heads, head_dim, dtype=wire_dtype)
    values = torch.empty_like(keys)
    rank = torch.full((tiers.numel(),), -1, dtype=torch.long)
    rank[kept] = torch.arange(kept.numel())
    pos = 0
    for tier in STORED_TIERS:
        m = counts[tier]
        if m == 0:
            continue
        dest = rank[(tiers == int(tier)).nonzero().flatten()]
        for out, is_key in ((keys, True), (values, False)):
            x, pos = _read_section(body, pos, tier, m, heads, head_dim, wire_dtype, q, is_key)
            out[dest] = x.to(out.dtype)
    return keys.transpose(0, 1).contiguous(), values.transpose(0, 1).contiguous()


def _take(body: bytearray, pos: int, dtype: torch.dtype, count: int) -> tuple[torch.Tensor, int]:
    """`count` values of `dtype` at byte `pos`, and the position after them."""
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    t = torch.frombuffer(body, dtype=dtype, count=count, offset=pos) if count else torch.empty(0)
    return t.to(dtype), pos + nbytes


def _read_section(
    body: bytearray,
    pos: int,
    tier: Tier,
    m: int,
    h: int,
    d: int,
    wire_dtype: torch.dtype,
    q: QuantConfig,
    is_key: bool,
) -> tuple[torch.Tensor, int]:
    """One tier's K or V section of m tokens -> [m, h, d] float32, and the position after it."""
    if tier == Tier.FP16:
        x, pos = _take(body, pos, wire_dtype, m * h * d)
        return x.float().view(m, h, d), pos
    bits = TIER_BITS[tier]
    codes, pos = _take(body, pos, torch.uint8, m * h * d * bits // 8)
    codes = codes.view(m, h, d * bits // 8)
    if q.scheme == "sym-token":
        scale, pos = _take(body, pos, torch.float16, m)
        return dequantize(Quantized(codes, scale, None), tier, q, d), pos
    if q.scheme == "kivi" and is_key:
        nb = -(-m // q.group_size)
        scale, pos = _take(body, pos, torch.float16, nb * h * d)
        minimum, pos = _take(body, pos, torch.float16, nb * h * d)
        qz = Quantized(codes, scale.view(nb, h, d), minimum.view(nb, h, d))
        return dequantize(qz, tier, q, d, is_key=True), pos
    ng = d // q.group_for(d)
    scale, pos = _take(body, pos, torch.float16, m * h * ng)
    minimum, pos = _take(body, pos, torch.float16, m * h * ng)
    qz = Quantized(codes, scale.view(m, h, ng), minimum.view(m, h, ng))
    return dequantize(qz, tier, q, d), pos
