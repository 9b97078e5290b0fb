"""`spectrumkv bench scoring`: importance scoring and tier planning time beside prefill time.

Real model, real text, long prompts: prefill captures each layer's KV and the window queries,
then the observation-window attention scorer and the planner run on them exactly as the prefill
worker runs them. `score_fraction` = (score_s + plan_s) / prefill_s.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from ..assets import corpus_ids
from ..config import PolicyConfig, ScoreConfig
from ..engines.hf import load, prefill
from ..importance import score_tokens
from ..pipeline import make_header
from ..policy import plan


@dataclass
class ScoringRecord:
    model: str
    prompt_tokens: int
    prefill_s: float
    score_s: float
    plan_s: float
    score_fraction: float


def run_scoring(
    model: str, lengths: list[int], corpus: str, policy: PolicyConfig
) -> list[ScoringRecord]:
    engine = load(model)
    ids = torch.tensor(corpus_ids(engine.tokenizer, corpus, max(lengths)))
    records = []
    for n in lengths:
        pre = prefill(engine, ids[:n])
        t0 = time.perf_counter()
        scores, per_layer = score_tokens(ScoreConfig(), n, pre.layers, pre.window)
        t1 = time.perf_counter()
        plan(scores, make_header(engine, n, policy), policy, per_layer)
        t2 = time.perf_counter()
        r = ScoringRecord(
            model, n, pre.prefill_s, t1 - t0, t2 - t1, (t2 - t0) / max(pre.prefill_s, 1e-9)
        )
        print(
            f"{n:>7} tokens: prefill {r.prefill_s:8.2f} s, scoring {r.score_s:6.3f} s, "
            f"planning {r.plan_s:6.3f} s ({r.score_fraction:.2%} of prefill)",
            flush=True,
        )
        records.append(r)
        del pre
    return records


def write_json(records: list[ScoringRecord], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=1)
