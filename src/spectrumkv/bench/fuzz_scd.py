"""SCD payloads for `bench fuzz`: random valid SCD payloads (random models, artifact layouts
with reuse and patch layers, FP16 or INT8/INT4 codes, some with tokens dropped) and their strict
decode, so every mutation family of `mutations.py` runs on them too (the SCD frame head has the
KV frame head's layout and its body starts with a tier map, so the families apply unchanged)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..scd import budget as scd_budget
from ..scd import wire as scd_wire
from ..scd.codes import LayerCode
from ..wire import KIND_SCD, Fingerprint


@dataclass
class ScdSample:
    """A valid SCD payload, where its frames start, its layout and its reference decode (a
    `mutations.Sample` of kind KIND_SCD); `codes` and `tiers` are what was encoded."""

    payload: bytes
    header: scd_wire.ScdHeader
    frame_starts: list[int]
    layout: scd_wire.Layout
    codes: list[LayerCode]
    tiers: torch.Tensor
    decoded: tuple
    kind: int = KIND_SCD


def _fingerprint(
    rng: random.Random, n_layers: int, heads: int, head_dim: int, window: int, sliding: tuple
) -> Fingerprint:
    return Fingerprint(
        arch="llama", n_layers=n_layers, n_kv_heads=heads, head_dim=head_dim,
        kv_dtype=rng.choice(("float16", "bfloat16")), rope="default", sliding_window=window,
        sliding_layers=sliding, weights_digest=f"{rng.getrandbits(64):016x}",
    )  # fmt: skip


def random_scd_sample(rng: random.Random, quantized: bool | None = None) -> ScdSample:
    """Encode a random valid SCD payload: 1-4 layers (at least one reuse and, with two or more
    layers, one patch layer; half the models with sliding-window layers, whose frames code the
    window's rows), widths multiples of 16, 1-40 tokens, FP16 or mixed INT8/INT4 codes, half
    of those with tokens dropped (`quantized` None: either)."""
    n_layers, heads, head_dim = rng.randint(1, 4), rng.choice((1, 2)), rng.choice((16, 32, 64))
    window, sliding = 0, ()
    if rng.random() < 0.5:
        window = rng.randint(2, 48)
        sliding = tuple(i for i in range(n_layers) if rng.random() < 0.5)
    producer = _fingerprint(rng, n_layers, heads, head_dim, window, sliding)
    consumer = _fingerprint(rng, n_layers, heads, head_dim, window, sliding)
    patch = {rng.randrange(1, n_layers)} if n_layers > 1 else set()
    widths = tuple(
        (16 * rng.randint(1, 4),)
        if i in patch
        else (16 * rng.randint(1, 4), 16 * rng.randint(1, 4))
        for i in range(n_layers)
    )
    layout = scd_wire.Layout(f"{rng.getrandbits(256):064x}", producer, consumer, widths)
    n = rng.randint(1, 40)
    ids = {"payload_id": rng.getrandbits(63), "tokens_digest": rng.getrandbits(64)}
    header = scd_wire.ScdHeader(producer, consumer, layout.artifact, n, **ids)
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    codes = []
    for i, w in enumerate(widths):
        pos = torch.arange(layout.first(i, n), n)
        parts = [torch.randn(len(pos), r, generator=g) * rng.choice((0.1, 1.0, 30.0)) for r in w]
        codes.append(LayerCode(i, pos, h=parts[0]) if len(w) == 1 else LayerCode(i, pos, *parts))
    if quantized is None:
        quantized = rng.random() < 0.5
    plan = scd_budget.CodePlan(None)
    if quantized:  # INT8/INT4, or INT4 with dropped tokens (a budget below all-INT4)
        drops = rng.randint(0, scd_budget.max_dropped(n)) if rng.random() < 0.5 else 0
        plan = scd_budget.CodePlan(rng.randint(0, n - min(scd_budget.SINKS, n) - drops), drops)
    tiers = scd_budget.code_tiers(n, torch.rand(n, generator=g), plan)
    chunks = [scd_wire.header_bytes(header)]
    starts = []
    for c in codes:
        starts.append(sum(len(x) for x in chunks))
        chunks.append(scd_wire.frame_bytes(c, tiers, header, layout))
    payload = b"".join(chunks)
    return ScdSample(payload, header, starts, layout, codes, tiers,
                     scd_wire.decode(payload, layout))  # fmt: skip
