"""Rank agreement between importance scorers (eval/agreement.py)."""

import pytest
import torch

from spectrumkv.eval.agreement import run_agreement, spearman, topk_overlap


def test_rank_measures_on_known_orders():
    x = torch.arange(100.0)
    assert spearman(x, x * 3 + 1) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert topk_overlap(x, x, 0.3) == 1.0
    assert topk_overlap(x, -x, 0.3) == 0.0


@pytest.mark.model
def test_attention_agrees_with_itself_and_proxies_are_measured_on_real_text():
    records = run_agreement("smollm2-135m", "wiki", [256], 1, ["attention", "keynorm"], 0.3)
    by = {r.method: r for r in records}
    assert by["attention"].spearman == pytest.approx(1.0)
    assert by["attention"].topk_overlap == 1.0
    assert -1.0 <= by["keynorm"].spearman < 1.0 and 0.0 <= by["keynorm"].topk_overlap < 1.0
