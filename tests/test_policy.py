import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spectrumkv.config import FIXED_RATE, POLICIES, PolicyConfig, QuantConfig
from spectrumkv.errors import BudgetError, ConfigError
from spectrumkv.pipeline import iter_payload
from spectrumkv.policy import plan, reads_scores
from spectrumkv.tiers import NOMINAL_COST, Tier

from .synthetic import make_header, random_layers


def _quant_for(policy: str) -> QuantConfig:
    return QuantConfig(32, "kivi", rotate=False) if policy == "kivi2" else QuantConfig()


BUDGETED = [p for p in POLICIES if p not in FIXED_RATE]


def _plan_or_budget_error(scores, header, cfg):
    n_layers = header.fingerprint.n_layers
    layer_scores = torch.rand(n_layers, scores.numel(), generator=torch.Generator().manual_seed(1))
    try:
        return plan(scores, header, cfg, layer_scores)
    except BudgetError:
        return None


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(BUDGETED),
    n=st.integers(1, 300),
    budget=st.floats(0.05, 0.999),
    sliding=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_wire_budget_respected(policy, n, budget, sliding, seed):
    header = make_header(
        n, n_layers=3, sliding=(1,) if sliding else (), window=16 if sliding else 0
    )
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    p = _plan_or_budget_error(scores, header, PolicyConfig(policy, budget=budget, sinks=2))
    if p is None:
        return
    assert p.wire_bytes <= budget * p.fp16_bytes
    # the predicted size is the real size of the encoded payload
    pre = type("Pre", (), {"layers": random_layers(header)})
    assert sum(len(c) for c in iter_payload(header, pre, p)) == p.wire_bytes


@settings(max_examples=100, deadline=None)
@given(n=st.integers(8, 200), budget=st.floats(0.3, 0.999), seed=st.integers(0, 1000))
def test_spectrum_sinks_kept_and_tiers_monotone(n, budget, seed):
    header = make_header(n)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    p = _plan_or_budget_error(scores, header, PolicyConfig("spectrum", budget=budget, sinks=4))
    if p is None:
        return
    t = p.tiers[0]
    assert (t[:4] != Tier.DROP).all(), "sinks are never dropped"
    non_sink = torch.arange(4, n)
    order = non_sink[torch.sort(scores[4:], descending=True, stable=True).indices]
    ranked = t[order]
    assert (ranked[:-1] >= ranked[1:]).all(), "a more important token never gets a lower tier"
    assert t[:4].min() >= ranked.max(), "sinks rank above every other token"
    if n > 100 and budget >= 0.3:
        assert (t[:4] >= Tier.INT8).all(), "with room to spare, sinks are at least INT8"


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), budget=st.floats(0.05, 0.999))
def test_nominal_mode_matches_paper_accounting(n, budget):
    header = make_header(n)
    cfg = PolicyConfig("spectrum", budget=budget, budget_mode="nominal", sinks=0)
    p = _plan_or_budget_error(torch.rand(n), header, cfg)
    if p is None:
        return
    mean = sum(NOMINAL_COST[Tier(int(x))] for x in p.tiers[0]) / n
    assert mean <= budget + 1e-9
    assert p.nominal_budget == pytest.approx(mean)


def test_budget_one_is_the_fp16_reference():
    header = make_header(100)
    for policy in POLICIES:
        p = plan(
            torch.rand(100), header, PolicyConfig(policy, budget=1.0, quant=_quant_for(policy))
        )
        assert (p.tiers == Tier.FP16).all()
        assert 1.0 < p.wire_budget < 1.02  # the header and tier maps are the only overhead


def test_spectrum_half_budget_is_mostly_int8():
    header = make_header(400, heads=3, head_dim=64, quant=QuantConfig(group_size=64))
    p = plan(torch.rand(400), header, PolicyConfig("spectrum", budget=0.5))
    c = p.counts()
    assert c["DROP"] == 0 and c["INT8"] > 0.8 * 400 and c["INT4"] > 0
    assert 0.49 < p.wire_budget <= 0.5


def test_pdtrim_keeps_first_and_last_segments():
    header = make_header(100)
    p = plan(torch.rand(100), header, PolicyConfig("pdtrim", budget=0.4, pdtrim_fr=0.5))
    kept = (p.tiers[0] == Tier.FP16).nonzero().flatten()
    k = kept.numel()
    assert set((p.tiers[0]).tolist()) <= {Tier.FP16, Tier.DROP}
    assert kept.tolist() == list(range(k // 2)) + list(range(100 - (k - k // 2), 100))


def test_snapkv_drop_keeps_top_scores():
    header = make_header(50)
    scores = torch.arange(50, dtype=torch.float).flip(0)  # early tokens most important
    p = plan(scores, header, PolicyConfig("snapkv-drop", budget=0.3, sinks=0))
    kept = (p.tiers[0] == Tier.FP16).nonzero().flatten().tolist()
    assert kept == list(range(len(kept))) and 0 < len(kept) < 50


def test_fixed_rate_policies():
    header = make_header(64)
    p = plan(torch.rand(64), header, PolicyConfig("uniform-int4", budget=None))
    assert (p.tiers == Tier.INT4).all()
    with pytest.raises(BudgetError):
        plan(torch.rand(64), header, PolicyConfig("uniform-int8", budget=0.3))
    with pytest.raises(ConfigError):
        PolicyConfig("spectrum", budget=None)


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_budget_out_of_range(budget):
    with pytest.raises(BudgetError):
        PolicyConfig("spectrum", budget=budget)


def test_budget_too_small_for_overhead():
    header = make_header(4)
    with pytest.raises(BudgetError, match="headers"):
        plan(torch.rand(4), header, PolicyConfig("spectrum", budget=0.01))


def test_unknown_policy():
    with pytest.raises(ConfigError, match="unknown policy"):
        PolicyConfig("magic")


def test_spectrum_layer_allocates_per_layer_under_the_same_budget():
    n = 200
    header = make_header(n, n_layers=4, heads=2, head_dim=64, quant=QuantConfig(group_size=64))
    layer_scores = torch.rand(4, n, generator=torch.Generator().manual_seed(3))
    layer_scores[0] = torch.linspace(1, 0, n)  # layer 0 cares about early tokens
    layer_scores[1] = torch.linspace(0, 1, n)  # layer 1 about late ones
    cfg = PolicyConfig("spectrum-layer", budget=0.35)
    p = plan(layer_scores.mean(0), header, cfg, layer_scores)
    assert p.wire_bytes <= 0.35 * p.fp16_bytes
    assert not torch.equal(p.tiers[0], p.tiers[1])
    assert p.tiers[0, 5:50].float().mean() > p.tiers[1, 5:50].float().mean()
    with pytest.raises(ValueError, match="per-layer scores"):
        plan(layer_scores.mean(0), header, cfg)


def test_spectrum_opt_spends_bytes_where_importance_is():
    n = 300
    header = make_header(n, heads=2, head_dim=64, quant=QuantConfig(group_size=64))
    scores = torch.cat(
        [torch.full((100,), 1e-4), torch.full((100,), 0.01), torch.full((100,), 1.0)]
    )
    p = plan(scores, header, PolicyConfig("spectrum-opt", budget=0.2, sinks=4))
    t = p.tiers[0]
    assert p.wire_bytes <= 0.2 * p.fp16_bytes
    assert (t[:4] >= Tier.INT8).all()
    low, mid, high = t[4:100].float().mean(), t[100:200].float().mean(), t[200:].float().mean()
    assert low <= mid <= high and low < high
    assert set(t[4:].tolist()) - {Tier.DROP, Tier.INT2, Tier.INT4, Tier.INT8, Tier.FP16} == set()


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    n=st.integers(1, 200),
    budget=st.sampled_from([1.0, 0.9, 0.5, 0.3]),
    seed=st.integers(0, 1000),
)
def test_plans_that_do_not_read_scores_ignore_them(policy, n, budget, seed):
    """`reads_scores` False: any scores give the same tiers, so streaming may skip scoring."""
    if policy in FIXED_RATE and budget != 1.0:
        budget = None
    cfg = PolicyConfig(policy, budget=budget, sinks=2, quant=_quant_for(policy))
    if reads_scores(cfg):
        return
    header = make_header(n, n_layers=3)
    g = torch.Generator().manual_seed(seed)
    plans = [
        _plan_or_budget_error(s, header, cfg) for s in (torch.zeros(n), torch.rand(n, generator=g))
    ]
    if plans[0] is None:
        assert plans[1] is None
        return
    assert torch.equal(plans[0].tiers, plans[1].tiers)


def test_spectrum_reads_scores_below_budget_one():
    assert reads_scores(PolicyConfig("spectrum", budget=0.5))
    assert not reads_scores(PolicyConfig("spectrum", budget=1.0))
    assert not reads_scores(PolicyConfig("pdtrim", budget=0.5))
