"""SCD on a model with two layer types (a tiny Gemma-3: sliding-window layers with one RoPE base,
full-attention layers with another, a per-head key norm): each layer's RoPE removed and
re-applied with its own settings, patch-layer projections equal to the model's own, full-rank
same-model reconstruction and DroidSpeak's recomputed span equal to the model's own cache, and
patch layers (sliding ones included) and quantized codes rebuilt over the tokens each layer
caches."""

import pytest
import torch
from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from spectrumkv.assets import load_text, model_dir
from spectrumkv.engines.hf import load, prefill
from spectrumkv.errors import BudgetError, ConfigError
from spectrumkv.paged.errors import PagedInputError
from spectrumkv.pd.sampling import SamplingParams
from spectrumkv.policy import raw_kv_bytes
from spectrumkv.scd import budget as scd_budget
from spectrumkv.scd import droidspeak, rope
from spectrumkv.scd import wire as scd_wire
from spectrumkv.scd.calibrate import CalibConfig, calibrate
from spectrumkv.scd.capture import capture, derotate, project_kv, unflat
from spectrumkv.scd.codes import encode, quantize_codes, reconstruct_layer
from spectrumkv.scd.wire import Layout
from spectrumkv.serve.engine import BatchEngine, EngineConfig
from spectrumkv.tiers import Tier

WINDOW = 24
TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _gemma(path, window: int = WINDOW):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir("smollm2-135m"))
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, layer_types=TYPES,
        sliding_window=window, max_position_embeddings=512, query_pre_attn_scalar=16,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # key norms away from their identity init, so that they count
        for layer in model.model.layers:
            layer.self_attn.k_norm.weight.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return load(str(path))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return _gemma(tmp_path_factory.mktemp("gemma"))


def test_rope_and_projection_per_layer_type(gemma):
    assert gemma.fingerprint.sliding_layers == (0, 2)
    ids = torch.arange(5, 65)
    cap = capture(gemma, ids, input_layers=range(3))
    pos = torch.arange(60)
    (c0, _), (c1, _) = rope.rotary(gemma.model, 0, pos), rope.rotary(gemma.model, 1, pos)
    assert not torch.allclose(c0, c1)  # two bases
    for i, kv in enumerate(cap.pre.layers):
        first = 60 - (WINDOW - 1) if i in (0, 2) else 0
        assert kv.positions.tolist() == list(range(first, 60))
        keys, values = project_kv(gemma.model.model.layers[i].self_attn, cap.inputs[i][first:])
        c, s = rope.rotary(gemma.model, i, kv.positions)
        got = rope.apply(unflat(keys, 2), c, s)
        assert torch.allclose(got.half().float(), kv.keys.float(), atol=3e-3), i
        assert torch.allclose(unflat(values, 2).half().float(), kv.values.float(), atol=3e-3)
        assert torch.allclose(derotate(gemma, i, kv), keys, atol=3e-2), i


def test_full_rank_same_model_and_droidspeak_span(gemma, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(load_text("wiki")[:60_000], encoding="utf-8")
    cfg = CalibConfig(corpus=str(corpus), code_budget=1.0, prompts=2, prompt_tokens=96,
                      max_patches=0, dev_chunks=1, dev_context=112,
                      dev_continuation=16)  # fmt: skip
    art = calibrate(gemma, gemma, cfg)
    ids = torch.arange(100, 160)
    pre = prefill(gemma, ids)
    for code in encode(art, gemma, ids):
        got, ref = reconstruct_layer(art, gemma, code), pre.layers[code.layer]
        assert torch.equal(got.positions, ref.positions)
        for x, y in ((got.keys, ref.keys), (got.values, ref.values)):
            err = float(((x.float() - y.float()) ** 2).sum() / (y.float() ** 2).sum())
            assert err < 1e-4, (code.layer, err)
    # DroidSpeak: layers 1..2 recomputed from the model's own residual stream entering layer 1
    store: dict = {}
    hook = droidspeak.residual_hook(gemma, 1, store)
    try:
        prefill(gemma, ids)
    finally:
        hook.remove()
    span, _ = droidspeak.recompute_span(gemma, store["hidden"], 1, 3)
    for got, ref in zip(span, pre.layers[1:], strict=True):
        assert torch.equal(got.positions, ref.positions)
        assert torch.allclose(got.keys.float(), ref.keys.float(), atol=1e-3)
        assert torch.allclose(got.values.float(), ref.values.float(), atol=1e-3)


def test_tail_refresh_across_the_window(gemma):
    """A tail longer than the sliding window: the sliding layers' queries need the window ending
    at each tail token, which a prefill of the coded tokens holds; the refreshed cache is the
    model's own, sliding layers holding their last window."""
    from spectrumkv.scd.refresh import refresh

    ids = torch.arange(300, 380)
    own = prefill(gemma, ids).layers
    got = refresh(gemma, prefill(gemma, ids[:50]).layers, 50, ids, head=4)
    for i, (x, y) in enumerate(zip(got, own, strict=True)):
        assert torch.equal(x.positions[-(WINDOW - 1) :], y.positions[-(WINDOW - 1) :]), i
        n = min(x.positions.numel(), y.positions.numel())
        assert torch.allclose(x.keys[:, -n:].float(), y.keys[:, -n:].float(), atol=2e-3), i
        assert torch.allclose(x.values[:, -n:].float(), y.values[:, -n:].float(), atol=2e-3), i


def test_patch_layers_cover_the_tokens_each_layer_caches(gemma, tmp_path):
    """Codes of the rows each layer caches, on the wire (a sliding layer's frame holds its
    window's rows) and staged into the batch engine's pages: the same tokens as the rebuilt
    layers submitted whole."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(load_text("wiki")[:60_000], encoding="utf-8")
    cfg = CalibConfig(corpus=str(corpus), code_budget=0.5, prompts=2, prompt_tokens=96,
                      patch_rank=48, max_patches=3, patch_min_gain=0.0, eps=0.0,
                      aligner_width=16, aligner_steps=5, dev_chunks=1, dev_context=112,
                      dev_continuation=16)  # fmt: skip
    # every layer, sliding ones included, is rebuilt as a patch layer on the dev chunk here
    art = calibrate(gemma, gemma, cfg)
    assert {0, 2} & set(art.manifest.patch_layers)  # sliding patch layers (reuse at half rank)
    ids = torch.arange(100, 160)
    pre = prefill(gemma, ids)
    raw = encode(art, gemma, ids)
    # codes quantized by a per-token tier mask of the whole prompt (60 tokens)
    int8 = torch.arange(60) % 3 == 0
    tiers = torch.where(int8, int(Tier.INT8), int(Tier.INT4)).to(torch.uint8)
    codes = quantize_codes(raw, tiers)
    layout = Layout.of(art)
    header = scd_wire.ScdHeader(gemma.fingerprint, gemma.fingerprint, layout.artifact, 60)
    payload = scd_wire.header_bytes(header)
    payload += b"".join(scd_wire.frame_bytes(c, tiers, header, layout) for c in raw)
    _, got_codes = scd_wire.decode(payload, layout)
    # a code budget bounds the whole payload, with B's raw bytes counting the rows each layer
    # caches: all 60 in layer 1, the window's 23 in layers 0 and 2
    raw_bytes = raw_kv_bytes(layout.consumer, 60)
    assert raw_bytes == (60 + 2 * 23) * 2 * 2 * 16 * 2
    head = len(scd_wire.header_bytes(header))
    with pytest.raises(BudgetError, match="all-INT4 with 55 of 60 tokens dropped"):
        scd_budget.code_plan(layout, 60, 0.02, head)

    def size(t):
        return len(scd_wire.header_bytes(header)) + sum(
            len(scd_wire.frame_bytes(c, t, header, layout)) for c in raw
        )

    def worst(p):  # INT8 on the last tokens (inside every window), drops on the first ones
        t = torch.full((60,), int(Tier.INT4), dtype=torch.uint8)  # after the sinks (outside)
        t[:4] = int(Tier.FP16)
        t[60 - p.int8 :] = int(Tier.INT8)
        t[4 : 4 + p.dropped] = int(Tier.DROP)
        return t

    plans = []
    for budget in (0.1, 0.3, 0.4, 0.5, 0.7):
        plan = scd_budget.code_plan(layout, 60, budget, head)
        plans.append(plan)
        t = scd_budget.code_tiers(60, torch.rand(60), plan)
        assert int((t == int(Tier.DROP)).sum()) == plan.dropped
        assert int((t == int(Tier.INT8)).sum()) == plan.int8
        assert (t[:4] == int(Tier.FP16)).all() and t[-1] != int(Tier.DROP)
        assert size(t) <= size(worst(plan)) <= budget * raw_bytes, (budget, plan)
        # the bound is tight: one more INT8 token, or one fewer dropped, can exceed the budget
        closer = plan._replace(dropped=plan.dropped - 1) if plan.dropped else plan
        closer = closer._replace(int8=plan.int8 + 1) if not plan.dropped else closer
        if closer.int8 <= 56:
            assert size(worst(closer)) > budget * raw_bytes, (budget, plan)
    assert any(0 < p.int8 < 60 for p in plans) and any(p.dropped for p in plans), plans
    assert all(p.int8 in (0, 6) for p in plans if p.dropped), plans  # the INT8 floor: 60 / 10
    # placed once the scores are known: as few drops as fit this placement, counted exactly
    fewer = 0
    for budget, plan in zip((0.1, 0.3, 0.4, 0.5, 0.7), plans, strict=True):
        scores = torch.rand(60, generator=torch.Generator().manual_seed(7))
        t = scd_budget.placed_tiers(layout, 60, budget, head, scores, plan)
        assert scd_budget.payload_size(layout, t, head) == size(t) <= budget * raw_bytes
        dropped = int((t == int(Tier.DROP)).sum())
        assert dropped <= plan.dropped and int((t == int(Tier.INT8)).sum()) == plan.int8
        if dropped:  # minimal: one drop fewer (the most important of them sent) exceeds it
            back = scd_budget.code_tiers(60, scores, plan._replace(dropped=dropped - 1))
            assert size(back) > budget * raw_bytes, (budget, plan, dropped)
        fewer += dropped < plan.dropped
    assert fewer, "no placement dropped fewer tokens than the worst-case plan"
    layers = []
    for code, got in zip(codes, got_codes, strict=True):
        n = pre.layers[code.layer].positions.numel()
        assert n == (WINDOW - 1 if code.layer in (0, 2) else 60)
        if code.layer in art.manifest.patch_layers:
            assert code.h is not None and code.h.shape == (n, 48)
        assert torch.equal(got.positions, code.positions)
        for name in ("k", "v", "h"):
            if getattr(code, name) is not None:
                assert torch.allclose(getattr(got, name), getattr(code, name), atol=1e-3)
        kv = reconstruct_layer(art, gemma, got)
        assert kv.keys.shape == pre.layers[code.layer].keys.shape
        assert torch.equal(kv.positions, pre.layers[code.layer].positions)
        layers.append(kv)
    eng = BatchEngine(gemma, EngineConfig(pool_mb=8))
    p = SamplingParams(max_tokens=6)
    try:
        staged = eng.stage(p, 60)  # first, so that no earlier request's rows are in its pages
        assert staged.wait_admitted(30)
        with pytest.raises(PagedInputError, match="staged layer 1"):
            staged.write(1, layers[0])  # a window's rows for a full-attention layer
        for i, kv in enumerate(layers):
            staged.write(i, kv)
        back = staged.layers()
        for a, b in zip(back, layers, strict=True):  # a sliding layer's rows in its last slots
            assert torch.equal(a.positions, b.positions)
            assert torch.equal(a.keys, b.keys.to(a.keys.dtype))
            assert torch.equal(a.values, b.values.to(a.values.dtype))
        got = eng.submit(p, 7, 60, staged=staged).wait(120).token_ids
        assert got == eng.submit(p, 7, 60, layers=layers).wait(120).token_ids
    finally:
        eng.close()
    assert eng.cache.free_pages == eng.total_pages and not eng.runner._prompt


def test_a_pair_with_another_window_is_refused(gemma, tmp_path):
    other = _gemma(tmp_path / "wide", window=WINDOW + 8)
    cfg = CalibConfig(corpus="wiki", prompts=1, prompt_tokens=96, dev_chunks=1)
    with pytest.raises(ConfigError, match="sliding-window layout"):
        calibrate(gemma, other, cfg)
