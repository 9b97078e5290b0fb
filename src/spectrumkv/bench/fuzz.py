"""`spectrumkv bench fuzz`: mutated payloads against the strict decoders.

Valid payloads, KV ones (random shapes, head dims that are and are not powers of two, sliding
windows, policies, budgets, quantization schemes and KV dtypes) and, for a share of the cases
(`scd_share`, a third by default), SCD ones (`fuzz_scd.py`: random artifact layouts with reuse
and patch layers, FP16 or INT8/INT4 codes), are encoded, then mutated by one of the
families in `mutations.py`: raw ones (bit flips, overwrites, truncation, extension, length
fields, frame order, swapped headers), which keep the old checksums, and `resealed_*` ones
(header fields and schema, tier maps, frame heads, section values), which recompute every
checksum after mutating and so reach the checks behind them. Each mutated payload is decoded
the way a decode worker does (`expect` = the receiver's fingerprint, or for SCD its artifact
layout) and lands in exactly one outcome (SCD families are reported as `scd/<family>`):

- identical: decoded, and equal bit for bit to the original decode (the mutation hit nothing
  that matters);
- typed_error: a SpectrumKVError subclass (WireFormatError, ChecksumError, ...);
- accepted_resealed: a resealed payload that passed every check and decoded to other values:
  well-formed by construction, which no checksum can tell from a genuine payload (TLS or a MAC
  can); expected, and counted apart;
- crash: any other exception;
- hang: the decode ran past `hang_s` (interrupted by a timer);
- oversized_alloc: the decode tried to grow the address space by more than `alloc_cap_bytes`
  (enforced with RLIMIT_AS around each case, so the attempt fails instead of succeeding);
- silent_corruption: a payload with its original checksums decoded without error but
  different from the original.

Crash, hang, oversized_alloc and silent_corruption are bugs. Per family, the report also counts
which check each typed error came from (error class and message, numbers elided).
"""

from __future__ import annotations

import json
import random
import re
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import FIXED_RATE, POLICIES, PolicyConfig, QuantConfig
from ..errors import BudgetError, SpectrumKVError
from ..kv import LayerKV, first_slot
from ..payload import Payload, decode_payload
from ..policy import layer_firsts, plan
from ..scd import wire as scd_wire
from ..wire import KIND_SCD, Fingerprint, Header, frame_bytes, header_bytes
from .fuzz_scd import random_scd_sample
from .mutations import MUTATIONS, RESEALED, Sample

OUTCOMES = (
    "identical", "typed_error", "accepted_resealed", "crash", "hang", "oversized_alloc",
    "silent_corruption",
)  # fmt: skip
GOOD = ("identical", "typed_error", "accepted_resealed")


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
        rng.choice((8, 16, 24, 32, 48, 64, 80)),
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


def _same_scd(a: tuple, b: tuple) -> bool:
    """Two SCD decodes (header, codes) equal bit for bit."""
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for x, y in zip(a[1], b[1], strict=True):
        for name in ("k", "v", "h"):
            t, u = getattr(x, name), getattr(y, name)
            if (t is None) != (u is None):
                return False
            if t is not None and (
                t.shape != u.shape or not torch.equal(t.view(torch.int32), u.view(torch.int32))
            ):
                return False
    return True


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


def classify(
    mutated: bytes,
    sample: Sample,
    hang_s: float,
    alloc_cap_bytes: int,
    expect: Fingerprint | None = None,
    resealed: bool = False,
    errors: Counter | None = None,
) -> str:
    """Decode `mutated` as a receiver of `expect` (default: the sample's model) would and name
    the outcome. `resealed`: the mutation recomputed the checksums (a decode to other values is
    then `accepted_resealed`). `errors` counts typed errors by `error_kind`."""
    limits = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_address_space_bytes() + alloc_cap_bytes, limits[1]))
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    try:
        if sample.kind == KIND_SCD:
            got = scd_wire.decode(mutated, expect or sample.layout)
        else:
            got = decode_payload(mutated, expect=expect or sample.header.fingerprint)
    except Hang:
        return "hang"
    except SpectrumKVError as e:
        if errors is not None:
            errors[error_kind(e)] += 1
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
    if (_same_scd if sample.kind == KIND_SCD else _same)(got, sample.decoded):
        return "identical"
    return "accepted_resealed" if resealed else "silent_corruption"


def error_kind(e: SpectrumKVError) -> str:
    """Which check raised `e`: its class and the start of its message, numbers and quoted values
    elided (e.g. "WireFormatError: frame N body length N does not match its tier map")."""
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(e))
    msg = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "N", msg)
    return f"{type(e).__name__}: {msg[:72]}"


@dataclass
class FuzzReport:
    cases: int
    counts: dict[str, int]
    by_mutation: dict[str, dict[str, int]]
    errors_by_mutation: dict[str, dict[str, int]]  # per family: typed errors by `error_kind`
    examples: list[dict]  # the first few bad cases, for a bug report
    seconds: float

    def as_json(self) -> dict:
        return {"cases": self.cases, **self.counts, "by_mutation": self.by_mutation,
                "errors_by_mutation": self.errors_by_mutation,
                "bad_examples": self.examples, "seconds": self.seconds}  # fmt: skip

    @property
    def bad(self) -> int:
        return sum(self.counts[k] for k in OUTCOMES if k not in GOOD)


def run_fuzz(
    cases: int,
    seed: int = 0,
    samples: int = 64,
    hang_s: float = 5.0,
    alloc_cap_bytes: int = 256 << 20,
    progress: Callable[[int, Counter], None] | None = None,
    scd_share: float = 1 / 3,
) -> FuzzReport:
    """Run `cases` mutated decodes over `samples` random valid KV payloads and as many SCD
    ones (a case is an SCD one with probability `scd_share`), the mutation families taken in
    turn at random."""
    rng = random.Random(seed)
    pools = {
        "": [random_sample(rng) for _ in range(samples)],
        "scd/": [random_scd_sample(rng) for _ in range(samples)] if scd_share > 0 else [],
    }
    names = [p + m for p in pools if pools[p] for m in MUTATIONS]
    counts: Counter = Counter({k: 0 for k in OUTCOMES})
    by_mutation: dict[str, Counter] = {m: Counter() for m in names}
    errors: dict[str, Counter] = {m: Counter() for m in names}
    examples: list[dict] = []
    t0 = time.perf_counter()
    for case in range(cases):
        prefix = "scd/" if rng.random() < scd_share else ""
        sample, other = rng.choice(pools[prefix]), rng.choice(pools[prefix])
        name = rng.choice(tuple(MUTATIONS))
        key = prefix + name
        mutated = MUTATIONS[name](sample.payload, sample, other, rng)
        mutated, expect = mutated if isinstance(mutated, tuple) else (mutated, None)
        outcome = classify(
            mutated, sample, hang_s, alloc_cap_bytes, expect, name in RESEALED, errors[key]
        )
        counts[outcome] += 1
        by_mutation[key][outcome] += 1
        if outcome not in GOOD and len(examples) < 10:
            examples.append({"case": case, "mutation": key, "outcome": outcome,
                             "payload_hex": mutated.hex()})  # fmt: skip
        if progress and (case + 1) % 1000 == 0:
            progress(case + 1, counts)
    return FuzzReport(
        cases,
        {k: counts[k] for k in OUTCOMES},
        {m: dict(c) for m, c in by_mutation.items()},
        {m: dict(c.most_common()) for m, c in errors.items()},
        examples,
        time.perf_counter() - t0,
    )


def write_json(report: FuzzReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report.as_json(), f, indent=1)
