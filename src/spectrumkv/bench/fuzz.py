"""`spectrumkv bench fuzz`: mutated payloads against the strict decoder.

Valid payloads (random shapes, sliding windows, policies, budgets, quantization schemes and KV
dtypes) are encoded, then mutated: bit flips, byte overwrites, truncation, extension, edits of
the length fields (header length, frame body length, slot count, first position), frames
reordered, dropped or duplicated, and headers swapped between payloads (other model, other
request). Each mutated payload is decoded the way a decode worker does (`expect` = the
receiver's fingerprint) and lands in exactly one outcome:

- identical: decoded, and equal bit for bit to the original decode (the mutation hit nothing
  that matters);
- typed_error: a SpectrumKVError subclass (WireFormatError, ChecksumError, ...);
- crash: any other exception;
- hang: the decode ran past `hang_s` (interrupted by a timer);
- oversized_alloc: the decode tried to grow the address space by more than `alloc_cap_bytes`
  (enforced with RLIMIT_AS around each case, so the attempt fails instead of succeeding);
- silent_corruption: decoded without error but different from the original.

Everything except `identical` and `typed_error` is a bug.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch

from ..config import FIXED_RATE, POLICIES, PolicyConfig, QuantConfig
from ..errors import BudgetError, SpectrumKVError
from ..kv import LayerKV, first_slot
from ..payload import Payload, decode_payload
from ..policy import layer_firsts, plan
from ..wire import (
    Fingerprint,
    Header,
    frame_bytes,
    frame_end,
    header_bytes,
    read_header,
)

OUTCOMES = ("identical", "typed_error", "crash", "hang", "oversized_alloc", "silent_corruption")


@dataclass
class Sample:
    """A valid payload, where its frames start, and its reference decode."""

    payload: bytes
    header: Header
    frame_starts: list[int]
    decoded: Payload


class Hang(Exception):
    pass


def random_sample(rng: random.Random) -> Sample:
    """Encode a random valid payload (retries the rare plans that do not fit their budget)."""
    while True:
        try:
            return _try_sample(rng)
        except BudgetError:
            continue


def _try_sample(rng: random.Random) -> Sample:
    heads, head_dim, n_layers = (
        rng.choice((1, 2, 3)),
        rng.choice((8, 16, 32, 64)),
        rng.randint(1, 4),
    )
    n = rng.randint(1, 40)
    window, sliding = 0, ()
    if rng.random() < 0.3:
        window = rng.randint(2, n + 4)
        sliding = tuple(i for i in range(n_layers) if rng.random() < 0.5)
    name = rng.choice(POLICIES)
    scheme = "kivi" if name == "kivi2" else rng.choice(("asym-group", "asym-group", "sym-token"))
    quant = QuantConfig(rng.choice((4, 8, 16)), scheme, rng.random() < 0.5)  # type: ignore[arg-type]
    budget = None if name in FIXED_RATE else round(rng.uniform(0.05, 1.0), 3)
    policy = PolicyConfig(name, budget=budget, quant=quant, sinks=rng.randint(0, 4))
    fp = Fingerprint(
        arch=rng.choice(("llama", "gemma3")), n_layers=n_layers, n_kv_heads=heads,
        head_dim=head_dim, kv_dtype=rng.choice(("float16", "bfloat16")), rope="default",
        sliding_window=window, sliding_layers=sliding, weights_digest=f"{rng.getrandbits(64):016x}",
    )  # fmt: skip
    header = Header(
        fp, n, scheme, quant.group_for(head_dim), quant.rotate, name, budget, rng.getrandbits(63)
    )
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    dtype = getattr(torch, fp.kv_dtype)
    layers = []
    for i in range(n_layers):
        first = first_slot(fp.is_sliding(i), window, n)
        shape = (heads, n - first, head_dim)
        k, v = torch.randn(shape, generator=g) * 3, torch.randn(shape, generator=g)
        layers.append(LayerKV(k.to(dtype), v.to(dtype), torch.arange(first, n)))
    scores = torch.rand(n, generator=g)
    per_layer = torch.rand(n_layers, n, generator=g)
    p = plan(scores, header, policy, per_layer)
    chunks = [header_bytes(header)]
    starts = []
    for i, first in enumerate(layer_firsts(header)):
        starts.append(sum(len(c) for c in chunks))
        chunks.append(bytes(frame_bytes(i, first, p.tiers[i, first:], layers[i], header)))
    payload = b"".join(chunks)
    return Sample(payload, header, starts, decode_payload(payload, expect=fp))


# ---- mutations: each takes (payload, sample, other sample, rng) and returns new bytes ----


def _bit_flips(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
    out = bytearray(b)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _byte_overwrite(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
    out = bytearray(b)
    i = rng.randrange(len(out))
    span = min(len(out) - i, rng.randint(1, 16))
    out[i : i + span] = bytes(rng.getrandbits(8) for _ in range(span))
    return bytes(out)


def _truncate(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
    return b[: rng.randrange(len(b))]


def _extend(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
    return b + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))


def _length_field(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
    """Overwrite a declared length or count: the header length (preamble offset 8), or a frame's
    layer (+2), first position (+4), slot count (+8) or body length (+12), with a small change,
    zero, or a huge value."""
    out = bytearray(b)
    if rng.random() < 0.25 or not s.frame_starts:
        offset, fmt = 8, "<I"  # header_len in the preamble
    else:
        start = rng.choice(s.frame_starts)
        offset, fmt = rng.choice(
            ((start + 2, "<H"), (start + 4, "<I"), (start + 8, "<I"), (start + 12, "<I"))
        )
    (value,) = struct.unpack_from(fmt, out, offset)
    top = 0xFFFF if fmt == "<H" else 0xFFFFFFFF
    value = rng.choice((0, top, value + 1, max(0, value - 1), rng.randint(0, top), value * 2 + 1))
    struct.pack_into(fmt, out, offset, min(value, top))
    return bytes(out)


def _frames(b: bytes, s: Sample) -> tuple[bytes, list[bytes]]:
    _, start = read_header(b)
    ends = [frame_end(b, st, i) for i, st in enumerate(s.frame_starts)]
    return b[:start], [b[st:e] for st, e in zip(s.frame_starts, ends, strict=True)]


def _reorder(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
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


def _header_swap(b: bytes, s: Sample, o: Sample, rng: random.Random) -> bytes:
    """Another payload's header (another model, or the same model with another payload id) in
    front of this payload's frames."""
    other = o.header
    if rng.random() < 0.5:  # same model and shape, another request
        other = msgspec.structs.replace(s.header, payload_id=rng.getrandbits(63))
    _, frames = _frames(b, s)
    return header_bytes(other) + b"".join(frames)


MUTATIONS: dict[str, Callable[[bytes, Sample, Sample, random.Random], bytes]] = {
    "bit_flips": _bit_flips,
    "byte_overwrite": _byte_overwrite,
    "truncate": _truncate,
    "extend": _extend,
    "length_field": _length_field,
    "reorder_frames": _reorder,
    "header_swap": _header_swap,
}


def _same(a: Payload, b: Payload) -> bool:
    if a.header != b.header or len(a.layers) != len(b.layers):
        return False
    for x, y in zip(a.layers, b.layers, strict=True):
        if not torch.equal(x.positions, y.positions):
            return False
        for t, u in ((x.keys, y.keys), (x.values, y.values)):
            if t.dtype != u.dtype or t.shape != u.shape:
                return False
            if not torch.equal(t.view(torch.int16), u.view(torch.int16)):
                return False
    return True


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


def _on_alarm(signum, frame):  # noqa: ARG001
    raise Hang()


def classify(mutated: bytes, sample: Sample, hang_s: float, alloc_cap_bytes: int) -> str:
    """Decode `mutated` as the sample's receiver would and name the outcome."""
    limits = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space_bytes() + alloc_cap_bytes, limits[1]))
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    try:
        got = decode_payload(mutated, expect=sample.header.fingerprint)
    except Hang:
        return "hang"
    except SpectrumKVError:
        return "typed_error"
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "alloc" in str(e):
            return "oversized_alloc"
        return "crash"
    except Exception:  # noqa: BLE001 - every other exception is the bug this bench looks for
        return "crash"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, limits)
    return "identical" if _same(got, sample.decoded) else "silent_corruption"


@dataclass
class FuzzReport:
    cases: int
    counts: dict[str, int]
    by_mutation: dict[str, dict[str, int]]
    examples: list[dict]  # the first few bad cases, for a bug report
    seconds: float

    def as_json(self) -> dict:
        return {"cases": self.cases, **self.counts, "by_mutation": self.by_mutation,
                "bad_examples": self.examples, "seconds": self.seconds}  # fmt: skip

    @property
    def bad(self) -> int:
        return sum(self.counts[k] for k in OUTCOMES if k not in ("identical", "typed_error"))


def run_fuzz(
    cases: int,
    seed: int = 0,
    samples: int = 64,
    hang_s: float = 5.0,
    alloc_cap_bytes: int = 256 << 20,
    progress: Callable[[int, Counter], None] | None = None,
) -> FuzzReport:
    """Run `cases` mutated decodes over `samples` random valid payloads."""
    rng = random.Random(seed)
    pool = [random_sample(rng) for _ in range(samples)]
    counts: Counter = Counter({k: 0 for k in OUTCOMES})
    by_mutation: dict[str, Counter] = {m: Counter() for m in MUTATIONS}
    examples: list[dict] = []
    t0 = time.perf_counter()
    for case in range(cases):
        sample, other = rng.choice(pool), rng.choice(pool)
        name = rng.choice(tuple(MUTATIONS))
        mutated = MUTATIONS[name](sample.payload, sample, other, rng)
        outcome = classify(mutated, sample, hang_s, alloc_cap_bytes)
        counts[outcome] += 1
        by_mutation[name][outcome] += 1
        if outcome not in ("identical", "typed_error") and len(examples) < 10:
            examples.append({"case": case, "mutation": name, "outcome": outcome,
                             "payload_hex": mutated.hex()})  # fmt: skip
        if progress and (case + 1) % 1000 == 0:
            progress(case + 1, counts)
    return FuzzReport(
        cases,
        {k: counts[k] for k in OUTCOMES},
        {m: dict(c) for m, c in by_mutation.items()},
        examples,
        time.perf_counter() - t0,
    )


def write_json(report: FuzzReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.as_json(), f, indent=1)
