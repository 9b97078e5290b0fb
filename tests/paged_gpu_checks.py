"""Checks of the Triton workqueue decode (spectrumkv.paged.gpu) against the float64 reference,
run by tests/test_paged_gpu.py in a fresh process (this file is not collected by a plain
`pytest`: Triton's interpreter must be switched on before triton is first imported, which a
shared test process cannot promise).

SPECTRUMKV_TRITON_DEVICE=cpu (default): TRITON_INTERPRET=1 is set before torch and triton are
imported and the kernels run under Triton's interpreter on CPU tensors (CI, no GPU).
SPECTRUMKV_TRITON_DEVICE=cuda: the compiled kernels run on the GPU, on the same cases.

Caches come from the real PagedKVCache (shuffled pool, other requests' pages in between),
every slot a request must not read (unused pages, the tail of its last page, tokens before a
sliding window's start) holds NaN, and table entries wholly before a window's start are -1,
so a stray read shows up as NaN or an index error.
"""

from __future__ import annotations

import os

DEVICE = os.environ.get("SPECTRUMKV_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (E402 below)

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from spectrumkv.paged import cost, gpu, kernel, reference, routes  # noqa: E402
from spectrumkv.paged.cache import PagedConfig, PagedKVCache  # noqa: E402
from spectrumkv.paged.errors import PagedInputError  # noqa: E402

# (dtype, head_dim, kv_heads, group, page_size, lengths, starts or None, max_splits, min_split)
CASES = {
    "fp16-d64-smollm-unsplit": (
        torch.float16, 64, 3, 3, 16, [1, 16, 17, 33, 65], None, 1, 1 << 30,
    ),
    "fp16-d64-smollm-split": (
        torch.float16, 64, 3, 3, 16, [1, 16, 17, 33, 65], None, 16, 32,
    ),
    "bf16-d128-group8-split": (torch.bfloat16, 128, 2, 8, 16, [1, 16, 48, 97], None, 4, 32),
    "fp16-d128-sliding-split": (
        torch.float16, 128, 2, 4, 16, [1, 20, 70, 129], [0, 19, 33, 100], 8, 32,
    ),
    "bf16-d64-page32-sliding": (
        torch.bfloat16, 64, 3, 3, 32, [31, 32, 65, 96], [0, 31, 1, 40], 2, 32,
    ),
}  # fmt: skip


def make_case(dtype, d, hkv, group, ps, lengths, starts, seed=0):
    """q, k_pages, v_pages (on DEVICE), the kernel's tables (entries wholly before a window
    -1), the reference's tables (all entries valid), lengths, starts (int32, host)."""
    gen = torch.Generator().manual_seed(seed)
    pages = 2 * sum(-(-n // ps) for n in lengths) + 3
    cache = PagedKVCache(PagedConfig(1, hkv, d, pages, ps, dtype), shuffle_seed=seed)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    firsts = starts or [0] * len(lengths)
    for i, (n, lo) in enumerate(zip(lengths, firsts, strict=True)):
        cache.allocate(("other", i), 1 + i % ps)  # pages of others between this one's
        cache.allocate(i, n)
        k, v = (torch.randn(hkv, n - lo, d, generator=gen) for _ in range(2))
        cache.write(0, i, lo, k, v)
    ref_tables, lengths_t = cache.block_tables(list(range(len(lengths))))
    tables = ref_tables.clone()
    for i, lo in enumerate(firsts):
        tables[i, : lo // ps] = -1
    q = torch.randn(len(lengths), hkv * group, d, generator=gen)
    k_pages, v_pages = (x.to(DEVICE) for x in cache.layer(0))
    starts_t = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    return q.to(DEVICE), k_pages, v_pages, tables, ref_tables, lengths_t, starts_t


def test_kernels_run_where_intended():
    kernels = (gpu._decode_kernel, gpu._merge_kernel)
    assert all(isinstance(f, InterpretedFunction) == (DEVICE == "cpu") for f in kernels)
    q, k, v, tables, _, lengths, _ = make_case(torch.float16, 64, 1, 2, 16, [5], None)
    given = torch.full(q.shape, float("nan"), device=q.device)
    out, tasks = gpu.decode(q, k, v, tables, lengths, 0.125, out=given)
    assert out is given and tasks == 1 and torch.isfinite(out).all()
    assert out.device.type == DEVICE  # a compiled Triton kernel cannot take CPU tensors at all


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    dtype, d, hkv, group, ps, lengths, starts, max_splits, min_split = CASES[name]
    q, k, v, tables, ref_tables, lens, st = make_case(dtype, d, hkv, group, ps, lengths, starts)
    scale = d**-0.5
    out, tasks = gpu.decode(q, k, v, tables, lens, scale, max_splits, min_split, starts=st)
    firsts = starts or [0] * len(lengths)
    spans = [n - lo for n, lo in zip(lengths, firsts, strict=True)]
    splits = [cost.splits_of(n, max_splits, min_split)[0] for n in spans]
    assert tasks == sum(splits) * hkv
    assert out.shape == q.shape and out.dtype == torch.float32 and out.device == q.device
    want = reference.reference(q.cpu(), k.cpu(), v.cpu(), ref_tables, lens, scale, st)
    err = (out.cpu().double() - want).abs().max().item()
    assert err < 2e-3, f"{name}: max abs error {err:.2e}"


def test_ieee_precision_is_float32_exact():
    """KernelConfig(precision="ieee"): exact float32 products (what the CPU kernel computes),
    far inside the TF32 default's error."""
    dtype, d, hkv, group, ps, lengths, starts, max_splits, min_split = CASES[
        "bf16-d128-group8-split"
    ]
    q, k, v, tables, ref_tables, lens, st = make_case(dtype, d, hkv, group, ps, lengths, starts)
    config = gpu.KernelConfig(block_tokens=32, precision="ieee")
    out, _ = gpu.decode(q, k, v, tables, lens, 0.1, max_splits, min_split, starts=st, config=config)
    want = reference.reference(q.cpu(), k.cpu(), v.cpu(), ref_tables, lens, 0.1, st)
    assert (out.cpu().double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["fp16-d64-smollm-split", "fp16-d128-sliding-split"])
def test_split_merge_equals_unsplit(name):
    """Merging a request's splits gives its unsplit result up to float32 rounding, and the
    same as the CPU kernel's workqueue with the same splits (IEEE-float32 dots: with TF32 the
    softmax weights are rounded relative to each split's own running max)."""
    dtype, d, hkv, group, ps, lengths, starts, max_splits, min_split = CASES[name]
    q, k, v, tables, _, lens, st = make_case(dtype, d, hkv, group, ps, lengths, starts, seed=1)
    exact = gpu.KernelConfig(precision="ieee")
    whole, n_whole = gpu.decode(q, k, v, tables, lens, 0.1, starts=st, config=exact)
    split, n_split = gpu.decode(
        q, k, v, tables, lens, 0.1, max_splits, min_split, starts=st, config=exact
    )
    assert n_split > n_whole == len(lengths) * hkv
    torch.testing.assert_close(split, whole, rtol=0, atol=2e-6)
    if kernel.AVAILABLE:
        args = (tables, lens, 0.1, max_splits, min_split)
        cpu, *_ = kernel.decode(q.cpu(), k.cpu(), v.cpu(), *args, threads=1, starts=st)
        torch.testing.assert_close(split.cpu(), cpu, rtol=0, atol=2e-6)


def test_route_dispatch_for_cuda_pages():
    """What run_route does with CUDA pages (routes._run_gpu, called directly with a program
    count: the interpreter's tensors are CPU tensors): the Triton workqueue split by
    gpu.split_settings, the CPU workqueue's output with the same settings, its merge bytes."""
    q, k, v, tables, ref_tables, lens, st = make_case(
        torch.float16, 128, 2, 4, 16, [300, 700, 1500], [0, 19, 600], seed=2
    )
    spans = lens - st
    settings = gpu.split_settings(spans.tolist(), 2, 8)  # chunk 1881 x 2 / 8 -> 471 tokens
    out, info = routes._run_gpu(q, k, v, tables, lens, 0.1, st, spans, programs=8)
    splits = [cost.splits_of(n, *settings)[0] for n in spans.tolist()]
    assert splits == [1, 2, 2] and info.tasks == sum(splits) * 2
    assert info.route == "workqueue" and info.dispatches == 2 and info.merge_bytes > 0
    want = reference.reference(q.cpu(), k.cpu(), v.cpu(), ref_tables, lens, 0.1, st)
    assert (out.cpu().double() - want).abs().max().item() < 2e-3
    if kernel.AVAILABLE:
        # the GPU path cuts ranges with one partial each (no part grid): the same on the CPU
        profile = cost.MachineProfile(max_splits=settings[0], min_split_tokens=settings[1],
                                      batch_invariant=False)  # fmt: skip
        args = (q.cpu(), k.cpu(), v.cpu(), tables, lens, "workqueue", 0.1, profile, 1, st)
        cpu, cpu_info = routes.run_route(*args)
        tf32 = 1e-3 if DEVICE == "cuda" else 2e-6  # the interpreter's dots are float32
        torch.testing.assert_close(out.cpu(), cpu, rtol=0, atol=tf32)
        assert info.merge_bytes == cpu_info.merge_bytes


def test_one_plan_serves_every_layer():
    """gpu.plan once per step, gpu.launch per layer: each layer's output is what a fresh
    decode of that layer gives, bit for bit; pages of another shape are refused."""
    dtype, d, hkv, group, ps, lengths, starts, max_splits, min_split = CASES[
        "bf16-d128-group8-split"
    ]
    q, k, v, tables, _, lens, st = make_case(dtype, d, hkv, group, ps, lengths, starts, seed=3)
    p = gpu.plan(q, k, v, tables, lens, max_splits, min_split, st)
    layers = [(k, v), (v * 0.5, k * 2)]  # another layer: same pool, same unread NaN slots
    for kl, vl in layers:
        out = gpu.launch(p, q, kl, vl, 0.1)
        want, _ = gpu.decode(q, kl, vl, tables, lens, 0.1, max_splits, min_split, starts=st)
        assert torch.equal(out, want)
    with pytest.raises(PagedInputError):
        gpu.launch(p, q, k[:-1].contiguous(), v[:-1].contiguous(), 0.1)


def test_padded_route_runs_on_the_pages_device():
    """reference.padded (the padded route, a GPU baseline too) with pages on DEVICE and host
    tables and lengths matches the float64 reference."""
    dtype, d, hkv, group, ps, lengths, starts, _, _ = CASES["fp16-d128-sliding-split"]
    q, k, v, _, ref_tables, lens, st = make_case(dtype, d, hkv, group, ps, lengths, starts)
    k, v = k.nan_to_num(7.0), v.nan_to_num(-7.0)  # padded reads unread slots (masked): finite
    out = reference.padded(q, k, v, ref_tables, lens, 0.1, st)
    assert out.device == q.device
    want = reference.reference(q.cpu(), k.cpu(), v.cpu(), ref_tables, lens, 0.1, st)
    assert (out.cpu().double() - want).abs().max().item() < 2e-3


def test_bad_input_is_a_typed_error():
    q, k, v, tables, _, lens, _ = make_case(torch.bfloat16, 64, 2, 4, 16, [20, 40], None)
    past = tables.clone()
    past[1, 2] = k.shape[0]  # a page the second request reaches, one past the pool
    bad = [
        dict(tables=past),
        dict(lengths=torch.tensor([0, 40], dtype=torch.int32)),
        dict(lengths=torch.tensor([20, 16 * tables.shape[1] + 1], dtype=torch.int32)),
        dict(starts=torch.tensor([0, 40], dtype=torch.int32)),
        dict(v_pages=v.to(torch.float16)),
        dict(q=q[:1]),
        dict(q=q[:, :3]),
        dict(q=q.to("meta")),  # not on the pages' device
        dict(q=torch.zeros(2, 2 * 17, 64, device=q.device)),  # group 17 > MAX_GROUP
        dict(max_splits=0),
        dict(out=torch.empty(2, 8, 64, dtype=torch.float16, device=q.device)),
    ]
    good = dict(q=q, k_pages=k, v_pages=v, tables=tables, lengths=lens, scale=0.1)
    for change in bad:
        with pytest.raises(PagedInputError):
            gpu.decode(**{**good, **change})
