"""The continuous-batching engine (spectrumkv.serve) on SmolLM2-135M: batched = alone, payloads
with dropped tokens straight into pages, admission control, cancellation, sampling."""

import contextlib
import dataclasses
import threading
import time

import pytest
import torch

import spectrumkv as skv
from spectrumkv.kv import LayerKV
from spectrumkv.paged import cost
from spectrumkv.paged.cache import PagedConfig, PagedKVCache
from spectrumkv.paged.errors import PagedInputError
from spectrumkv.payload import decode_payload
from spectrumkv.pd.sampling import Cancelled, SamplingParams
from spectrumkv.serve.engine import BatchEngine, EngineConfig
from spectrumkv.serve.requests import PoolBusy, RequestTooLarge
from spectrumkv.serve.runner import ModelRunner, pool_config

pytestmark = pytest.mark.model

PROMPTS = (  # mixed lengths: 6 to ~60 tokens of context
    "The capital of France is",
    "Why is the sky blue? Explain it to a ten-year-old in two sentences, with an example.",
    "def fibonacci(n):",
    "Write a short poem about the sea at night. It should rhyme, have four lines, and mention "
    "the moon, the waves, a lighthouse and a ship far away on the horizon, sailing home.",
)
N = 12


@pytest.fixture(scope="module")
def prompts(smol):
    out = []
    for p in PROMPTS:
        context, last = skv.split_prompt(smol.tokenizer(p, return_tensors="pt")["input_ids"][0])
        out.append((context, last, skv.prefill(smol, context)))
    return out


@pytest.fixture(scope="module")
def engine(smol):
    eng = BatchEngine(smol, EngineConfig(pool_mb=24, max_queue=8, queue_timeout_s=0.5))
    yield eng
    eng.close()


def _alone(smol, pre, last, n=N):
    """Today's one-at-a-time path: an HF DynamicCache built from the layers, greedy."""
    return skv.generate(smol, skv.reference_state(smol, pre), last, n)


def test_batched_greedy_equals_each_alone(smol, prompts, engine):
    greedy = SamplingParams(max_tokens=N)
    gens = [
        engine.submit(greedy, last, pre.n_tokens, layers=pre.layers) for _, last, pre in prompts
    ]
    gens.append(engine.submit(greedy, prompts[0][1], prompts[0][0].numel(), context=prompts[0][0]))
    outs = [g.wait(120).token_ids for g in gens]
    assert engine.stats.batch_sum / engine.stats.steps > 2  # they did decode together
    for (_, last, pre), out in zip(prompts, outs, strict=False):
        assert out == _alone(smol, pre, last)
    assert outs[-1] == outs[0]  # the recompute path (local prefill into pages) too
    assert engine.cache.free_pages == engine.total_pages


def test_chunked_local_prefill_decodes_beside_the_batch(smol, prompts):
    """prefill_chunk: a local prefill runs 16 tokens per iteration with decode steps between;
    its tokens equal the one-at-a-time path's; a cancelled one (queued or prefilling) gives back
    its reservation."""
    eng = BatchEngine(smol, EngineConfig(pool_mb=24, prefill_chunk=16))
    try:
        greedy = SamplingParams(max_tokens=N)
        (_, last0, pre0), (ctx, last, pre) = prompts[0], prompts[3]
        want = _alone(smol, pre, last)
        alone = eng.submit(SamplingParams(max_tokens=2), last, ctx.numel(), context=ctx)
        assert alone.wait(120).token_ids == want[:2]  # its chunks alone: nothing else to step
        first = eng.submit(greedy, last0, pre0.n_tokens, layers=pre0.layers)
        local = eng.submit(greedy, last, ctx.numel(), context=ctx)
        assert first.wait(120).token_ids == _alone(smol, pre0, last0)
        assert local.wait(120).token_ids == want
        gone = eng.submit(greedy, last, ctx.numel(), context=ctx)
        gone.cancel()
        with pytest.raises(Cancelled):
            gone.wait(60)
        assert eng.load()["pages_reserved"] == 0 and eng.cache.free_pages == eng.total_pages
    finally:
        eng.close()


def test_mixed_prefill_chunks_ride_in_the_decode_step(smol, prompts):
    """prefill_mode "mixed": a local prefill's 16-token chunks are rows of the decode step
    (chunk K/V straight into its pages); its greedy tokens equal the "between" path's and the
    one-at-a-time path's, so do the decoding request's; a cancel mid-prefill frees its pages."""
    from spectrumkv.errors import ConfigError

    with pytest.raises(ConfigError, match="prefill_mode"):
        EngineConfig(prefill_mode="interleaved")
    eng = BatchEngine(smol, EngineConfig(pool_mb=24, prefill_chunk=16, prefill_mode="mixed"))
    assert eng._mixed  # SmolLM2 runs the hand-written Llama step
    try:
        greedy = SamplingParams(max_tokens=N)
        (_, last0, pre0), (ctx, last, pre) = prompts[2], prompts[3]
        want = _alone(smol, pre, last)
        first = eng.submit(SamplingParams(max_tokens=3 * N), last0, pre0.n_tokens,
                           layers=pre0.layers)  # fmt: skip
        while not first.token_ids:
            time.sleep(0.005)
        calls = []  # the HF forward (the "between" prefill's) must not run
        hook = smol.model.register_forward_pre_hook(lambda *_: calls.append(1))
        shared = []  # steps with a decode row and a middle chunk
        eng.on_step = lambda n, *_: shared.append(n) if n and eng._prefilling else None
        try:
            local = eng.submit(greedy, last, ctx.numel(), context=ctx)
            assert local.wait(120).token_ids == want
        finally:
            hook.remove()
        assert not calls and len(shared) >= ctx.numel() // 16 - 1
        assert first.wait(120).token_ids == _alone(smol, pre0, last0, 3 * N)
        held = []

        def cancel_mid_prefill(*_):  # on the engine thread, after a step
            if eng._prefilling and eng._prefilling[0].prefilled == 32 and not held:
                job = eng._prefilling[0]
                held.append(eng.cache.length(job.rid))  # its first two chunks' slots
                job.gen.cancel()

        eng.on_step = cancel_mid_prefill
        cut = eng.submit(greedy, last, ctx.numel(), context=ctx)
        with pytest.raises(Cancelled):
            cut.wait(60)
        assert held == [32]
        assert eng.load()["pages_reserved"] == 0 and eng.cache.free_pages == eng.total_pages
    finally:
        eng.close()


def test_payload_with_dropped_tokens_decodes_into_pages(smol, prompts, engine):
    _, last, pre = prompts[3]
    header, plan = skv.plan_transfer(smol, pre, skv.PolicyConfig("pdtrim", budget=0.5))
    payload = skv.encode(header, pre, plan)
    layers = decode_payload(payload, expect=smol.fingerprint).layers
    kept = layers[0].positions
    assert kept.numel() < pre.n_tokens and int(kept[-1]) < pre.n_tokens  # holes, positions kept
    ref = skv.generate(smol, skv.receive(smol, payload), last, N)
    g = engine.submit(SamplingParams(max_tokens=N), last, pre.n_tokens, layers=layers).wait(60)
    assert g.token_ids == ref
    assert engine.cache.free_pages == engine.total_pages


def test_seeded_sampling_does_not_depend_on_the_batch(prompts, engine):
    (_, last, pre), p = prompts[2], SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    alone = engine.submit(p, last, pre.n_tokens, layers=pre.layers).wait(60).token_ids
    batch = [
        engine.submit(p, la, pr.n_tokens, layers=pr.layers)
        for _, la, pr in prompts[2:] + prompts[:2]
    ]
    assert batch[0].wait(60).token_ids == alone
    other = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=8)
    assert engine.submit(other, last, pre.n_tokens, layers=pre.layers).wait(60).token_ids != alone


def test_stop_string_cuts_the_text(smol, prompts, engine):
    _, last, pre = prompts[0]
    full = smol.tokenizer.decode(_alone(smol, pre, last), skip_special_tokens=True)
    stop = full.strip()[2:5]
    pieces: list[str] = []
    g = engine.submit(SamplingParams(max_tokens=N, stop=(stop,)), last, pre.n_tokens,
                      layers=pre.layers, on_piece=pieces.append).wait(60)  # fmt: skip
    assert g.finish_reason == "stop" and stop not in g.text and full.startswith(g.text)
    assert "".join(pieces) == g.text


def test_pool_exhaustion_gives_pool_busy_not_a_crash(smol, prompts):
    _, last, pre = prompts[2]  # greedy runs past 40 tokens
    cfg = EngineConfig(pool_mb=pool_config(smol, 1).page_bytes * 30 * 4 / 2**20, page_size=16,
                       max_queue=1, queue_timeout_s=0.3)  # fmt: skip
    eng = BatchEngine(smol, cfg)  # 4 pages: room for one request at a time
    try:
        with pytest.raises(RequestTooLarge):
            eng.submit(SamplingParams(max_tokens=200), last, pre.n_tokens, layers=pre.layers)
        p = SamplingParams(max_tokens=40)
        first = eng.submit(p, last, pre.n_tokens, layers=pre.layers)
        while eng.load()["queued"]:  # admitted: it holds its pages
            time.sleep(0.01)
        second = eng.submit(p, last, pre.n_tokens, layers=pre.layers)  # waits for pages
        with pytest.raises(PoolBusy) as e:  # queue (1) full
            eng.submit(p, last, pre.n_tokens, layers=pre.layers)
        assert e.value.retry_after_s >= 1
        assert len(first.wait(120).token_ids) == 40
        # the second either got the first's pages in time or timed out with PoolBusy
        with contextlib.suppress(PoolBusy):
            assert len(second.wait(120).token_ids) == 40
        assert eng.cache.free_pages == eng.total_pages and eng.load()["pages_reserved"] == 0
    finally:
        eng.close()


def test_cancelled_request_frees_its_pages(prompts, engine):
    _, last, pre = prompts[2]
    started = threading.Event()
    g = engine.submit(SamplingParams(max_tokens=500), last, pre.n_tokens, layers=pre.layers,
                      on_piece=lambda _: started.set())  # fmt: skip
    assert started.wait(60)
    assert engine.cache.free_pages < engine.total_pages
    g.cancel()
    with pytest.raises(Cancelled):
        g.wait(60)
    assert len(g.token_ids) < 500
    assert engine.cache.free_pages == engine.total_pages


def test_gemma_sliding_window_layers_batched_equal_alone():
    """Gemma-3 (sliding window 512 in 5 of 6 layers): a 600-token prompt, whose sliding layers
    hold only their window, decodes in one batch with a short one and with itself as a payload
    with dropped tokens, token-identical to the one-at-a-time path. Without the window starts
    (sliding layers reading every slot) the long prompt's logits move: the check can fail."""
    gemma = skv.load("gemma3-270m")
    text = skv.assets.load_text("wiki")[:6000]
    long = gemma.tokenizer(text, return_tensors="pt")["input_ids"][0][:600]
    short = gemma.tokenizer("The capital of France is", return_tensors="pt")["input_ids"][0]
    (lc, ll), (sc, sl) = skv.split_prompt(long), skv.split_prompt(short)
    lpre, spre = skv.prefill(gemma, lc), skv.prefill(gemma, sc)
    header, plan = skv.plan_transfer(gemma, lpre, skv.PolicyConfig("pdtrim", budget=0.5))
    payload = skv.encode(header, lpre, plan)
    trimmed = decode_payload(payload, expect=gemma.fingerprint).layers
    want = [_alone(gemma, lpre, ll, 6), _alone(gemma, spre, sl, 6),
            skv.generate(gemma, skv.receive(gemma, payload), ll, 6)]  # fmt: skip
    eng = BatchEngine(gemma, EngineConfig(pool_mb=32))
    p = SamplingParams(max_tokens=6)
    gens = [eng.submit(p, ll, lpre.n_tokens, layers=lpre.layers),
            eng.submit(p, sl, spre.n_tokens, layers=spre.layers),
            eng.submit(p, ll, lpre.n_tokens, layers=trimmed)]  # fmt: skip
    try:
        assert [g.wait(300).token_ids for g in gens] == want
    finally:
        eng.close()  # the runner is the test thread's from here
    assert eng.stats.batch_sum > eng.stats.steps
    assert eng.cache.free_pages == eng.total_pages and not eng.runner._prompt

    def first_logits(runner):
        runner.write_prompt("x", lpre.layers, lpre.n_tokens)
        try:
            return runner.step(["x"], [ll], [lpre.n_tokens])[0]
        finally:
            runner.free("x")

    good = first_logits(eng.runner)
    assert int(good.argmax()) == want[0][0]
    # the sliding layers' pages below the window are not there: 1 full group of 3 layers holds
    # all 600 slots (38 pages), 5 window groups slots 88.. on (pages 5-37: 33 each)
    eng.runner.write_prompt("x", lpre.layers, lpre.n_tokens)
    eng.runner.step(["x"], [ll], [lpre.n_tokens])
    assert eng.total_pages - eng.cache.free_pages == 38 + 5 * 33
    for i in range(1, 25):  # 624 slots, window from slot 112: window groups hold pages 7-38 only
        eng.runner.step(["x"], [ll], [lpre.n_tokens + i])
    assert eng.total_pages - eng.cache.free_pages == 39 + 5 * 32
    eng.runner.free("x")
    forced = lambda rids, *_: torch.zeros(len(rids), dtype=torch.int32)  # noqa: E731
    eng.runner._starts = forced
    with pytest.raises(PagedInputError, match="outside the page pool"):  # released: never read
        first_logits(eng.runner)
    whole = PagedKVCache(PagedConfig.for_model(gemma.model.config, 64, 16, gemma.kv_dtype))
    runner = ModelRunner(gemma, whole)  # every layer keeps every slot: starts 0 reads them all
    runner._starts = forced
    assert (first_logits(runner) - good).abs().max() > 1e-2


def test_gemma_window_pages_reserved_enough_under_a_small_pool():
    """Gemma-3 prompts past the window (random K/V as received, 700-1,000 tokens; 18 new
    tokens, so each window slides past a page) in a pool that holds two at a time: admission
    reserves the window groups' bound (cache.pages_needed), so every request completes (none
    fails for lack of pages, whatever the others hold while their windows slide), and every
    page comes back."""
    gemma = skv.load("gemma3-270m")
    fp, g = gemma.fingerprint, torch.Generator().manual_seed(0)
    eng = BatchEngine(gemma, EngineConfig(pool_mb=24, max_queue=8, queue_timeout_s=300))
    gens = []
    try:
        for n in (1000, 700, 950):
            shape = (fp.n_kv_heads, n, fp.head_dim)
            layers = [LayerKV(torch.randn(shape, generator=g).half(),
                              torch.randn(shape, generator=g).half(), torch.arange(n))
                      for _ in range(fp.n_layers)]  # fmt: skip
            whole = -(-(n + 18) // 16)  # pages of the whole context, per page group
            assert eng.pages_needed(n, 18) == whole + 5 * 34  # window groups: ceil(513/16) + 1
            gens.append(eng.submit(SamplingParams(max_tokens=18), 2, n, layers=layers))
        for gen in gens:
            gen.wait(300)
        assert all(gen.error is None for gen in gens)
        assert eng.stats.steps > 18  # not all at once: the pool held two
    finally:
        eng.close()
    assert eng.cache.free_pages == eng.total_pages


def test_bad_requests_get_typed_errors(prompts, engine):
    _, last, pre = prompts[0]
    with pytest.raises(ValueError, match="one choice"):
        engine.submit(SamplingParams(max_tokens=4, n=2), last, pre.n_tokens, layers=pre.layers)
    with pytest.raises(ValueError, match="exactly one"):
        engine.submit(SamplingParams(max_tokens=4), last, pre.n_tokens)
    bad = [LayerKV(kv.keys[:1], kv.values[:1], kv.positions) for kv in pre.layers]
    g = engine.submit(SamplingParams(max_tokens=4), last, pre.n_tokens, layers=bad)
    with pytest.raises(skv.SpectrumKVError):
        g.wait(60)
    assert engine.cache.free_pages == engine.total_pages
    assert engine.load()["pages_reserved"] == 0


def test_adaptive_reads_this_machines_profile_for_the_page_dtype(smol, tmp_path, monkeypatch):
    """With no profile given, the engine's adaptive route uses `bench calibrate`'s profile for
    its page dtype; one calibrated on another dtype is refused at start, by name."""
    monkeypatch.setattr("spectrumkv.paged.cost.PROFILE_DIR", tmp_path)
    dtype = pool_config(smol, 8, 16).dtype
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    mine = cost.MachineProfile(beta=3e9, min_split_tokens=1024, dtype=cost.dtype_name(dtype))
    mine.save(cost.default_profile_path(dtype))
    eng = BatchEngine(smol, EngineConfig(pool_mb=8))
    try:
        assert eng.runner.profile == mine
        assert eng.profile_source == str(cost.default_profile_path(dtype))
    finally:
        eng.close()
    wrong = cost.default_profile_path(other)
    dataclasses.replace(mine, dtype=cost.dtype_name(other)).save(wrong)
    with pytest.raises(PagedInputError, match=f"calibrated on {cost.dtype_name(other)}"):
        BatchEngine(smol, EngineConfig(pool_mb=8, attention_profile=str(wrong)))


def test_bfloat16_decode_model_accepts_fp32_payloads_and_stays_batch_invariant(smol, prompts):
    """`load(dtype="bfloat16")`: the same fingerprint as the float32 model (digested from the
    saved weight), packed linears bit-identical to F.linear (the few-row kernel's, where it runs,
    to its own product), and the fp32 prefill's payloads decode batched exactly as the bf16
    model decodes them one at a time."""
    from spectrumkv.engines.packed import DOT, DOT_ROWS, PackedLinear, available, dot_matmul
    from spectrumkv.errors import ConfigError

    with pytest.raises(ConfigError, match="compute dtype"):
        skv.load("smollm2-135m", dtype="float16")
    bf = skv.load("smollm2-135m", dtype="bfloat16")
    assert bf.fingerprint == smol.fingerprint
    assert next(bf.model.parameters()).dtype == torch.bfloat16
    up = bf.model.model.layers[3].mlp.up_proj
    if available():  # oneDNN bf16 on this CPU: the packed layer computes what F.linear does
        assert isinstance(up, PackedLinear)
        w = smol.model.model.layers[3].mlp.up_proj.weight.to(torch.bfloat16)
        for rows in (1, 16, 300):
            x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
            x = x.to(torch.bfloat16)
            kernel = DOT and rows <= DOT_ROWS
            ref = torch.nn.functional.linear(x, w)
            assert torch.equal(up(x), dot_matmul(x, up.dot) if kernel else ref)
            exact = x.double() @ w.double().T  # the kernel: within bf16 rounding, as oneDNN
            assert (up(x).double() - exact).abs().max() <= 1.5 * (ref.double() - exact).abs().max()
    eng = BatchEngine(bf, EngineConfig(pool_mb=24))
    try:
        greedy = SamplingParams(max_tokens=N)
        gens = [
            eng.submit(greedy, last, pre.n_tokens, layers=pre.layers) for _, last, pre in prompts
        ]
        outs = [g.wait(120).token_ids for g in gens]
        assert eng.stats.batch_sum / eng.stats.steps > 2
    finally:
        eng.close()
    for (_, last, pre), out in zip(prompts, outs, strict=True):
        assert out == skv.generate(bf, skv.reference_state(bf, pre), last, N)


def test_bfloat16_kv_pages_carry_the_models_own_bits_and_refuse_float16_payloads(smol, prompts):
    """`load(kv_dtype="bfloat16", dtype="bfloat16")` (`serve --kv-dtype bfloat16`): the payload
    and the pages are bf16; a budget-1.0 payload decodes batched exactly as the same model
    decodes it alone; a float16-KV payload is refused, naming the field."""
    from spectrumkv.errors import IncompatiblePayloadError

    bf = skv.load("smollm2-135m", "bfloat16", dtype="bfloat16")
    assert bf.fingerprint.kv_dtype == "bfloat16" and bf.kv_dtype == torch.bfloat16
    full = skv.PolicyConfig("spectrum", budget=1.0)
    fp16_payload = skv.encode(*_planned(smol, prompts[0][2], full))
    with pytest.raises(IncompatiblePayloadError, match="kv_dtype"):
        decode_payload(fp16_payload, expect=bf.fingerprint)
    eng = BatchEngine(bf, EngineConfig(pool_mb=24))
    try:
        assert eng.cache.config.dtype == torch.bfloat16
        runs = []
        for context, last, _ in prompts[:3]:
            pre = skv.prefill(bf, context)
            layers = decode_payload(skv.encode(*_planned(bf, pre, full)), expect=bf.fingerprint)
            assert layers.layers[0].keys.dtype == torch.bfloat16
            assert torch.equal(layers.layers[5].keys, pre.layers[5].keys)  # bit for bit
            runs.append((last, pre, layers.layers))
        gens = [eng.submit(SamplingParams(max_tokens=N), last, pre.n_tokens, layers=layers)
                for last, pre, layers in runs]  # fmt: skip
        outs = [g.wait(120).token_ids for g in gens]
        assert eng.stats.batch_sum / eng.stats.steps > 1.5
    finally:
        eng.close()
    for (last, pre, _), out in zip(runs, outs, strict=True):
        assert out == skv.generate(bf, skv.reference_state(bf, pre), last, N)


def _planned(engine, pre, policy):
    header, plan = skv.plan_transfer(engine, pre, policy)
    return header, pre, plan


def test_engine_sampler_draws_the_nucleus_distribution():
    """pd.sampling.next_token (both engines' sampler): the temperature / top-p distribution
    (exact probabilities, 2,000 seeded draws each), reproducible per seed, the nucleus found
    also when the top-k search has to grow to the whole vocabulary."""
    from spectrumkv.pd.sampling import next_token as sample

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core box: ~8 ms per small op here
    try:
        _check_sampler(sample)
    finally:
        torch.set_num_threads(threads)


def _check_sampler(sample):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for temp, top_p in ((1.0, 1.0), (1.0, 0.8), (0.7, 0.95), (1.0, 0.01)):
        probs = torch.softmax(logits.double() / temp, 0)
        kept = probs.cumsum(0) - probs < top_p  # sorted already: the nucleus is a prefix
        want = torch.where(kept, probs, 0) / probs[kept].sum()
        p = SamplingParams(1, temperature=temp, top_p=top_p)
        gen = torch.Generator().manual_seed(0)
        draws = [sample(logits, p, gen) for _ in range(2000)]
        got = torch.bincount(torch.tensor(draws), minlength=5).double() / len(draws)
        assert torch.allclose(got, want, atol=0.035), (temp, top_p, got, want)
        gen = torch.Generator().manual_seed(0)
        assert draws[:50] == [sample(logits, p, gen) for _ in range(50)]
    flat = torch.zeros(5000)  # top_p 0.99 of a flat vocabulary needs ~4,950 tokens
    flat[7] = 0.5
    gen, p = torch.Generator().manual_seed(0), SamplingParams(1, temperature=1.0, top_p=0.99)
    tokens = {sample(flat, p, gen) for _ in range(300)}
    assert len(tokens) > 250 and max(tokens) > 4000
