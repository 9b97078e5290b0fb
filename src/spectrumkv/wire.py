"""The SpectrumKV wire format, version 4: encode and decode, one layer frame at a time.

Layout (all integers little endian)::

    preamble   4s magic b"SPKV" | u16 version | u16 payload kind | u32 header_len
    header     msgpack (msgspec) `Header`, header_len bytes
    checksum   u64 xxh3_64(preamble + header)
    frame * n_layers, in layer order:
      head     2s b"LF" | u16 layer | u32 first_position | u32 n_slots | u32 body_len
      body     tier map: n_slots 4-bit Tier codes, low nibble first, ceil(n_slots/2) bytes
               then for tier in FP16, INT8, INT4, INT2 (only tiers present), K then V:
                 FP16: m*H*D 16-bit values in the engine's KV dtype (bit exact)
                 INTk asym-group: codes m*H*D*k/8 | scale m*H*(D/g) f16 | minimum m*H*(D/g) f16
                 INTk sym-token:  codes m*H*D*k/8 | scale m f16
                 INTk kivi keys:  codes m*H*D*k/8 | scale, minimum ceil(m/G)*H*D f16 each
               tokens of a tier appear in position order
      checksum u64 xxh3_64(head + d_0 + ... + d_k-1, seed), d_i = xxh3_64(body block i, seed)
               as u64: the body in blocks of CHECK_BLOCK (64 KiB) bytes, the last one shorter;
               seed = the header's checksum

A frame covers prompt positions [first_position, n_tokens). Seeding each frame's checksum with
the header's binds the frames to their header: every header carries a random `payload_id`, so a
frame from another payload (another request, another model) fails its checksum even where the
shapes agree. Hashing the body in blocks lets the compiled codec checksum a frame on all its
threads. Every length is checked against the fingerprint and the tier map before anything is
allocated. No pickle anywhere. (Version 1 had unseeded frame checksums and no payload_id;
version 2 hashed each frame in one serial pass; version 3 had a u16 `flags` (always 0) where
version 4 has the payload kind.)

Payload kinds: KIND_KV (0, this module: a KV cache) and KIND_SCD (1, `scd/wire.py`: Semantic
Cache Distillation codes for another model). Both share the preamble, the sealed header
(`seal_header` / `read_preamble`), the 16-byte frame head layout (`FRAME_HEAD`: magic, u16
layer, two u32 fields, u32 body_len) and the seeded block-wise frame checksum
(`frame_checksum`). A receiver of one kind refuses the other with IncompatiblePayloadError.
"""

from __future__ import annotations

import secrets
import struct
from functools import lru_cache

import msgspec
import numpy as np
import torch
import xxhash

from . import fused as fused_codec
from . import reference_codec
from .config import Geometry, QuantConfig
from .errors import ChecksumError, IncompatiblePayloadError, WireFormatError
from .kv import LayerKV, check_destination, first_slot
from .quant import section_bytes
from .tiers import STORED_TIERS, Tier, as_tier_codes

MAGIC = b"SPKV"
VERSION = 4
KIND_KV = 0
KIND_SCD = 1
_KIND_NAMES = {KIND_KV: "KV", KIND_SCD: "SCD"}
FRAME_MAGIC = b"LF"
MAX_HEADER_BYTES = 64 * 1024
MAX_TOKENS = 1 << 22
CHECK_BLOCK = 64 * 1024  # bytes of frame body per block digest (the C codec's CHECK_BLOCK)

_PREAMBLE = struct.Struct("<4sHHI")
_FRAME = struct.Struct("<2sHIII")
_CHECK = struct.Struct("<Q")
#: The frame head every payload kind shares (its 4th field, at byte 12, is body_len), the u64
#: checksum after headers and frames, and the preamble.
FRAME_HEAD, CHECKSUM, PREAMBLE = _FRAME, _CHECK, _PREAMBLE
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class Fingerprint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a receiver must match to use a payload. `weights_digest` tells two models of the
    same shape apart (e.g. a base model and its fine-tune)."""

    arch: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    kv_dtype: str
    rope: str
    sliding_window: int
    sliding_layers: tuple[int, ...]
    weights_digest: str

    def is_sliding(self, layer: int) -> bool:
        return layer in self.sliding_layers

    def kv_token_bytes(self, itemsize: int) -> int:
        """Bytes of one token's K and V over every layer and KV head, at `itemsize` bytes per
        element."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * itemsize

    def step_read_bytes(self, contexts: list[int], itemsize: int) -> int:
        """K and V bytes one decode step reads for requests attending over `contexts` tokens
        each: every token in full-attention layers, at most the window in sliding ones."""
        sliding = len(self.sliding_layers)
        tokens = sum((self.n_layers - sliding) * n + sliding * min(n, self.sliding_window)
                     for n in contexts)  # fmt: skip
        return tokens * self.kv_token_bytes(itemsize) // self.n_layers


class Header(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Payload header. `n_tokens`: cached prompt tokens (positions 0..n_tokens-1).
    `payload_id`: random per payload (see `new_payload_id`), binds the frames to this header.
    `tokens_digest`: `tokens_digest(ids)` of the cached tokens, so a receiver can check that the
    cache is for *its* prompt (0 = not recorded)."""

    fingerprint: Fingerprint
    n_tokens: int
    scheme: str
    group_size: int
    rotate: bool
    policy: str
    budget: float | None
    payload_id: int = 0
    tokens_digest: int = 0

    @property
    def quant(self) -> QuantConfig:
        return _quant_config(self.group_size, self.scheme, self.rotate)


@lru_cache(maxsize=64)
def _quant_config(group_size: int, scheme: str, rotate: bool) -> QuantConfig:
    """One (frozen) QuantConfig per setting: `Header.quant` is read on every frame, and building
    and validating a new one each time cost about 1 us."""
    return QuantConfig(group_size, scheme, rotate)  # type: ignore[arg-type]


_header_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(Header)


def new_payload_id() -> int:
    """A random 63-bit payload id."""
    return secrets.randbits(63)


def tokens_digest(ids: torch.Tensor | list[int]) -> int:
    """xxh3_64 of the token ids as little-endian int64, never 0 (0 means "not recorded")."""
    raw = torch.as_tensor(ids, dtype=torch.int64).contiguous().numpy().astype("<i8").tobytes()
    return xxhash.xxh3_64_intdigest(raw) or 1


def _checksum(*parts: bytes | memoryview, seed: int = 0) -> int:
    h = xxhash.xxh3_64(seed=seed)
    for p in parts:
        h.update(p)
    return h.intdigest()


def header_bytes(header: Header) -> bytes:
    """Preamble + header + checksum."""
    return seal_header(_header_encoder.encode(header))


def seal_header(body: bytes, kind: int = KIND_KV) -> bytes:
    """Preamble + `body` (a msgpack header, not checked against the schema) + checksum, as
    `header_bytes` writes them; its last 8 bytes are the seed of the payload's frame checksums
    (`frame_checksum`). `kind`: KIND_KV or KIND_SCD. Also for fuzzing and tests: a mutation
    that re-seals reaches every check behind the checksums."""
    pre = _PREAMBLE.pack(MAGIC, VERSION, kind, len(body))
    return pre + body + _CHECK.pack(_checksum(pre, body))


def frame_checksum(frame: bytes | bytearray | memoryview, seed: int) -> int:
    """The checksum of a frame's head + body (`frame`, without the trailing checksum): computed
    by the compiled codec on its threads where it is built, else here; both give the same value."""
    if fused_codec.compiled():
        return fused_codec.frame_checksum(frame, _FRAME.size, seed)
    return frame_checksum_reference(frame, seed)


def frame_checksum_reference(frame: bytes | bytearray | memoryview, seed: int) -> int:
    """`frame_checksum` with the `xxhash` package, one block at a time."""
    mv = memoryview(frame).cast("B")
    body = mv[_FRAME.size :]
    digests = [
        xxhash.xxh3_64_intdigest(body[i : i + CHECK_BLOCK], seed)
        for i in range(0, len(body), CHECK_BLOCK)
    ]
    return _checksum(mv[: _FRAME.size], struct.pack(f"<{len(digests)}Q", *digests), seed=seed)


@lru_cache(maxsize=64)
def frame_seed(header: Header) -> int:
    """The seed of every frame checksum of a payload: its header's checksum."""
    raw = header_bytes(header)
    return _CHECK.unpack_from(raw, len(raw) - _CHECK.size)[0]


@lru_cache(maxsize=64)
def geometry(header: Header) -> Geometry:
    """The codec geometry of a payload's frames (`QuantConfig.geometry` of its head_dim), the
    one both codecs encode and decode with. WireFormatError when the header's quantization
    cannot describe its fingerprint's head_dim, or its group_size is not the group that implies
    (a sender writes the group it used, `QuantConfig.group_for`)."""
    head_dim = header.fingerprint.head_dim
    try:
        geo = header.quant.geometry(head_dim)
    except ValueError as e:
        raise WireFormatError(f"bad quantization parameters: {e}") from None
    if header.group_size != geo.group:
        raise WireFormatError(
            f"header group_size {header.group_size} is not the group its fingerprint implies "
            f"({geo.group} for head_dim {head_dim})"
        )
    return geo


def frame_size(n_slots: int, tier_counts: dict[Tier, int], fp: Fingerprint, q: QuantConfig) -> int:
    """Exact size in bytes of a frame with these tier counts (mirrors `frame_bytes`)."""
    body = (n_slots + 1) // 2
    for tier, count in tier_counts.items():
        body += section_bytes(tier, count, fp.n_kv_heads, fp.head_dim, q)
    return _FRAME.size + body + _CHECK.size


def frame_overhead(n_slots: int) -> int:
    """Bytes of a frame that do not depend on the tiers: head, tier map, checksum."""
    return _FRAME.size + (n_slots + 1) // 2 + _CHECK.size


def read_tier_map(
    raw: bytes | memoryview, n_slots: int, first: int
) -> tuple[torch.Tensor, torch.Tensor, dict[Tier, int]]:
    """Unpack and check a frame's tier map (ceil(n_slots/2) bytes). Returns the n_slots Tier
    codes (uint8), the positions (first + slot, int64) of the kept slots and the slot count of
    each stored tier. Raises WireFormatError on an unknown code or a nonzero padding nibble."""
    if fused_codec.compiled():
        t = np.empty(n_slots, dtype=np.uint8)  # numpy: a torch.empty costs 3-4x more
        positions = np.empty(n_slots, dtype=np.int64)
        try:
            per_code = fused_codec.unpack_tiers(raw, n_slots, first, t, positions)
        except ValueError as e:
            raise WireFormatError(str(e)) from None
        kept = n_slots - per_code[int(Tier.DROP)]
        return torch.from_numpy(t), torch.from_numpy(positions[:kept]), _stored_counts(per_code)
    t = reference_codec.unpack_tier_map(raw, n_slots)
    tiers = torch.from_numpy(t)
    return tiers, torch.from_numpy(np.flatnonzero(t) + first), _tier_counts(tiers)


def frame_bytes(
    layer: int,
    first_position: int,
    tiers: torch.Tensor,
    kv: LayerKV,
    header: Header,
    fused: bool | None = None,
    out: bytearray | memoryview | None = None,
) -> memoryview:
    """Encode one layer: head + body + checksum, written once, in place, with no joins.

    `tiers`: [n_slots] Tier codes for kv's slots (positions from first_position to n_tokens-1,
    kv holds exactly those slots). `fused`: None uses the compiled kernels when they cover the
    scheme, False forces the torch reference (identical bytes). `out`: a buffer to encode into
    (e.g. a send buffer reused across frames); the frame is then a memoryview of its prefix.
    Without it the frame is a memoryview of new memory, which every byte is written into once
    (not zero-filled first as a bytearray would be: that pass cost 10-20 % of an encode).
    WireFormatError for a header whose quantization a receiver would refuse (`geometry`)."""
    geo = geometry(header)
    fp, q = header.fingerprint, header.quant
    t = as_tier_codes(tiers)
    n = t.numel()
    _check_layer(kv, fp, n)
    counts = _tier_counts(t)
    size = frame_size(n, counts, fp, q)
    if out is None:
        frame = mv = memoryview(np.empty(size, dtype=np.uint8))
    else:
        mv = memoryview(out).cast("B")
        if len(mv) < size:
            raise ValueError(f"output buffer holds {len(mv)} bytes, the frame needs {size}")
        frame = mv = mv[:size]
    body_end = size - _CHECK.size
    _FRAME.pack_into(mv, 0, FRAME_MAGIC, layer, first_position, n, body_end - _FRAME.size)
    body = mv[_FRAME.size : body_end]
    wire_dtype = KV_DTYPES[fp.kv_dtype]
    if fused is None:
        fused = fused_codec.enabled(q)
    if fused:
        fused_codec.encode_body(kv.keys, kv.values, t, geo, wire_dtype, body)
    else:
        reference_codec.encode_body(body, t, kv, wire_dtype, q)
    _CHECK.pack_into(mv, body_end, frame_checksum(mv[:body_end], frame_seed(header)))
    return frame


def _check_layer(kv: LayerKV, fp: Fingerprint, n_slots: int) -> None:
    """ValueError unless kv is [heads, n_slots, head_dim]: heads and head_dim as the fingerprint
    says, a slot per tier code. (Each encoder checks the dtypes it reads: `kv.check_source`.)"""
    shape, want = tuple(kv.keys.shape), (fp.n_kv_heads, n_slots, fp.head_dim)
    if shape != want:
        raise ValueError(
            f"layer KV is {shape}; header and tier list say {want} (KV heads, slots, head_dim)"
        )


def _tier_counts(tiers: torch.Tensor) -> dict[Tier, int]:
    """Slots per stored tier of a contiguous uint8 tier map; ValueError on a code above FP16."""
    if fused_codec.compiled():
        return _stored_counts(fused_codec.count_tiers(tiers))
    per_code = np.bincount(tiers.numpy(), minlength=len(Tier))
    if per_code.size > len(Tier):
        raise ValueError("invalid tier code in tier map")
    return _stored_counts(per_code)


def _stored_counts(per_code) -> dict[Tier, int]:
    """{stored tier: slots} from slot counts indexed by Tier code."""
    return {t: int(per_code[int(t)]) for t in STORED_TIERS}


def read_preamble(buf: bytes | memoryview, kind: int = KIND_KV) -> tuple[memoryview, int]:
    """Check the preamble and header checksum at the start of `buf` for a payload of `kind`.
    Returns (the msgpack header bytes, bytes consumed including the checksum). WireFormatError
    for a bad magic, length or truncation, ChecksumError for a bad checksum,
    IncompatiblePayloadError for another version or payload kind."""
    mv = memoryview(buf)
    if len(mv) < _PREAMBLE.size:
        raise WireFormatError(f"payload too short for a preamble ({len(mv)} bytes)")
    magic, version, got_kind, hlen = _PREAMBLE.unpack_from(mv, 0)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {bytes(magic)!r}; not a SpectrumKV payload")
    if version != VERSION:
        raise IncompatiblePayloadError(f"wire version {version} not supported (this is {VERSION})")
    if hlen > MAX_HEADER_BYTES:
        raise WireFormatError(f"declared header length {hlen} exceeds {MAX_HEADER_BYTES}")
    end = _PREAMBLE.size + hlen
    if len(mv) < end + _CHECK.size:
        raise WireFormatError("payload truncated inside the header")
    body = mv[_PREAMBLE.size : end]
    (check,) = _CHECK.unpack_from(mv, end)
    if check != _checksum(mv[: _PREAMBLE.size], body):
        raise ChecksumError("header checksum mismatch")
    if got_kind != kind:
        got = _KIND_NAMES.get(got_kind, f"unknown kind {got_kind:#x}")
        raise IncompatiblePayloadError(
            f"a {got} payload where a {_KIND_NAMES[kind]} payload was expected"
        )
    return body, end + _CHECK.size


def read_header(buf: bytes | memoryview, expect: Fingerprint | None = None) -> tuple[Header, int]:
    """Parse and verify the KV header at the start of `buf`. Returns (header, bytes consumed)."""
    body, consumed = read_preamble(buf, KIND_KV)
    try:
        header = _header_decoder.decode(body)
    except msgspec.MsgspecError as e:
        raise WireFormatError(f"malformed header: {e}") from None
    _validate_header(header)
    if expect is not None and header.fingerprint != expect:
        raise IncompatiblePayloadError(fingerprint_diff(header.fingerprint, expect))
    return header, consumed


def _validate_header(h: Header) -> None:
    fp = h.fingerprint
    if not (0 <= h.payload_id < 1 << 63 and 0 <= h.tokens_digest < 1 << 64):
        raise WireFormatError("payload_id or tokens_digest out of range")
    if not (0 <= h.n_tokens <= MAX_TOKENS):
        raise WireFormatError(f"n_tokens {h.n_tokens} out of range")
    if not (1 <= fp.n_layers <= 4096 and 1 <= fp.n_kv_heads <= 1024 and 1 <= fp.head_dim <= 4096):
        raise WireFormatError("fingerprint dimensions out of range")
    if fp.kv_dtype not in KV_DTYPES:
        raise WireFormatError(f"unknown kv dtype {fp.kv_dtype!r}")
    if any(not (0 <= i < fp.n_layers) for i in fp.sliding_layers):
        raise WireFormatError("sliding layer index out of range")
    geometry(h)


def fingerprint_diff(got: Fingerprint, want: Fingerprint) -> str:
    diffs = [
        f"{f}: payload {getattr(got, f)!r} != receiver {getattr(want, f)!r}"
        for f in Fingerprint.__struct_fields__
        if getattr(got, f) != getattr(want, f)
    ]
    return "payload was produced for a different model (" + "; ".join(diffs) + ")"


def read_frame(
    buf: bytes | bytearray | memoryview,
    offset: int,
    header: Header,
    layer: int,
    fused: bool | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[LayerKV, torch.Tensor, int]:
    """Parse and verify frame `layer` at `offset`.

    Returns (kept slots of the layer in the payload's KV dtype, the frame's tier map, offset
    after the frame). `fused`: as in `frame_bytes`. `out`: destination K and V tensors
    [H, capacity, D] (contiguous, KV dtype, capacity >= kept slots) to decode into, e.g. a
    receive cache reused across requests; the returned keys/values are then views of them
    (ValueError for tensors that cannot hold the frame, before anything is decoded).
    """
    fp, q = header.fingerprint, header.quant
    mv = memoryview(buf)
    if len(mv) < offset + _FRAME.size:
        raise WireFormatError(f"payload truncated before frame {layer}")
    magic, got_layer, first, n_slots, body_len = _FRAME.unpack_from(mv, offset)
    if magic != FRAME_MAGIC:
        raise WireFormatError(f"bad frame magic at offset {offset}")
    if got_layer != layer:
        raise WireFormatError(f"expected frame for layer {layer}, got layer {got_layer}")
    want_first = first_slot(fp.is_sliding(layer), fp.sliding_window, header.n_tokens)
    if first != want_first or first + n_slots != header.n_tokens:
        raise WireFormatError(
            f"frame {layer} covers positions [{first}, {first + n_slots}), "
            f"expected [{want_first}, {header.n_tokens})"
        )
    max_body = (n_slots + 1) // 2 + 2 * n_slots * fp.n_kv_heads * fp.head_dim * 2
    if body_len > max_body:
        raise WireFormatError(f"frame {layer} declares {body_len} bytes, more than {max_body}")
    body_start = offset + _FRAME.size
    end = body_start + body_len
    if len(mv) < end + _CHECK.size:
        raise WireFormatError(f"payload truncated inside frame {layer}")
    (check,) = _CHECK.unpack_from(mv, end)
    if check != frame_checksum(mv[offset:end], frame_seed(header)):
        raise ChecksumError(f"frame {layer} checksum mismatch")

    map_len = (n_slots + 1) // 2
    tiers, positions, counts = read_tier_map(mv[body_start : body_start + map_len], n_slots, first)
    if frame_size(n_slots, counts, fp, q) != _FRAME.size + body_len + _CHECK.size:
        raise WireFormatError(f"frame {layer} body length {body_len} does not match its tier map")

    kept = positions.numel()
    sections = mv[body_start + map_len : end]
    if fused is None:
        fused = fused_codec.enabled(q)
    if fused:
        keys, values = fused_codec.decode_body(
            sections, tiers, fp.n_kv_heads, geometry(header), KV_DTYPES[fp.kv_dtype], kept, out,
        )  # fmt: skip
    else:
        wire_dtype = KV_DTYPES[fp.kv_dtype]
        if out is not None:
            check_destination(out, fp.n_kv_heads, fp.head_dim, wire_dtype, kept)
        keys, values = reference_codec.decode_body(
            sections, tiers, counts, positions - first, fp.n_kv_heads, fp.head_dim, wire_dtype, q
        )
        if out is not None:
            out[0][:, :kept] = keys
            out[1][:, :kept] = values
            keys, values = out[0][:, :kept], out[1][:, :kept]
    return LayerKV(keys, values, positions), tiers, end + _CHECK.size


def frame_end(buf: bytes | memoryview, offset: int, layer: int) -> int:
    """Offset just past the frame starting at `offset` (from its declared length, unverified)."""
    if len(buf) < offset + _FRAME.size:
        raise WireFormatError(f"payload truncated before frame {layer}")
    body_len = _FRAME.unpack_from(buf, offset)[4]
    return offset + _FRAME.size + body_len + _CHECK.size
