"""The bf16-page kernels of the paged decode kernel, the AMX-BF16 tile and the AVX512-BF16 one,
against the float64 reference and against the AVX-512 kernel, on pools whose unused slots hold
NaN. On a CPU with AMX-BF16 `isa()` is "amx" and "amx" runs the AMX tile; on one with
AVX512-BF16 and no AMX (a Zen 4) both names run the AVX512-BF16 kernel and "amx" is not claimed;
elsewhere they run the AVX-512/AVX2 fallback."""

from pathlib import Path

import pytest
import torch

from spectrumkv.paged import kernel
from spectrumkv.paged.reference import reference
from tests.test_paged import make_cache


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty elsewhere)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = [ln for ln in text.splitlines() if ln.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def cpu_has_amx() -> bool:
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= cpu_flags()


BF16_ISAS = ("amx", "avx512bf16")


def best_bf16_isa() -> str:
    """The kernel "amx" clamps to on this CPU: amx, avx512bf16 or a fallback."""
    previous = kernel.set_isa("amx")
    try:
        return kernel.isa()
    finally:
        kernel.set_isa(previous)


def run(isa, q, kp, vp, tables, lens, splits=1, threads=1, starts=None):
    previous = kernel.set_isa(isa)
    try:
        out, *_ = kernel.decode(q, kp, vp, tables, lens, q.shape[2] ** -0.5, splits, 64, threads,
                               starts=starts)  # fmt: skip
    finally:
        kernel.set_isa(previous)
    return out


def test_amx_is_the_default_where_the_cpu_has_it():
    """The kernel asks Linux for the tile state once at import: on an AMX CPU it must get it
    (Linux >= 5.16 lists amx_tile only when it supports the request) and use it by default."""
    assert kernel.AVAILABLE
    if cpu_has_amx():
        assert kernel.isa() == "amx"
    else:
        assert kernel.isa() != "amx"
        assert kernel.set_isa("amx") != "amx" and kernel.isa() != "amx"  # clamped to the CPU's


GEOMETRIES = [  # kv_heads, group, head_dim, page_size
    (3, 3, 64, 16),  # SmolLM2-135M
    (3, 3, 64, 32),
    (8, 4, 128, 32),  # 7B-class
    (1, 4, 256, 16),  # Gemma-3-270M
    (2, 8, 64, 48),  # the largest group the AMX tile takes; pages of 3 x 16 tokens
    (2, 6, 64, 16),  # P.V in two passes of 4 and 2 query heads (pv_heads)
]
LENGTHS = [1, 5, 16, 17, 31, 32, 33, 47, 64, 100, 257, 1000, 2500]
STARTS = [0, 3, 0, 16, 30, 5, 17, 40, 0, 99, 100, 511, 1]  # mid-page and mid-16-block windows


@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_amx_matches_reference_on_poisoned_pools(geometry, isa):
    """bf16 pages with holes whose unused slots (holes, the rest of each last page) hold NaN:
    every output finite and within 2e-3 of float64 (seen: < 1e-5), whole or as windows
    starting mid-page (an AVX-512 tile up to the next 16-token boundary, then AMX), split or
    not (the merge is exact), on 1 and 2 threads; and close to the AVX-512 kernel."""
    kv_heads, group, d, ps = geometry
    cache, tables, lens = make_cache(LENGTHS, torch.bfloat16, kv_heads, d, ps, poison=True)
    kp, vp = cache.layer(0)
    q = torch.randn(len(LENGTHS), kv_heads * group, d, generator=torch.Generator().manual_seed(3))
    for starts in (None, torch.tensor(STARTS, dtype=torch.int32)):
        ref = reference(q, kp, vp, tables, lens, d**-0.5, starts)
        old = run("avx512", q, kp, vp, tables, lens, starts=starts)
        for splits, threads in ((1, 1), (4, 1), (4, 2)):
            out = run(isa, q, kp, vp, tables, lens, splits, threads, starts)
            assert torch.isfinite(out).all()
            assert (out.double() - ref).abs().max().item() < 2e-3
            assert (out - old).abs().max().item() < 1e-4


def test_bf16_kernels_run_only_where_they_fit():
    """The AMX tile and the AVX512-BF16 kernel compute scores differently from the AVX-512 one
    (bf16 hi/lo products), so their outputs differ in the last bits: they do on bf16 pages of a
    head_dim % 32 == 0 (the AMX tile also wants pages of 16k tokens; the AVX512-BF16 kernel takes
    the other bf16 pages on an AMX CPU); fp16 pages and a head_dim that is not a multiple of 32
    run the AVX-512 kernel bit for bit."""
    best = best_bf16_isa()
    cases = [(torch.bfloat16, 16, 64), (torch.float16, 16, 64), (torch.bfloat16, 8, 64),
             (torch.bfloat16, 16, 48)]  # fmt: skip
    for dtype, ps, d in cases:
        cache, tables, lens = make_cache([40, 300], dtype, 3, d, ps)
        kp, vp = cache.layer(0)
        q = torch.randn(2, 9, d)
        amx, old = run("amx", q, kp, vp, tables, lens), run("avx512", q, kp, vp, tables, lens)
        fits = best in BF16_ISAS and dtype == torch.bfloat16 and d % 32 == 0
        assert torch.equal(amx, old) != fits, (dtype, ps, d)
        ref = reference(q, kp, vp, tables, lens, d**-0.5)
        assert (amx.double() - ref).abs().max().item() < 2e-3


@pytest.mark.parametrize("isa", BF16_ISAS)
def test_amx_request_alone_or_batched_is_the_same_bits(isa):
    """A bf16 request's output does not depend on its batch (tasks group KV heads differently,
    the per-head arithmetic and tile boundaries are the same)."""
    lengths = [700, 40, 3000, 129, 1500]
    cache, tables, lens = make_cache(lengths, torch.bfloat16, 8, 128, 32)
    kp, vp = cache.layer(0)
    q = torch.randn(len(lengths), 32, 128)
    whole = run(isa, q, kp, vp, tables, lens, threads=2)
    for batch in ([0], [2], [4, 1], [3, 2, 0]):
        i = torch.tensor(batch)
        alone = run(isa, q[i].contiguous(), kp, vp, tables[i], lens[i], threads=2)
        assert torch.equal(alone, whole[i]), batch


@pytest.mark.parametrize("isa", BF16_ISAS)
def test_bf16_queries_skip_the_lo_pass_exactly(isa):
    """Queries that are bf16 values at a power-of-two scale (a bf16 model's, head_dim 64) have
    no lo part, and the AVX512-BF16 kernel skips its lo pass: within 2e-3 of float64, and each
    request's bits the same alone as in a batch whose other requests do run the lo pass."""
    lengths = [300, 17, 1000]
    cache, tables, lens = make_cache(lengths, torch.bfloat16, 3, 64, 16, poison=True)
    kp, vp = cache.layer(0)
    q = torch.randn(3, 9, 64)
    q[0] = q[0].bfloat16().float()  # the engine's case; the others keep float32 queries
    whole = run(isa, q, kp, vp, tables, lens, threads=2)
    ref = reference(q, kp, vp, tables, lens, 64**-0.5)
    assert (whole.double() - ref).abs().max().item() < 2e-3
    for i in range(3):
        alone = run(isa, q[i : i + 1].contiguous(), kp, vp, tables[i : i + 1], lens[i : i + 1])
        assert torch.equal(alone, whole[i : i + 1]), i
