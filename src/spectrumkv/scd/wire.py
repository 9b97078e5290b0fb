"""SCD payloads on the wire: payload kind KIND_SCD of wire format v4 (see `spectrumkv.wire`).

Layout (integers little endian; the preamble, sealed header, frame head and checksums are
`spectrumkv.wire`'s)::

    preamble   "SPKV" | u16 version (4) | u16 kind (1 = SCD) | u32 header_len
    header     msgpack `ScdHeader`: producer and consumer fingerprints, the artifact digest,
               n_tokens, code_group, payload_id (random), tokens_digest
    checksum   u64 xxh3_64(preamble + header)
    frame * n_layers, in layer order:
      head     "SC" | u16 layer | u32 path (0 = reuse codes K,V; 1 = patch code H) | u32 rows
               | u32 body_len
      body     tier map: rows 4-bit Tier codes (FP16 / INT8 / INT4 / INT2 / DROP)
               then for tier in FP16, INT8, INT4, INT2 (present ones), for each code of the
               path (reuse: K then V; patch: H), the tier's tokens in position order
               (a DROP token has no codes: B's cache holds no row for it):
                 FP16: m*r float16
                 INTk: codes m*r*k/8 | scale m*(r/g) f16 | minimum m*(r/g) f16 (g: the largest
                       power of two up to code_group, 64, that divides r; the project's
                       asym-group quantizer, no rotation)
      checksum as for KV frames (seeded with the header's checksum)

A frame codes the positions its layer caches: all n_tokens (rows = n_tokens), or on a
sliding-window layer the last ones, from `kv.first_slot` on (rows = n_tokens - first), as KV
frames do. The code widths r of each layer are not on the wire: they are the artifact's (its
ranks and patch rank), which both sides hold and the header names by digest (`Layout`). A receiver
checks the header against its own artifact and models before any frame, and every frame's
declared length against the widths and tier map before anything is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import msgspec
import torch

from ..config import QuantConfig
from ..errors import ChecksumError, IncompatiblePayloadError, WireFormatError
from ..kv import first_slot
from ..quant import Quantized, dequantize, quantize, section_bytes
from ..reference_codec import pack_tier_map, unpack_tier_map
from ..tiers import STORED_TIERS, TIER_BITS, Tier, as_tier_codes
from ..wire import (
    CHECKSUM,
    FRAME_HEAD,
    KIND_SCD,
    MAX_HEADER_BYTES,
    MAX_TOKENS,
    PREAMBLE,
    Fingerprint,
    fingerprint_diff,
    frame_checksum,
    read_preamble,
    seal_header,
)
from .artifact import Artifact, digest
from .codes import CODE_GROUP, LayerCode

FRAME_MAGIC = b"SC"
PATH_REUSE, PATH_PATCH = 0, 1
_QUANT = QuantConfig(group_size=CODE_GROUP, rotate=False)


class ScdHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An SCD payload's header. `artifact`: the digest (`artifact.digest`) of the calibration
    artifact the codes were made with; `n_tokens`: positions 0..n_tokens-1 are coded;
    `payload_id` / `tokens_digest`: as in the KV header (`wire.Header`)."""

    producer: Fingerprint
    consumer: Fingerprint
    artifact: str
    n_tokens: int
    code_group: int = CODE_GROUP
    payload_id: int = 0
    tokens_digest: int = 0


@dataclass(frozen=True)
class Layout:
    """What both ends know from the artifact: its digest, the models, and per layer the code
    widths: (r_K, r_V) on the reuse path, (r_H,) at a patch layer."""

    artifact: str
    producer: Fingerprint
    consumer: Fingerprint
    widths: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, art: Artifact) -> Layout:
        """The layout of `art`'s codes; IncompatiblePayloadError when the two models cache
        different rows (another sliding-window layout)."""
        m = art.manifest
        a, b = m.producer, m.consumer
        if (a.sliding_layers, a.sliding_window) != (b.sliding_layers, b.sliding_window):
            raise IncompatiblePayloadError(
                f"the models' sliding-window layers differ: {a.sliding_layers} of "
                f"{a.sliding_window} tokens vs {b.sliding_layers} of {b.sliding_window}"
            )
        patch = set(m.patch_layers)
        widths = tuple(
            (m.patch_rank,) if i in patch else (int(rk), int(rv))
            for i, (rk, rv) in enumerate(m.ranks)
        )
        return cls(digest(art), m.producer, m.consumer, widths)

    def path(self, layer: int) -> int:
        return PATH_PATCH if len(self.widths[layer]) == 1 else PATH_REUSE

    def first(self, layer: int, n_tokens: int) -> int:
        """The first position `layer` caches of a prompt of n_tokens (0 but on a sliding-window
        layer whose window the prompt outgrows): its frame codes positions first..n_tokens-1."""
        fp = self.consumer
        return first_slot(fp.is_sliding(layer), fp.sliding_window, n_tokens)

    def max_frame_bytes(self, layer: int, n_tokens: int) -> int:
        """The largest valid frame of `layer` for n_tokens (every row at FP16)."""
        rows = n_tokens - self.first(layer, n_tokens)
        return frame_size(rows, {Tier.FP16: rows}, self.widths[layer])

    def max_message_bytes(self, n_tokens: int) -> int:
        """The largest valid header or frame of a payload of n_tokens: a receiver's cap on
        every message before it allocates."""
        frames = max(self.max_frame_bytes(i, n_tokens) for i in range(len(self.widths)))
        return max(frames, PREAMBLE.size + MAX_HEADER_BYTES + CHECKSUM.size)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ScdHeader)


def header_bytes(header: ScdHeader) -> bytes:
    """Preamble + header + checksum (payload kind SCD)."""
    return seal_header(_encoder.encode(header), KIND_SCD)


@lru_cache(maxsize=64)
def frame_seed(header: ScdHeader) -> int:
    """The seed of every frame checksum of a payload: its header's checksum."""
    raw = header_bytes(header)
    return CHECKSUM.unpack_from(raw, len(raw) - CHECKSUM.size)[0]


def _section_bytes(tier: Tier, m: int, width: int) -> int:
    """Wire bytes of m tokens' codes of one width at `tier` (one code, not K and V)."""
    return section_bytes(tier, m, 1, width, _QUANT) // 2


def frame_size(n: int, counts: dict[Tier, int], widths: tuple[int, ...]) -> int:
    """Wire bytes of a frame of n rows (its tier map covers all n) whose stored rows are
    `counts` per tier (DROP rows take no code bytes), for a layer of code `widths`."""
    body = (n + 1) // 2 + sum(_section_bytes(t, m, r) for t, m in counts.items() for r in widths)
    return FRAME_HEAD.size + body + CHECKSUM.size


def _parts(code: LayerCode) -> list[torch.Tensor]:
    return [code.h] if code.h is not None else [code.k, code.v]


def frame_bytes(code: LayerCode, tiers: torch.Tensor, header: ScdHeader, layout: Layout) -> bytes:
    """One layer's frame: `code` (its tensors [rows, r], any float dtype, for the positions the
    layer caches: `Layout.first` on) with position i's codes at `tiers[i]` (uint8 Tier codes
    FP16/INT8/INT4/INT2, one per prompt position, or DROP: that row of `code` is not sent).
    ValueError for codes that do not match the layout or the header."""
    layer, first = code.layer, layout.first(code.layer, header.n_tokens)
    n = header.n_tokens - first
    parts = _parts(code)
    widths = layout.widths[layer]
    if tuple(int(p.shape[1]) for p in parts) != widths or any(p.shape[0] != n for p in parts):
        shapes = [tuple(p.shape) for p in parts]
        raise ValueError(f"layer {layer} codes are {shapes}; the layout says {n} x {widths}")
    if n and int(code.positions[0]) != first:
        raise ValueError(f"layer {layer} codes start at position {int(code.positions[0])}, "
                         f"the layer caches from {first}")  # fmt: skip
    t = as_tier_codes(tiers)
    if t.numel() != header.n_tokens:
        raise ValueError(f"SCD tier map: {t.numel()} tiers for {header.n_tokens} positions")
    t = t[first:]
    if bool((t > int(Tier.FP16)).any()):
        raise ValueError("SCD tier map: a Tier code per token")
    out = [pack_tier_map(t)]
    counts = {}
    for tier in STORED_TIERS:
        idx = (t == int(tier)).nonzero().flatten()
        counts[tier] = idx.numel()
        if idx.numel() == 0:
            continue
        for p in parts:
            rows = p.index_select(0, idx).float()
            if tier == Tier.FP16:
                out.append(rows.half().numpy().tobytes())
                continue
            q = quantize(rows[:, None, :], tier, _QUANT)
            out += [q.codes.numpy().tobytes(), q.scale.numpy().tobytes(),
                    q.minimum.numpy().tobytes()]  # fmt: skip
    body = b"".join(out)
    head = FRAME_HEAD.pack(FRAME_MAGIC, layer, layout.path(layer), n, len(body))
    if FRAME_HEAD.size + len(body) + CHECKSUM.size != frame_size(n, counts, widths):
        raise RuntimeError("SCD frame size does not match its layout")  # a bug, not bad input
    frame = head + body
    return frame + CHECKSUM.pack(frame_checksum(frame, frame_seed(header)))


def read_header(buf: bytes | memoryview, layout: Layout) -> tuple[ScdHeader, int]:
    """Parse and verify an SCD header for a receiver holding `layout`'s artifact. Returns
    (header, bytes consumed). IncompatiblePayloadError for another wire version, payload kind,
    artifact or model; WireFormatError / ChecksumError for a malformed one."""
    body, consumed = read_preamble(buf, KIND_SCD)
    try:
        h = _decoder.decode(body)
    except msgspec.MsgspecError as e:
        raise WireFormatError(f"malformed SCD header: {e}") from None
    if not (0 <= h.payload_id < 1 << 63 and 0 <= h.tokens_digest < 1 << 64):
        raise WireFormatError("payload_id or tokens_digest out of range")
    if not 1 <= h.n_tokens <= MAX_TOKENS:
        raise WireFormatError(f"n_tokens {h.n_tokens} out of range")
    if h.code_group != CODE_GROUP:
        raise WireFormatError(f"code_group {h.code_group} is not {CODE_GROUP}")
    if h.artifact != layout.artifact:
        raise IncompatiblePayloadError(
            f"SCD codes made with artifact {h.artifact[:16]}..., this receiver holds "
            f"{layout.artifact[:16]}..."
        )
    for role, got, want in (("producer", h.producer, layout.producer),
                            ("consumer", h.consumer, layout.consumer)):  # fmt: skip
        if got != want:
            raise IncompatiblePayloadError(f"{role}: {fingerprint_diff(got, want)}")
    return h, consumed


def read_frame(
    buf: bytes | memoryview, offset: int, header: ScdHeader, layout: Layout, layer: int
) -> tuple[LayerCode, int]:
    """Parse and verify frame `layer` at `offset`: returns (its codes as float32 [m, r]
    tensors for the m rows it keeps, at their positions; the offset after the frame).
    WireFormatError for a frame that keeps no row (a layer always holds the last token)."""
    mv = memoryview(buf)
    first = layout.first(layer, header.n_tokens)
    n, widths = header.n_tokens - first, layout.widths[layer]
    if len(mv) < offset + FRAME_HEAD.size:
        raise WireFormatError(f"payload truncated before SCD frame {layer}")
    magic, got_layer, path, got_n, body_len = FRAME_HEAD.unpack_from(mv, offset)
    if magic != FRAME_MAGIC:
        raise WireFormatError(f"bad SCD frame magic at offset {offset}")
    if got_layer != layer:
        raise WireFormatError(f"expected SCD frame for layer {layer}, got layer {got_layer}")
    if path != layout.path(layer):
        raise WireFormatError(f"SCD frame {layer} has path {path}, the artifact says "
                              f"{layout.path(layer)}")  # fmt: skip
    if got_n != n:
        raise WireFormatError(f"SCD frame {layer} covers {got_n} tokens, its layer caches {n}")
    max_body = layout.max_frame_bytes(layer, n) - FRAME_HEAD.size - CHECKSUM.size
    if body_len > max_body:
        raise WireFormatError(f"SCD frame {layer} declares {body_len} bytes, more than {max_body}")
    end = offset + FRAME_HEAD.size + body_len
    if len(mv) < end + CHECKSUM.size:
        raise WireFormatError(f"payload truncated inside SCD frame {layer}")
    (check,) = CHECKSUM.unpack_from(mv, end)
    if check != frame_checksum(mv[offset:end], frame_seed(header)):
        raise ChecksumError(f"SCD frame {layer} checksum mismatch")
    start = offset + FRAME_HEAD.size
    map_len = (n + 1) // 2
    if body_len < map_len:
        raise WireFormatError(f"SCD frame {layer} body is shorter than its tier map")
    tiers = torch.from_numpy(unpack_tier_map(mv[start : start + map_len], n))
    kept = tiers != int(Tier.DROP)
    if not bool(kept.any()):
        raise WireFormatError(f"SCD frame {layer} drops every token")
    tiers = tiers[kept]  # the kept rows, in position order
    counts = {t: int((tiers == int(t)).sum()) for t in STORED_TIERS}
    if frame_size(n, counts, widths) != FRAME_HEAD.size + body_len + CHECKSUM.size:
        raise WireFormatError(f"SCD frame {layer} body length {body_len} does not match its "
                              "tier map")  # fmt: skip
    body = bytearray(mv[start + map_len : end])  # torch.frombuffer needs a writable buffer
    outs = [torch.empty(tiers.numel(), r) for r in widths]
    pos = 0
    for tier in STORED_TIERS:
        m = counts[tier]
        if m == 0:
            continue
        idx = (tiers == int(tier)).nonzero().flatten()
        for out, r in zip(outs, widths, strict=True):
            x, pos = _read_section(body, pos, tier, m, r)
            out[idx] = x
    pos_ids = torch.arange(first, header.n_tokens)[kept]
    if len(outs) == 1:
        return LayerCode(layer, pos_ids, h=outs[0], nbytes=body_len), end + CHECKSUM.size
    return LayerCode(layer, pos_ids, k=outs[0], v=outs[1], nbytes=body_len), end + CHECKSUM.size


def _take(body: bytearray, pos: int, dtype: torch.dtype, count: int) -> tuple[torch.Tensor, int]:
    size = torch.empty(0, dtype=dtype).element_size()
    t = torch.frombuffer(body, dtype=dtype, count=count, offset=pos) if count else torch.empty(0)
    return t, pos + count * size


def _read_section(body: bytearray, pos: int, tier: Tier, m: int, r: int):
    """m tokens' codes of width r at `tier` -> [m, r] float32, and the position after them."""
    if tier == Tier.FP16:
        x, pos = _take(body, pos, torch.float16, m * r)
        return x.float().view(m, r), pos
    codes, pos = _take(body, pos, torch.uint8, m * r * TIER_BITS[tier] // 8)
    ng = r // _QUANT.group_for(r)
    scale, pos = _take(body, pos, torch.float16, m * ng)
    minimum, pos = _take(body, pos, torch.float16, m * ng)
    q = Quantized(codes.view(m, 1, -1), scale.view(m, 1, ng), minimum.view(m, 1, ng))
    return dequantize(q, tier, _QUANT, r)[:, 0], pos


class ScdDecoder:
    """Incremental decoder of a streamed SCD payload: the header, then frames in layer order,
    each verified on arrival. `finish()` checks that every layer arrived."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.header: ScdHeader | None = None
        self.codes: list[LayerCode] = []

    def feed_header(self, buf: bytes | memoryview) -> ScdHeader:
        if self.header is not None:
            raise WireFormatError("a second header in one SCD payload")
        header, used = read_header(buf, self.layout)
        if used != len(buf):
            raise WireFormatError(f"{len(buf) - used} unexpected bytes after the SCD header")
        self.header = header
        return header

    def feed_frame(self, buf: bytes | memoryview) -> LayerCode:
        if self.header is None:
            raise WireFormatError("an SCD frame before the header")
        layer = len(self.codes)
        if layer >= len(self.layout.widths):
            raise WireFormatError("more SCD frames than layers")
        code, used = read_frame(buf, 0, self.header, self.layout, layer)
        if used != len(buf):
            raise WireFormatError(f"{len(buf) - used} unexpected bytes after SCD frame {layer}")
        self.codes.append(code)
        return code

    def finish(self) -> tuple[ScdHeader, list[LayerCode]]:
        if self.header is None or len(self.codes) != len(self.layout.widths):
            got = len(self.codes)
            raise WireFormatError(f"SCD payload incomplete: {got} of {len(self.layout.widths)} "
                                  "frames")  # fmt: skip
        return self.header, self.codes


def decode(buf: bytes | memoryview, layout: Layout) -> tuple[ScdHeader, list[LayerCode]]:
    """A whole SCD payload (header and every frame, nothing after) -> (header, codes)."""
    dec = ScdDecoder(layout)
    header, offset = read_header(buf, layout)
    dec.header = header
    for layer in range(len(layout.widths)):
        code, offset = read_frame(buf, offset, header, layout, layer)
        dec.codes.append(code)
    if offset != len(buf):
        raise WireFormatError(f"{len(buf) - offset} unexpected bytes after the last SCD frame")
    return dec.finish()
