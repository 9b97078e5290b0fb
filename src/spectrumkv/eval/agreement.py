"""`spectrumkv eval agreement`: how a cheap importance proxy ranks prompt tokens against the HF
pipeline's observation-window attention scores, on real text.

The vLLM connector cannot see attention weights (vLLM's kernels never materialise them), so it
ranks tokens by key norm. This measures what that costs in ranking terms: Spearman's rank
correlation between the two scores, and the overlap of their top `keep` fraction (the tokens a
budget would keep at the higher tiers; a random ranking overlaps by `keep` on average). Sinks
and the observation window are left out: both scorers' policies pin them anyway.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from ..assets import corpus_ids
from ..config import ScoreConfig
from ..engines.hf import load, prefill
from ..importance import score_tokens

SINKS = 4


@dataclass
class AgreementRecord:
    model: str
    method: str
    prompt_tokens: int
    prompts: int
    spearman: float
    topk_overlap: float
    keep: float


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def topk_overlap(a: torch.Tensor, b: torch.Tensor, keep: float) -> float:
    k = max(1, round(keep * a.numel()))
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(top_a & top_b) / k


def run_agreement(
    model: str, corpus: str, lengths: list[int], prompts: int, methods: list[str], keep: float
) -> list[AgreementRecord]:
    engine = load(model)
    ids = torch.tensor(corpus_ids(engine.tokenizer, corpus, max(lengths) * prompts))
    records = []
    for n in lengths:
        sums = {m: [0.0, 0.0] for m in methods}
        for i in range(prompts):
            pre = prefill(engine, ids[i * n : (i + 1) * n])
            ref, _ = score_tokens(ScoreConfig(), n, pre.layers, pre.window)
            w = pre.window[0].queries.shape[1]
            inner = slice(SINKS, n - w)
            for m in methods:
                got, _ = score_tokens(ScoreConfig(method=m), n, pre.layers, pre.window)
                sums[m][0] += spearman(ref[inner], got[inner])
                sums[m][1] += topk_overlap(ref[inner], got[inner], keep)
        for m in methods:
            r = AgreementRecord(
                model, m, n, prompts, sums[m][0] / prompts, sums[m][1] / prompts, keep
            )
            print(
                f"{model} {m:>10} {n:>6} tokens x {prompts}: Spearman {r.spearman:+.3f}, "
                f"top-{keep:.0%} overlap {r.topk_overlap:.3f} (random: {keep:.3f})",
                flush=True,
            )
            records.append(r)
    return records


def write_json(records: list[AgreementRecord], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=1)
