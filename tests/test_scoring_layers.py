"""Which layers an early plan scores from (`ScoreConfig.layers`), and when a streaming prefill
worker makes that plan: sliding-window layers that do not hold the whole prompt are skipped."""

import pytest
import torch

from spectrumkv.config import PolicyConfig, ScoreConfig
from spectrumkv.engines.hf import Engine
from spectrumkv.importance import WindowQueries, score_tokens, scoring_layers
from spectrumkv.kv import LayerKV, first_slot
from spectrumkv.pd.streaming import StreamingEncoder
from spectrumkv.tiers import Tier
from spectrumkv.wire import Fingerprint

N, WINDOW, SLIDING = 96, 16, (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)  # Gemma-3's 5:1 pattern, 12 layers
FP = Fingerprint("gemma3", 12, 1, 16, "float16", "default", WINDOW, SLIDING, "0" * 16)


def _layers(seed: int = 0) -> tuple[list[LayerKV], list[WindowQueries]]:
    g = torch.Generator().manual_seed(seed)
    layers, window = [], []
    for i in range(FP.n_layers):
        first = first_slot(FP.is_sliding(i), WINDOW, N)
        k = torch.randn(1, N - first, 16, generator=g)
        layers.append(LayerKV(k, torch.randn_like(k), torch.arange(first, N)))
        q = torch.randn(2, 8, 16, generator=g)
        window.append(WindowQueries(q, 0.25, WINDOW if FP.is_sliding(i) else 0))
    return layers, window


def test_scoring_layers_are_the_first_that_hold_the_whole_prompt():
    whole = [i not in SLIDING for i in range(12)]  # layers 5 and 11
    assert scoring_layers(whole, 1) == [5]
    assert scoring_layers(whole, 4) == [5, 11]  # fewer than asked: every such layer
    assert scoring_layers(whole, 0) == list(range(12))
    assert scoring_layers([False] * 3, 2) == [0, 1, 2]  # none does: every layer
    assert scoring_layers([True] * 6, 4) == [0, 1, 2, 3]  # short prompt: sliding layers count


def test_an_early_plan_ranks_old_tokens_by_attention_not_by_position():
    """Before, `layers=4` scored Gemma-3's first four (sliding) layers: every token older than
    the window scored exactly 0, and the policy's stable sort kept the earliest ones."""
    layers, window = _layers()
    early, _ = score_tokens(ScoreConfig(layers=4), N, layers, window)
    full, _ = score_tokens(ScoreConfig(), N, layers, window)
    old = early[: N - WINDOW]
    assert (old > 0).all() and old.unique().numel() > 10
    assert torch.equal(early, full)  # both average layers 5 and 11


def test_streaming_plans_once_the_scoring_layers_are_done():
    engine = Engine("synthetic", None, None, FP)
    layers, window = _layers()
    ids = torch.arange(N)
    for k, plan_after in ((1, 5), (4, 11), (0, 11)):
        chunks: list[str] = []
        enc = StreamingEncoder(
            engine, ids, PolicyConfig("spectrum", budget=0.5), ScoreConfig(layers=k),
            lambda kind, _b, out=chunks: out.append(kind),
        )  # fmt: skip
        for i in range(FP.n_layers):
            enc.on_layer(i, layers[i], window[i])
            assert (enc.plan is not None) == (i >= plan_after), (k, i)
        assert chunks == ["header"] + ["frame"] * FP.n_layers


def test_budget_one_streams_from_layer_zero_without_scoring(monkeypatch):
    """Budget 1.0 keeps every token at FP16 whatever the scores: no scoring, frames from layer 0."""
    import spectrumkv.pipeline as pipeline

    monkeypatch.setattr(pipeline, "score_tokens", lambda *a: pytest.fail("scored"))
    layers, window = _layers()
    chunks: list[str] = []
    enc = StreamingEncoder(
        Engine("synthetic", None, None, FP), torch.arange(N), PolicyConfig("spectrum", budget=1.0),
        ScoreConfig(), lambda kind, _b: chunks.append(kind),
    )  # fmt: skip
    enc.on_layer(0, layers[0], window[0])
    assert chunks == ["header", "frame"] and enc.plan.wire_budget > 1.0
    assert (enc.plan.tiers[enc.plan.present] == int(Tier.FP16)).all()


@pytest.mark.parametrize("k", [1, 4])
def test_short_prompts_plan_from_the_first_layers(k):
    """A prompt inside the sliding window: every layer holds it, so the first k layers plan."""
    engine = Engine("synthetic", None, None, FP)
    short = WINDOW - 1
    g = torch.Generator().manual_seed(1)
    enc = StreamingEncoder(
        engine, torch.arange(short), PolicyConfig("spectrum", budget=0.5), ScoreConfig(layers=k),
        lambda *_: None,
    )  # fmt: skip
    for i in range(k):
        kv = torch.randn(1, short, 16, generator=g)
        q = torch.randn(2, 8, 16, generator=g)
        enc.on_layer(i, LayerKV(kv, kv, torch.arange(short)), WindowQueries(q, 0.25, WINDOW))
    assert enc.plan is not None


def test_eval_run_specs_take_the_scoring_layers():
    """`spectrum@layers=4` measures the served default (before: an unknown run option)."""
    from spectrumkv.eval.runs import RunSpec

    assert RunSpec("spectrum@layers=4", 0.3).configs()[1].layers == 4
