"""The compiled fast path of the wire codec (`spectrumkv._codec`, built from `_codec.c`).

It covers the default `asym-group` scheme (with or without rotation) and the FP16 tier, for K/V
held in float32, float16 or bfloat16, in one pass per layer frame, with the GIL released and the
work split over `threads` threads. The kernels apply every geometry's rotation in place, the
block-diagonal ones of non-power-of-two head dims included (`Geometry.blocks`, e.g. head_dim
96 -> 64 + 32). Its bytes are identical to the torch reference (`reference_codec.py`, `quant.py`;
tests check it); `sym-token` and `kivi` always run on the reference. When the extension could not
be compiled, `AVAILABLE` is False and the wire module uses the reference.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .config import Geometry, QuantConfig
from .kv import check_destination, check_source
from .tiers import as_tier_codes

try:
    from . import _codec
except ImportError:  # built as an optional extension; see setup.py
    _codec = None

AVAILABLE = _codec is not None
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# SPECTRUMKV_CODEC=reference, read once here (asked on every frame, os.environ costs ~1 us).
_reference = os.environ.get("SPECTRUMKV_CODEC", "auto") == "reference"


def compiled() -> bool:
    """Whether the compiled helpers run: threaded frame checksums and tier-map unpacking (same
    results as their numpy / `xxhash`-package twins in wire.py and reference_codec.py, which run
    otherwise). Reference mode (`set_reference`) turns them off too."""
    return AVAILABLE and not _reference


def enabled(q: QuantConfig) -> bool:
    """Whether frames with these quantization settings go through the fused kernels."""
    return compiled() and q.scheme == "asym-group"


def set_reference(flag: bool) -> bool:
    """Run everything on the torch reference and the Python helpers (True) or on the compiled
    codec where it covers the scheme (False); returns the previous setting. The process starts
    in reference mode when `SPECTRUMKV_CODEC=reference` is in its environment. Both modes read
    and write the same bytes."""
    global _reference
    previous, _reference = _reference, bool(flag)
    return previous


def simd_enabled() -> bool:
    """Whether the AVX2/F16C kernels run (x86-64 CPUs that have them); else the scalar C ones."""
    return bool(_codec.simd())


def set_simd(flag: bool) -> bool:
    """Use the AVX2 kernels (where the CPU has them) or force the scalar C kernels; returns the
    previous setting. For tests and benchmarks: both produce the same bytes."""
    return bool(_codec.set_simd(flag))


def _threads(threads: int | None) -> int:
    return max(1, min(64, threads or torch.get_num_threads()))


def encode_body(
    keys: torch.Tensor,
    values: torch.Tensor,
    tiers: torch.Tensor,
    geo: Geometry,
    wire_dtype: torch.dtype,
    out: memoryview,
    threads: int | None = None,
) -> None:
    """Write a frame body (tier map + sections) into `out`, which must have exactly its size.

    keys, values: [H, n, D] (float32/float16/bfloat16); tiers: [n] Tier codes; geo: the
    geometry of D (`QuantConfig.geometry`)."""
    check_source(keys, values)  # the C reads through them
    h, n, d = keys.shape
    t = as_tier_codes(tiers).numpy()
    k, v = keys.contiguous(), values.contiguous()
    _codec.encode_frame(
        k.data_ptr(), v.data_ptr(), _DTYPE_CODES[k.dtype], h, n, d, geo.group,
        int(geo.rotate), _DTYPE_CODES[wire_dtype], t, out, _threads(threads),
    )  # fmt: skip


def frame_checksum(frame: memoryview, head_len: int, seed: int, threads: int | None = None) -> int:
    """The wire format's frame checksum of `frame` (head_len bytes of head, then the body):
    xxh3_64 of each CHECK_BLOCK-byte block of the body, split over `threads` threads, then of the
    head followed by those digests. See `wire.frame_checksum`."""
    return _codec.frame_checksum(frame, head_len, seed, _threads(threads))


def count_tiers(tiers: torch.Tensor) -> tuple[int, ...]:
    """Slot count of each Tier code in a tier map; ValueError on a bad code."""
    return _codec.count_tiers(as_tier_codes(tiers).numpy())


def unpack_tiers(
    raw: bytes | memoryview, n_slots: int, first: int, tiers: np.ndarray, positions: np.ndarray
) -> tuple[int, ...]:
    """Unpack a packed tier map into `tiers` ([n_slots] uint8) and the kept slots' positions
    (first + slot) into the front of `positions` ([n_slots] int64); returns the slot count of
    each Tier code. ValueError on an unknown code or a nonzero padding nibble."""
    return _codec.unpack_tiers(raw, n_slots, first, tiers, positions)


def decode_body(
    body: memoryview,
    tiers: torch.Tensor,
    heads: int,
    geo: Geometry,
    wire_dtype: torch.dtype,
    kept: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a verified frame body (the bytes after the tier map) into [H, kept, D] keys and
    values in `wire_dtype` (D = geo.head_dim). `out`: destination tensors [H, capacity >= kept,
    D] to write into (e.g. a receive cache reused across requests); the result is then their
    [:, :kept] view. Raises ValueError if the body's size does not match the tier map, or `out`
    cannot hold the frame (`kv.check_destination`)."""
    d = geo.head_dim
    if out is None:
        keys = torch.empty(heads, kept, d, dtype=wire_dtype)
        values = torch.empty_like(keys)
    else:
        check_destination(out, heads, d, wire_dtype, kept)  # the C writes through it
        keys, values = out
    t = as_tier_codes(tiers).numpy()
    code = _DTYPE_CODES[wire_dtype]
    _codec.decode_frame(
        body, t, heads, t.shape[0], d, geo.group, int(geo.rotate), code,
        keys.data_ptr(), values.data_ptr(), code, kept, keys.shape[1], _threads(threads),
    )  # fmt: skip
    if keys.shape[1] == kept:
        return keys, values
    return keys[:, :kept], values[:, :kept]
