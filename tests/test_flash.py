"""engines.flash, causal prefill attention on AMX-BF16 tiles or AVX512-BF16 dot products, against
a float64 reference beside torch's own bf16 SDPA; and the bf16 prefill of a real model through
it against SDPA. On a CPU with AVX512-BF16 (the development VMs and CI: Intel with AMX, AMD Zen
4 without) the kernel must be available and run, every kernel the CPU has; elsewhere `fits`
refuses and `causal` raises, so every caller stays on SDPA."""

import pytest
import torch
import torch.nn.functional as F

from spectrumkv.engines import flash, hf
from tests.test_paged_amx import cpu_flags, cpu_has_amx


def cpu_has_bf16() -> bool:
    return {"avx512f", "avx512bw", "avx512dq", "avx512_bf16"} <= cpu_flags()


def kernels() -> list[str]:
    """The flash kernels this CPU has, best first."""
    return (["amx"] if cpu_has_amx() else []) + (["avx512bf16"] if cpu_has_bf16() else [])


def _qkv(t: int, hq: int, hkv: int, seed: int, scale: float = 1.0, d: int = 64):
    """bf16 q [hq, t, d], k/v [hkv, t, d] as the model hands them: token-major [t, heads, d]
    storage seen head-major (strided)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        (torch.randn(t, h, d, generator=g) * scale).to(torch.bfloat16).transpose(0, 1)
        for h in (hq, hkv, hkv)
    )
    return q, k, v


def _reference(q, k, v, scale=None):
    """float64 causal GQA attention -> [t, hq, d]."""
    group = q.shape[0] // k.shape[0]
    k, v = (x.double().repeat_interleave(group, 0) for x in (k, v))
    return F.scaled_dot_product_attention(q.double(), k, v, is_causal=True, scale=scale).transpose(
        0, 1
    )


def _check(ours, q, k, v, scale=None):
    """`ours`' error against float64 is bf16 rounding: within 1.5x of torch's bf16 SDPA's on
    the same inputs (or 4e-3)."""
    ref = _reference(q, k, v, scale)
    sdpa = F.scaled_dot_product_attention(
        q[None], k[None], v[None], is_causal=True, enable_gqa=True, scale=scale
    )[0].transpose(0, 1)
    err = (ours.double() - ref).abs().max().item()
    err_sdpa = (sdpa.double() - ref).abs().max().item()
    assert err <= max(1.5 * err_sdpa, 4e-3), (q.shape, err, err_sdpa)


def test_flash_is_available_where_the_cpu_has_avx512_bf16():
    assert cpu_has_bf16() == flash.AVAILABLE
    assert flash.isa() == (kernels() or [""])[0]  # the best kernel runs by default
    q, k, v = _qkv(8, 9, 3, 0)
    assert flash.fits(q, k, v) == cpu_has_bf16()
    if not cpu_has_bf16():
        with pytest.raises(ValueError, match="flash.causal needs"):
            flash.causal(q, k, v)
    elif not cpu_has_amx():
        with pytest.raises(ValueError, match="not available"):
            flash.set_isa("amx")


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (4, 4, 64), (32, 8, 128)])
def test_flash_matches_the_reference_at_block_edges(hq, hkv, d):
    """Lengths 1 to 300 across the 16-row and 32-key blocks: the error against float64 is that
    of bf16 rounding, within 1.5x of torch's bf16 SDPA on the same inputs; large scores (x4)
    exercise the lazy rescale. Every kernel the CPU has (head_dim 128 runs on AVX512-BF16 under
    either)."""
    if not cpu_has_bf16():
        pytest.skip("no AVX512-BF16 on this CPU")
    previous = flash.isa()
    try:
        for kernel in kernels():
            flash.set_isa(kernel)
            for t in (1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 100, 300):
                for scale in (1.0, 4.0):
                    q, k, v = _qkv(t, hq, hkv, seed=t, scale=scale, d=d)
                    ours = flash.causal(q, k, v)
                    assert ours.shape == (t, hq, d) and ours.is_contiguous()
                    _check(ours, q, k, v)
    finally:
        flash.set_isa(previous)


def test_flash_scale_and_refusals():
    """An explicit scale is used; inputs the kernel does not take are refused by `fits` (and so
    run on SDPA in engines.segments)."""
    q, k, v = _qkv(40, 9, 3, 1)
    if flash.AVAILABLE:
        _check(flash.causal(q, k, v, scale=0.05), q, k, v, scale=0.05)
    assert not flash.fits(q.float(), k.float(), v.float())  # not bf16
    assert not flash.fits(q[..., :32], k[..., :32], v[..., :32])  # head_dim 32
    q96, k96, v96 = _qkv(40, 9, 3, 1, d=96)
    assert not flash.fits(q96, k96, v96)  # head_dim 96
    assert not flash.fits(q[:8], k, v)  # 8 query heads over 3 KV heads
    assert not flash.fits(q, k[:, :39], v[:, :39])  # lengths differ
    with pytest.raises(ValueError):
        flash.causal(q.float(), k.float(), v.float())


def test_bf16_prefill_through_flash_matches_sdpa(monkeypatch):
    """SmolLM2 in bf16: `hf.prefill` (one prompt) and `hf.prefill_batch` (two packed) run the
    kernel; their K/V agree with the SDPA path's within bf16 rounding of what attention feeds
    into later layers."""
    if not cpu_has_bf16():
        pytest.skip("no AVX512-BF16 on this CPU")
    eng = hf.load("smollm2-135m", dtype="bfloat16", kv_dtype="bfloat16")
    assert flash.serves(eng.model)
    ids = torch.arange(1000, 1300)
    calls = []
    real = flash.causal
    monkeypatch.setattr(flash, "causal", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    ours = hf.prefill(eng, ids)
    assert calls[:2] == [300, 300] and len(calls) == eng.fingerprint.n_layers
    batch = []
    hf.prefill_batch(eng, [ids[:120], ids[120:]], [lambda i, kv, w: batch.append(kv)] * 2)
    monkeypatch.setattr(flash, "ENABLED", False)
    ref = hf.prefill(eng, ids)
    for a, b in zip(ours.layers, ref.layers, strict=True):
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            rel = ((x.float() - y.float()).norm() / y.float().norm()).item()
            assert rel < 0.03, rel
    assert len(batch) == 2 * eng.fingerprint.n_layers
