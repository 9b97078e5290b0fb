"""The fuzzer's mutations of a valid payload (`bench fuzz`), by family: KV payloads and SCD
payloads alike (both share the preamble, the sealed header, the 16-byte frame head with body_len
at byte 12, a body that starts with a 4-bit tier map, and the seeded frame checksums).

Each takes (payload, its sample, another sample of the same kind, rng) and returns the mutated
bytes, or (bytes, receiver) when the receiver should expect another model (KV: a Fingerprint;
SCD: a `scd.wire.Layout`) than the sample's.

Raw families (bit flips, overwrites, truncation, extension, length fields, frame order, swapped
headers) leave the checksums as they were, so almost all of them end at a checksum. The
`resealed_*` families recompute the header checksum and every frame checksum after mutating,
as a buggy sender or an on-path attacker could, so they reach the checks behind the checksums:
header schema and ranges, the quantization geometry, frame positions and lengths, tier codes and
padding, body length against the tier map, one kept token set, and the sections' values.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from ..scd import wire as scd_wire
from ..wire import KIND_KV, KIND_SCD, Fingerprint, frame_checksum, frame_end, header_bytes
from ..wire import seal_header as _seal_header

_CHECK = 8  # bytes of a checksum
_HEAD = 16  # bytes of a frame head: "LF" | u16 layer | u32 first | u32 n_slots | u32 body_len
_PREAMBLE = 12  # bytes before the msgpack header


@dataclass
class Sample:
    """A valid payload, where its frames start, and its reference decode. `kind`: KIND_KV
    (header a `wire.Header`, decoded a `payload.Payload`) or KIND_SCD (header a
    `scd.wire.ScdHeader`, decoded (header, codes), `layout` the receiver's `Layout`)."""

    payload: bytes
    header: Any
    frame_starts: list[int]
    decoded: Any
    kind: int = KIND_KV
    layout: Any = None


Mutated = bytes | tuple[bytes, Any]


def _frames(b: bytes, s: Sample) -> tuple[bytes, list[bytes]]:
    """The sealed header and the frames (each with its checksum) of an unmutated payload."""
    ends = [frame_end(b, st, i) for i, st in enumerate(s.frame_starts)]
    return b[: s.frame_starts[0]], [b[st:e] for st, e in zip(s.frame_starts, ends, strict=True)]


def seal(header_msgpack: bytes, frames: list[bytes], kind: int = KIND_KV) -> bytes:
    """A payload of `kind` with every checksum recomputed: the preamble and checksum around
    `header_msgpack`, then each frame (head + body, no checksum) followed by its checksum
    seeded with the new header's."""
    head = _seal_header(header_msgpack, kind)
    (seed,) = struct.unpack_from("<Q", head, len(head) - _CHECK)
    return head + b"".join(f + struct.pack("<Q", frame_checksum(f, seed)) for f in frames)


def _unsealed(b: bytes, s: Sample) -> tuple[bytes, list[bytearray]]:
    """The msgpack header and the frames without their checksums, to mutate and `seal`."""
    head, frames = _frames(b, s)
    return head[_PREAMBLE:-_CHECK], [bytearray(f[:-_CHECK]) for f in frames]


# ---- raw families: checksums untouched ----


def _bit_flips(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    out = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _byte_overwrite(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    out = bytearray(b)
    i = rng.randrange(len(out))
    span = min(len(out) - i, rng.randint(1, 16))
    out[i : i + span] = bytes(rng.getrandbits(8) for _ in range(span))
    return bytes(out)


def _truncate(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    return b[: rng.randrange(len(b))]


def _extend(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    return b + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))


def _new_value(value: int, top: int, rng: random.Random) -> int:
    """A small change, zero, the maximum or a random value of a `top`-bounded field."""
    value = rng.choice((0, top, value + 1, max(0, value - 1), rng.randint(0, top), value * 2 + 1))
    return min(value, top)


def _length_field(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    """Overwrite a declared length or count: the header length (preamble offset 8), or a frame's
    layer (+2), first position (+4), slot count (+8) or body length (+12)."""
    out = bytearray(b)
    if rng.random() < 0.25 or not s.frame_starts:
        offset, fmt = 8, "<I"  # header_len in the preamble
    else:
        start = rng.choice(s.frame_starts)
        offset, fmt = rng.choice(
            ((start + 2, "<H"), (start + 4, "<I"), (start + 8, "<I"), (start + 12, "<I"))
        )
    (value,) = struct.unpack_from(fmt, out, offset)
    struct.pack_into(
        fmt, out, offset, _new_value(value, 0xFFFF if fmt == "<H" else 0xFFFFFFFF, rng)
    )
    return bytes(out)


def _reorder(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    head, frames = _frames(b, s)
    action = rng.choice(("swap", "drop", "duplicate", "reverse"))
    if action == "swap" and len(frames) > 1:
        i, j = rng.sample(range(len(frames)), 2)
        frames[i], frames[j] = frames[j], frames[i]
    elif action == "drop":
        frames.pop(rng.randrange(len(frames)))
    elif action == "duplicate":
        i = rng.randrange(len(frames))
        frames.insert(i, frames[i])
    else:
        frames.reverse()
    return head + b"".join(frames)


def _header_swap(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    """Another payload's header (another model, or the same model with another payload id) in
    front of this payload's frames."""
    other = o.header
    if rng.random() < 0.5:  # same model and shape, another request
        other = msgspec.structs.replace(s.header, payload_id=rng.getrandbits(63))
    _, frames = _frames(b, s)
    seal_header = scd_wire.header_bytes if s.kind == KIND_SCD else header_bytes
    return seal_header(other) + b"".join(frames)


# ---- resealed families: every checksum recomputed after the mutation ----

_ODD_VALUES: tuple[Any, ...] = (
    -1, 0, 1, 3, 2**31, 2**63, 2**64 - 1, 1.5, float("nan"), float("inf"), -0.0, "x", "", None,
    True, [], [1, 2], {"a": 1}, b"\x00",
)  # fmt: skip


def _mutate_value(value: Any, rng: random.Random) -> Any:
    """A nearby or an odd value for one header field."""
    if rng.random() < 0.4:
        return rng.choice(_ODD_VALUES)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, value * 2, value // 2, -value, value + 2**32))
    if isinstance(value, float):
        return rng.choice((value * 2, -value, 0.0, 1.0 + 1e-9, 2.0))
    if isinstance(value, str):
        return rng.choice(
            ("asym-group", "sym-token", "kivi", "nf4", "float32", "bfloat16", value * 2)
        )
    if isinstance(value, list):
        return rng.choice((value[1:], [*value, rng.randint(-2, 70)], [rng.randint(0, 4)] * 2))
    return rng.choice(_ODD_VALUES)


def _resealed_header(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    """Change, delete or add one header or fingerprint field (a value, its type, the schema),
    then re-seal. Half the time the receiver's model is the one the new header claims, so the
    frames are checked against that shape rather than refused as another model's."""
    raw, frames = _unsealed(b, s)
    doc = msgspec.msgpack.decode(raw)
    nested = [v for _, v in sorted(doc.items()) if isinstance(v, dict)]  # fingerprints
    target = rng.choice(nested) if nested and rng.random() < 0.4 else doc
    key = rng.choice(sorted(target))
    action = rng.random()
    if action < 0.1:
        del target[key]
    elif action < 0.15:
        target[f"extra_{rng.randrange(9)}"] = rng.choice(_ODD_VALUES)
    else:
        target[key] = _mutate_value(target[key], rng)
    try:
        body = msgspec.msgpack.encode(doc)
    except (OverflowError, msgspec.EncodeError):
        body = raw + b"\xc0"  # a value msgpack cannot hold: trailing bytes instead
    mutated = seal(body, frames, s.kind)
    if rng.random() < 0.5:
        try:
            return mutated, _receiver_of(doc, s)
        except (msgspec.ValidationError, KeyError, TypeError):
            pass
    return mutated


def _receiver_of(doc: dict, s: Sample) -> Any:
    """A receiver that expects the model(s) a (mutated) header document claims: KV its
    fingerprint; SCD the sample's layout with the claimed artifact and fingerprints."""
    if s.kind == KIND_KV:
        return msgspec.convert(doc["fingerprint"], Fingerprint)
    fps = {k: msgspec.convert(doc[k], Fingerprint) for k in ("producer", "consumer")}
    if not isinstance(doc["artifact"], str):
        raise TypeError("artifact is not a string")
    return dataclasses.replace(s.layout, artifact=doc["artifact"], **fps)


def _tier_map(frame: bytearray) -> tuple[int, int]:
    """(n_slots, byte length) of a frame's tier map."""
    n_slots = struct.unpack_from("<I", frame, 8)[0]
    return n_slots, (n_slots + 1) // 2


def _nibble(frame: bytearray, slot: int) -> int:
    byte = frame[_HEAD + slot // 2]
    return byte >> 4 if slot % 2 else byte & 0xF


def _set_nibble(frame: bytearray, slot: int, code: int) -> None:
    i = _HEAD + slot // 2
    frame[i] = (frame[i] & 0x0F) | (code << 4) if slot % 2 else (frame[i] & 0xF0) | code


def _resealed_tier_map(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    """Edit one frame's tier map, then re-seal: an unknown code (5-15), a nonzero padding
    nibble, one slot moved to another tier (the body no longer matches), or two slots' codes
    swapped (same size: a dropped token now kept, or sections read in another order)."""
    raw, frames = _unsealed(b, s)
    frame = rng.choice(frames)
    n_slots, _ = _tier_map(frame)
    action = rng.choice(("unknown", "padding", "retier", "swap", "swap"))
    if n_slots == 0:
        action = "padding"
    if action == "padding":
        if n_slots % 2:
            _set_nibble(frame, n_slots, rng.randint(1, 15))
        else:  # no padding nibble: append a byte to the map and the declared length
            frame[_HEAD + n_slots // 2 : _HEAD + n_slots // 2] = bytes([rng.randint(1, 255)])
            struct.pack_into("<I", frame, 12, struct.unpack_from("<I", frame, 12)[0] + 1)
    elif action == "unknown":
        _set_nibble(frame, rng.randrange(n_slots), rng.randint(5, 15))
    elif action == "retier":
        slot = rng.randrange(n_slots)
        _set_nibble(frame, slot, rng.choice([c for c in range(5) if c != _nibble(frame, slot)]))
    else:
        i, j = rng.randrange(n_slots), rng.randrange(n_slots)
        a, c = _nibble(frame, i), _nibble(frame, j)
        _set_nibble(frame, i, c)
        _set_nibble(frame, j, a)
    return seal(raw, frames, s.kind)


def _resealed_frame_head(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    """Change one frame's layer, first position, slot count or body length (the body cut or
    padded to the new length, so the payload's framing stays consistent), then re-seal."""
    raw, frames = _unsealed(b, s)
    k = rng.randrange(len(frames))
    frame = frames[k]
    offset, fmt = rng.choice(((2, "<H"), (4, "<I"), (8, "<I"), (12, "<I")))
    (value,) = struct.unpack_from(fmt, frame, offset)
    top = 0xFFFF if fmt == "<H" else min(0xFFFFFFFF, value * 4 + 64)  # keep bodies small
    new = _new_value(value, top, rng)
    struct.pack_into(fmt, frame, offset, new)
    if offset == 12:
        grow = new - value
        if grow > 0:
            frame += bytes(rng.getrandbits(8) for _ in range(grow))
        elif grow < 0:
            del frame[len(frame) + grow :]
    return seal(raw, frames, s.kind)


_FP16_SPECIALS = (0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7BFF, 0xFBFF, 0x0001, 0x8000, 0x0000)


def _resealed_sections(b: bytes, s: Sample, o: Sample, rng: random.Random) -> Mutated:
    """Overwrite bytes in one frame's sections (codes, scales, minima, FP16 values) with random
    bytes or FP16 infinities, NaNs, extremes and subnormals, then re-seal: a well-formed payload
    that says something else, which must still decode without a crash."""
    raw, frames = _unsealed(b, s)
    frame = rng.choice(frames)
    _, map_len = _tier_map(frame)
    lo = _HEAD + map_len
    if len(frame) > lo:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(lo, len(frame))
            if rng.random() < 0.5 and i + 2 <= len(frame):
                frame[i : i + 2] = struct.pack("<H", rng.choice(_FP16_SPECIALS))
            else:
                frame[i] = rng.getrandbits(8)
    return seal(raw, frames, s.kind)


MUTATIONS: dict[str, Callable[[bytes, Sample, Sample, random.Random], Mutated]] = {
    "bit_flips": _bit_flips,
    "byte_overwrite": _byte_overwrite,
    "truncate": _truncate,
    "extend": _extend,
    "length_field": _length_field,
    "reorder_frames": _reorder,
    "header_swap": _header_swap,
    "resealed_header": _resealed_header,
    "resealed_tier_map": _resealed_tier_map,
    "resealed_frame_head": _resealed_frame_head,
    "resealed_sections": _resealed_sections,
}
#: Families that recompute every checksum: a decode that succeeds with other values is the
#: format working as specified (only TLS or a MAC tells such a payload from a genuine one).
RESEALED = frozenset(m for m in MUTATIONS if m.startswith("resealed_"))
