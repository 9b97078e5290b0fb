"""The paged KV cache, the compiled decode kernel and every route against a float64 reference."""

import dataclasses

import pytest
import torch
import transformers

from spectrumkv.engines.hf import sliding_layers
from spectrumkv.paged import kernel
from spectrumkv.paged.cache import PagedConfig, PagedKVCache
from spectrumkv.paged.cost import KERNEL_ROUTES, Geometry, MachineProfile, route_terms
from spectrumkv.paged.errors import CacheFullError, PagedInputError
from spectrumkv.paged.reference import gather, reference, sdpa_per_request
from spectrumkv.paged.routes import ROUTES, decode_attention, run_route

# small split settings so short test requests still split (and merge) on every kernel route
SPLITTY = MachineProfile(min_split_tokens=64, max_splits=5, split_splits=3)
DTYPES = (torch.float16, torch.bfloat16)


def make_cache(
    lengths, dtype=torch.float16, kv_heads=3, head_dim=64, page_size=16, seed=0, poison=False
):
    """A shuffled pool with holes: requests interleaved with freed ones, random contents.
    poison: every slot no request wrote (holes, the rest of a last page) holds NaN."""
    g = torch.Generator().manual_seed(seed)
    need = sum(-(-n // page_size) for n in lengths)
    cfg = PagedConfig(1, kv_heads, head_dim, 2 * need + 4, page_size, dtype)
    cache = PagedKVCache(cfg, shuffle_seed=seed)
    if poison:
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
    for i, n in enumerate(lengths):
        cache.allocate(("hole", i), n)  # freed below: holes between live requests' pages
        cache.allocate(i, n)
        k, v = torch.randn(2, kv_heads, n, head_dim, generator=g)
        cache.write(0, i, 0, k, v)
    for i in range(len(lengths)):
        cache.free(("hole", i))
    tables, lens = cache.block_tables(list(range(len(lengths))))
    return cache, tables, lens


def check_routes(
    lengths, dtype, q_heads=9, kv_heads=3, head_dim=64, page_size=16, tol=2e-3, starts=None
):
    cache, tables, lens = make_cache(lengths, dtype, kv_heads, head_dim, page_size)
    kp, vp = cache.layer(0)
    q = torch.randn(len(lengths), q_heads, head_dim, generator=torch.Generator().manual_seed(1))
    if starts is not None:
        starts = torch.tensor(starts, dtype=torch.int32)
    ref = reference(q, kp, vp, tables, lens, head_dim**-0.5, starts)
    for route in ROUTES:
        out = decode_attention(q, kp, vp, tables, lens, route=route, profile=SPLITTY,
                               starts=starts)  # fmt: skip
        assert out.shape == q.shape and out.dtype == torch.float32
        err = (out.double() - ref).abs().max().item()
        # padded runs SDPA in the KV dtype: its output is rounded to it
        limit = tol if route != "padded" else max(tol, ref.abs().max().item() * 2**-8)
        assert err < limit, (route, err)
    return cache, tables, lens, q, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_routes_match_reference_at_page_boundaries(dtype):
    check_routes([1, 15, 16, 17, 31, 32, 33, 64, 65, 200, 513], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_7b_shape_and_32_token_pages(dtype):
    check_routes([1, 33, 300, 700], dtype, q_heads=32, kv_heads=8, head_dim=128, page_size=32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_routes_with_window_starts_match_reference(dtype):
    """Sliding-window layers: request b attends to tokens [start, length) only; starts at,
    before and after page boundaries, a window of one token, spans that split and merge."""
    lengths = [1, 17, 33, 200, 513, 700, 40]
    starts = [0, 16, 1, 137, 512, 100, 15]
    _, _, _, _, ref = check_routes(lengths, dtype, starts=starts)
    whole = check_routes(lengths, dtype)[4]  # the same data without starts
    assert torch.equal(ref[0], whole[0]) and (ref[3] - whole[3]).abs().max() > 1e-3


def test_long_request_32k():
    check_routes([32768, 5], torch.bfloat16, q_heads=4, kv_heads=1, head_dim=64)


def test_kernel_scratch_does_not_grow_with_context():
    """The kernel's only heap memory (task list, merge list, split partials: PyMem_Malloc, which
    tracemalloc sees) is O(batch x KV heads x parts x group x head_dim): the partials grow with
    the context up to the part cap (16 per request and KV head) and not past it."""
    import tracemalloc

    kv_heads, group, d, batch = 2, 4, 64, 2
    cache, tables, _ = make_cache([32768] * batch, torch.bfloat16, kv_heads, d)
    kp, vp = cache.layer(0)
    q = torch.randn(batch, kv_heads * group, d)
    peaks = {}
    for n in (64, 16384, 32768):
        lens = torch.full((batch,), n, dtype=torch.int32)
        kernel.decode(q, kp, vp, tables, lens, d**-0.5, 8, 1024, 1, part_tokens=1024)  # warm
        tracemalloc.start()
        _, _, partials = kernel.decode(q, kp, vp, tables, lens, d**-0.5, 8, 1024, 1,
                                       part_tokens=1024)  # fmt: skip
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert partials == (0 if n == 64 else 16 * batch)
    partial_bytes = 16 * batch * kv_heads * group * (d + 2) * 4  # (m, l, acc) float32 each
    assert peaks[64] < 4096 and peaks[16384] >= partial_bytes  # it sees the partials
    assert peaks[32768] <= peaks[16384] + 1024  # and nothing grows past the cap
    assert peaks[32768] <= partial_bytes + 64 * 1024  # tasks, merges, Python's own objects


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", kernel.ISAS)
def test_every_kernel_matches(dtype, isa):
    """Each compiled kernel the CPU has (AVX-512 kernels need head_dim % 16 == 0; 72 % 16 != 0
    runs the AVX2 one even when AVX-512 is asked for), with tasks of all KV heads (1 thread) and
    of one KV head (2 threads, 6 pieces: too few to group), split (slots per head) or not."""
    previous = kernel.set_isa(isa)
    try:
        for d in (64, 72):
            cache, tables, lens = make_cache([1, 40, 300], dtype, head_dim=d)
            kp, vp = cache.layer(0)
            q = torch.randn(3, 9, d)
            ref = reference(q, kp, vp, tables, lens, d**-0.5)
            for threads, splits in ((1, 4), (1, 1), (2, 4)):
                out, tasks, _ = kernel.decode(q, kp, vp, tables, lens, d**-0.5, splits, 64,
                                              threads)  # fmt: skip
                assert tasks == (6 if splits > 1 else 3) * (1 if threads == 1 else 3)
                assert (out.double() - ref).abs().max().item() < 2e-3
    finally:
        kernel.set_isa(previous)


@pytest.mark.parametrize("threads", [1, 2])
def test_task_count_is_the_cost_models(threads):
    """The kernel groups KV heads into tasks exactly as cost.task_heads says (the cost model's
    task term), on SmolLM2's and the 7B shape's heads, for every kernel route; one head per
    task (fuse_heads off) gives the same bits as fused tasks."""
    for kv_heads, group, d in ((3, 3, 64), (8, 4, 128)):
        lengths = [1, 40, 300, 700, 33, 1000, 64, 65, 17]
        cache, tables, lens = make_cache(lengths, torch.bfloat16, kv_heads, d)
        kp, vp = cache.layer(0)
        q = torch.randn(len(lengths), kv_heads * group, d)
        ref = reference(q, kp, vp, tables, lens, d**-0.5)
        geometry = Geometry(kv_heads, group, d)
        # the part grid (1,024 tokens; 32: up to 31 parts, past MAX_PARTS) and plain ranges
        outs = {}
        for grid in ({}, {"part_tokens": 32}, {"batch_invariant": False}, {"fuse_heads": False}):
            profile = dataclasses.replace(SPLITTY, threads=threads, **grid)
            for route in KERNEL_ROUTES:
                out, info = run_route(q, kp, vp, tables, lens, route, profile=profile,
                                      threads=threads)  # fmt: skip
                assert info.tasks == route_terms(route, lengths, geometry, profile)[2], route
                assert (out.double() - ref).abs().max().item() < 2e-3
                outs[route, profile.fuse_heads, profile.part_tokens, profile.batch_invariant] = out
        for route in KERNEL_ROUTES:
            assert torch.equal(outs[route, False, 1024, True], outs[route, True, 1024, True])


def test_merge_is_exact():
    """Split and unsplit runs of one request agree to float rounding (the merge is exact)."""
    cache, tables, lens = make_cache([5000, 777], torch.float16)
    kp, vp = cache.layer(0)
    q = torch.randn(2, 9, 64)
    whole, tasks1, _ = kernel.decode(q, kp, vp, tables, lens, 0.125)
    for splits, min_tokens in ((2, 32), (7, 100), (64, 32)):
        parts, tasks, _ = kernel.decode(q, kp, vp, tables, lens, 0.125, splits, min_tokens)
        assert tasks > tasks1
        assert torch.allclose(parts, whole, rtol=1e-5, atol=2e-6)


def test_adaptive_is_batch_invariant():
    """With batch_invariant (the default) every kernel route keeps one partial per part_tokens
    tokens, so a bf16 request's output is the same bits whatever the route (adaptive may pick
    split) and alone or in any batch; without it, split's ranges differ from workqueue's and so
    do the bits."""
    lengths = [700, 40, 3000, 129, 1500]
    cache, tables, lens = make_cache(lengths, torch.bfloat16)
    kp, vp = cache.layer(0)
    q = torch.randn(len(lengths), 9, 64)
    favour_split = dataclasses.replace(SPLITTY, scale_split=0.01, min_split_tokens=1024,
                                       part_tokens=64)  # fmt: skip
    whole, info = run_route(q, kp, vp, tables, lens, "adaptive", profile=favour_split)
    assert info.route == "split"
    for route in KERNEL_ROUTES:
        for batch in ([0], [2], [4, 1], [3, 2, 0]):
            i = torch.tensor(batch)
            out, _ = run_route(q[i], kp, vp, tables[i], lens[i], route, profile=favour_split)
            assert torch.equal(out, whole[i]), (batch, route)
    free = dataclasses.replace(favour_split, batch_invariant=False)
    split, info = run_route(q, kp, vp, tables, lens, "adaptive", profile=free)
    assert info.route == "split"
    queue, _ = run_route(q, kp, vp, tables, lens, "workqueue", profile=free)
    assert not torch.equal(split, queue)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", kernel.ISAS)
def test_part_grid_bits_do_not_depend_on_ranges(dtype, isa):
    """part_tokens: however a span is cut into ranges (splits, thread counts, one request or a
    batch), the kernel returns the same bits, close to the reference; also for spans that
    start inside a page and off the AMX tile's 16-token grid (a sliding window's start)."""
    previous = kernel.set_isa(isa)
    try:
        lengths = [1, 63, 64, 65, 1000, 2500]
        cache, tables, lens = make_cache(lengths, dtype)
        kp, vp = cache.layer(0)
        q = torch.randn(len(lengths), 9, 64)
        for starts in (None, torch.tensor([0, 5, 0, 17, 333, 1001], dtype=torch.int32)):
            ref = reference(q, kp, vp, tables, lens, 0.125, starts)
            first = None
            for splits, min_tokens, threads in ((1, 1 << 30, 1), (64, 32, 2), (3, 500, 2),
                                                 (5, 64, 1)):  # fmt: skip
                out, *_ = kernel.decode(q, kp, vp, tables, lens, 0.125, splits, min_tokens,
                                       threads, starts=starts, part_tokens=96)  # fmt: skip
                assert (out.double() - ref).abs().max().item() < 2e-3
                first = out if first is None else first
                assert torch.equal(out, first), (splits, min_tokens, threads)
            b = 4  # one request alone
            one = None if starts is None else starts[b : b + 1]
            out, *_ = kernel.decode(q[b : b + 1], kp, vp, tables[b : b + 1], lens[b : b + 1],
                                   0.125, 7, 32, 2, starts=one, part_tokens=96)  # fmt: skip
            assert torch.equal(out, first[b : b + 1])
    finally:
        kernel.set_isa(previous)


def test_adaptive_reports_its_choice():
    cache, tables, lens = make_cache([100, 3000], torch.float16)
    kp, vp = cache.layer(0)
    q = torch.randn(2, 9, 64)
    _, info = run_route(q, kp, vp, tables, lens, "adaptive")
    assert info.route in ("per-request", "split", "workqueue", "padded")
    _, info = run_route(q, kp, vp, tables, lens, "per-request")
    assert info.dispatches == 2


def test_sdpa_anchor_matches():
    cache, tables, lens = make_cache([1, 50, 333], torch.float16)
    kp, vp = cache.layer(0)
    q = torch.randn(3, 9, 64)
    ref = reference(q, kp, vp, tables, lens, 0.125)
    assert (sdpa_per_request(q, kp, vp, tables, lens, 0.125).double() - ref).abs().max() < 2e-3


# ---- the cache ----


def test_cache_append_write_free_and_full_pool():
    cfg = PagedConfig(2, 3, 64, pages=4, page_size=16)
    cache = PagedKVCache(cfg, shuffle_seed=3)
    cache.allocate("a", 16)
    cache.allocate("b", 17)  # 2 pages
    assert cache.free_pages == 1
    k = torch.randn(3, 17, 64)
    cache.write(1, "b", 0, k, -k)
    before = cache.k.clone()
    slots = cache.append(["a", "b"])  # "a" needs a new page, "b" does not
    assert cache.length("a") == 17 and cache.length("b") == 18 and cache.free_pages == 0
    step = torch.randn(2, 3, 64)
    cache.write_slots(1, slots, step, step)
    kp, _ = cache.layer(1)
    tables, lens = cache.block_tables(["a", "b"])
    got = gather(kp, tables[1], 18)
    assert torch.equal(got[:, :17], k.half()) and torch.equal(got[:, 17], step[1].half())
    assert torch.equal(gather(kp, tables[0], 17)[:, 16], step[0].half())
    q = torch.randn(2, 9, 64)
    want = reference(q, kp, cache.layer(1)[1], tables, lens, 0.125)
    got = cache.decode_attention(q, 1, tables, lens, route="workqueue")
    assert (got.double() - want).abs().max() < 2e-3
    with pytest.raises(CacheFullError):
        cache.extend("a", 16)
    with pytest.raises(CacheFullError):
        cache.allocate("c", 1)
    assert cache.length("a") == 17 and cache.free_pages == 0 and "c" not in cache._pages
    assert torch.equal(cache.k[0], before[0])  # layer 0 untouched by all of this
    cache.free("b")
    assert cache.free_pages == 2
    cache.allocate("c", 32)
    assert set(cache.pages_of("c")).isdisjoint(cache.pages_of("a"))


@pytest.mark.skipif(not kernel.AVAILABLE, reason="the compiled kernel is not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_slot_write_equals_index_copy(dtype):
    """A step's K/V as the Llama step hands it (k a strided slice of the RoPE buffer) lands in
    the same bits as torch's index_copy_ path; a bad row is a typed error and writes nothing."""
    cfg = PagedConfig(2, 3, 64, pages=8, page_size=16, dtype=dtype)
    cache, twin = PagedKVCache(cfg, shuffle_seed=1), PagedKVCache(cfg, shuffle_seed=1)
    for c in (cache, twin):
        c.allocate("a", 16)
        c.allocate("b", 5)
    slots = cache.append(["a", "b"])
    assert torch.equal(twin.append(["a", "b"]).rows, slots.rows)
    qk = torch.randn(2, 9 + 3, 64).to(dtype)  # [B, Hq + Hkv, D]: k is qk[:, 9:]
    k, v = qk[:, 9:], torch.randn(2, 3, 64).to(dtype)
    assert not k.is_contiguous()
    cache.write_slots(1, slots, k, v)
    d = cfg.head_dim
    kp, vp = twin.layer(1)
    kp.view(-1, d).index_copy_(0, slots.rows[0], k.reshape(-1, d))
    vp.view(-1, d).index_copy_(0, slots.rows[0], v.reshape(-1, d))
    assert torch.equal(cache.k, twin.k) and torch.equal(cache.v, twin.v)
    before = cache.k.clone()
    rows = slots.rows.clone()
    rows[0, -1] = cfg.pages * 3 * 16  # only the last row is outside: the others stay unwritten
    with pytest.raises(PagedInputError, match="outside the page pool"):
        cache.write_slots(1, slots._replace(rows=rows), k + 1, v)
    assert torch.equal(cache.k, before)
    assert not kernel.write_rows(*cache.layer(1), slots.rows[0], k.float(), v.float())
    meta = [x.to("meta") for x in cache.layer(1)]  # pages off the CPU: never a host copy
    assert not kernel.write_rows(*meta, slots.rows[0], k, v)


@pytest.mark.skipif(not kernel.AVAILABLE, reason="the compiled kernel is not built")
def test_compiled_prompt_write_equals_index_put():
    """A prompt written at a start mid-page (k, v [kv_heads, n, head_dim], in the KV dtype or
    float32: the compiled rows path) lands in the same bits as torch's advanced indexing; other
    requests' pages stay untouched."""
    cfg = PagedConfig(2, 3, 64, pages=12, page_size=16, dtype=torch.bfloat16)
    cache, twin, plain = (PagedKVCache(cfg, shuffle_seed=3) for _ in range(3))
    for c in (cache, twin, plain):
        c.allocate("other", 20)
        c.allocate("a", 70)
    k, v = torch.randn(3, 61, 64), torch.randn(3, 61, 64)
    before = cache.k.clone()
    cache.write(1, "a", 9, k.bfloat16(), v.bfloat16())
    twin.write(1, "a", 9, k, v)  # float32: converted first
    pos, table = torch.arange(9, 70), torch.tensor(plain.pages_of("a"))
    kp, vp = plain.layer(1)
    kp[table[pos // 16], :, pos % 16] = k.transpose(0, 1).bfloat16()  # torch's indexing path
    vp[table[pos // 16], :, pos % 16] = v.transpose(0, 1).bfloat16()
    for c in (twin, plain):
        assert torch.equal(cache.k, c.k) and torch.equal(cache.v, c.v)
    got_k, got_v = cache.read(1, "a", 70, 9)
    assert torch.equal(got_k, k.bfloat16()) and torch.equal(got_v, v.bfloat16())
    other = cache.pages_of("other")
    assert torch.equal(cache.k[:, other], before[:, other])


def test_window_layers_keep_only_their_window():
    """Layers 1, 3 of 4 are window layers: 2 page groups of 2 layers. Window groups take pages
    from `window_start` on, `release` hands back those wholly below a slot (entries -1), the
    full group keeps all; reads and writes below a released page are typed errors; every
    page comes back on free."""
    cfg = PagedConfig(4, 2, 32, pages=12, page_size=4, window_layers=(1, 3))
    assert cfg.groups == ((0, 2), (1, 3)) and cfg.id_bytes == 2 * cfg.page_bytes
    cache = PagedKVCache(cfg, shuffle_seed=2)
    assert [cache.group_of(i) for i in range(4)] == [0, 1, 0, 1]
    assert cache.pages_needed(20, window=6) == 5 + 3  # window: ceil(7 / 4) + 1 pages
    assert cache.pages_needed(6, window=6) == 2 + 2 and cache.pages_needed(20) == 10
    cache.allocate("a", 10, window_start=5)  # full: 3 pages; window: slots 4.. -> 2 pages
    assert cache.free_pages == 12 - 5 and cache.pages_of("a", 1)[0] == -1
    k = torch.randn(2, 10, 32)
    for layer in range(4):
        lo = 4 if layer in cfg.window_layers else 0
        cache.write(layer, "a", lo, k[:, lo:], -k[:, lo:])
    got_k, got_v = cache.read(3, "a", 10, start=5)
    assert torch.equal(got_k, k[:, 5:].half()) and torch.equal(got_v, -k[:, 5:].half())
    assert torch.equal(cache.read(2, "a", 7, start=2)[0], k[:, 2:7].half())
    with pytest.raises(PagedInputError, match="released"):
        cache.read(1, "a", 10)
    with pytest.raises(PagedInputError, match="released"):
        cache.write(3, "a", 3, k[:, 3:4], k[:, 3:4])
    slots = cache.append(["a"])  # slot 10 in the last page of each group
    assert slots.rows.shape == (2, 2) and cache.free_pages == 7
    step = torch.randn(1, 2, 32)
    for layer in range(4):
        cache.write_slots(layer, slots, step * (layer + 1), step)
    q = torch.randn(1, 4, 32)
    for layer in range(4):
        tables, lens = cache.block_tables(["a"], cache.group_of(layer))
        start = torch.tensor([5 if layer in cfg.window_layers else 0], dtype=torch.int32)
        kp, vp = cache.layer(layer)
        want = reference(q, kp, vp, tables, lens, 0.2, start)
        got = run_route(q, kp, vp, tables, lens, "workqueue", 0.2, starts=start)[0]
        assert (got.double() - want).abs().max() < 2e-3
        assert torch.equal(
            cache.read(layer, "a", 11, start=10)[0][:, 0], (step[0] * (layer + 1)).half()
        )
    assert cache.release("a", 9) == 1 and cache.pages_of("a", 1)[:2] == [-1, -1]
    assert cache.release("a", 9) == 0 and cache.free_pages == 8
    assert len(set(cache.pages_of("a", 0))) == 3 and -1 not in cache.pages_of("a", 0)
    cache.free("a")
    assert cache.free_pages == 12 and sorted(cache._free) == list(range(12))
    with pytest.raises(PagedInputError, match="window_layers"):
        PagedConfig(4, 2, 32, pages=1, window_layers=(3, 1))
    with pytest.raises(PagedInputError, match="window_start"):
        cache.allocate("b", 4, window_start=5)


def test_for_model_geometry_sliding_window_models_included():
    gemma = transformers.Gemma3TextConfig(num_hidden_layers=18, num_key_value_heads=1, head_dim=256)
    cfg = PagedConfig.for_model(gemma, pages=8)  # no window layers: whole contexts everywhere
    assert (cfg.layers, cfg.kv_heads, cfg.head_dim, cfg.pages, cfg.group_size) == (
        18,
        1,
        256,
        8,
        18,
    )
    window = sliding_layers(gemma)  # 5 of every 6 layers
    cfg = PagedConfig.for_model(gemma, pages=8, window_layers=window)
    assert len(window) == 15 and cfg.group_size == 3 and len(cfg.groups) == 6
    assert cfg.groups[0] == (5, 11, 17) and cfg.id_bytes == 3 * cfg.page_bytes
    cfg = PagedConfig.for_model(
        transformers.LlamaConfig(num_attention_heads=9, num_key_value_heads=3, hidden_size=576),
        pages=8,
    )
    assert (cfg.kv_heads, cfg.head_dim) == (3, 64)


# ---- bad input: a typed error, never a crash or an out-of-bounds read ----


@pytest.fixture
def small():
    cache, tables, lens = make_cache([20, 40], torch.float16)
    kp, vp = cache.layer(0)
    return torch.randn(2, 9, 64), kp, vp, tables, lens


@pytest.mark.parametrize("route", ROUTES)
def test_bad_tables_and_lengths(small, route):
    q, kp, vp, tables, lens = small
    bad = tables.clone()
    bad[1, 1] = kp.shape[0]  # one past the pool
    cases = [(bad, lens), (tables, torch.tensor([20, 0], dtype=torch.int32))]
    cases.append((tables, torch.tensor([-5, 40], dtype=torch.int32)))
    cases.append((tables, torch.tensor([20, tables.shape[1] * 16 + 1], dtype=torch.int32)))
    neg = tables.clone()
    neg[0, 0] = -1
    cases.append((neg, lens))
    for t, n in cases:
        with pytest.raises(PagedInputError):
            decode_attention(q, kp, vp, t, n, route=route)
    for s in ([-1, 0], [0, 40], [20, 0], [0, 41]):  # start < 0 or not below its length
        with pytest.raises(PagedInputError, match="start"):
            decode_attention(q, kp, vp, tables, lens, route=route,
                             starts=torch.tensor(s, dtype=torch.int32))  # fmt: skip
    for s in (torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32)):
        with pytest.raises(PagedInputError, match="starts must be"):
            decode_attention(q, kp, vp, tables, lens, route=route, starts=s)
    # pages wholly before a request's start are never read, so they need not be valid
    skipped = tables.clone()
    skipped[1, 0] = kp.shape[0] + 7
    starts = torch.tensor([0, 16], dtype=torch.int32)
    got = decode_attention(q, kp, vp, skipped, lens, route=route, starts=starts)
    want = reference(q, kp, vp, tables, lens, 0.125, starts)
    assert (got.double() - want).abs().max() < 1e-2


def test_bad_shapes_and_dtypes(small):
    q, kp, vp, tables, lens = small
    with pytest.raises(PagedInputError, match="float16 or bfloat16"):
        decode_attention(q, kp, vp.bfloat16(), tables, lens)
    with pytest.raises(PagedInputError, match="q must be"):
        decode_attention(torch.randn(2, 8, 64), kp, vp, tables, lens)  # 8 % 3 heads
    with pytest.raises(PagedInputError, match="q must be"):
        decode_attention(torch.randn(2, 9, 32), kp, vp, tables, lens)
    with pytest.raises(PagedInputError, match="tables must be"):
        decode_attention(torch.randn(3, 9, 64), kp, vp, tables, lens)  # batch 3 vs tables 2
    with pytest.raises(PagedInputError, match="tables must be"):
        decode_attention(q, kp, vp, tables.long(), lens)
    with pytest.raises(PagedInputError, match="lengths must be"):
        decode_attention(q, kp, vp, tables, lens[:1])
    with pytest.raises(PagedInputError, match="unknown route"):
        decode_attention(q, kp, vp, tables, lens, route="fastest")
    for part in (-32, 100):  # the kernel's own check (a profile refuses these before)
        with pytest.raises(PagedInputError, match="geometry"):
            kernel.decode(q, kp, vp, tables, lens, 0.125, 4, 32, part_tokens=part)
    with pytest.raises(PagedInputError):
        PagedConfig(1, 3, 64, pages=0)
    with pytest.raises(PagedInputError):
        PagedConfig(1, 3, 64, pages=4, dtype=torch.float32)
