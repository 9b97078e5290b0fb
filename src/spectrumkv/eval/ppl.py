"""Perplexity under the PD protocol.

Each chunk of `context` tokens is split into a prefix and a continuation of `continuation` tokens.
The prefill side prefills prefix[:-1], plans, encodes to bytes; the decode side decodes those bytes,
feeds prefix[-1] + continuation[:-1] and is scored on the continuation. The reference is the same
protocol with the uncompressed cache, so Delta-PPL isolates what the transfer changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import PolicyConfig, ScoreConfig
from ..engines.hf import DecodeState, Engine, prefill, step
from ..errors import BudgetError
from ..pipeline import encode, plan_transfer, receive, reference_state


@dataclass
class PplRecord:
    model: str
    corpus: str
    protocol: str
    policy: str
    budget: float | None
    wire_budget: float
    nominal_budget: float
    ppl: float
    ppl_fp16: float
    delta_pct: float
    context: int
    continuation: int
    chunks: int


def corpus_chunks(engine: Engine, text: str, context: int, n_chunks: int) -> list[torch.Tensor]:
    """The first `n_chunks` non-overlapping chunks of `context` tokens of the text."""
    need_chars = context * n_chunks * 8  # generous: English averages ~4 characters per token
    ids = engine.tokenizer(text[:need_chars], return_tensors="pt")["input_ids"][0]
    if ids.numel() < context * n_chunks:
        raise ValueError(f"corpus has {ids.numel()} tokens, need {context * n_chunks}")
    return [ids[i * context : (i + 1) * context] for i in range(n_chunks)]


def continuation_nll(engine: Engine, state: DecodeState, feed: torch.Tensor) -> tuple[float, int]:
    """Sum of negative log-likelihoods of feed[1:] given the state and feed[:-1]."""
    logits = step(engine, state, feed[:-1])
    return float(F.cross_entropy(logits, feed[1:], reduction="sum")), int(feed.numel() - 1)


def run_ppl(
    engine: Engine,
    corpus: str,
    text: str,
    runs: list[tuple[str, float | None]],
    context: int = 1024,
    continuation: int = 128,
    n_chunks: int = 4,
    scoring: ScoreConfig | None = None,
) -> list[PplRecord]:
    """Delta-PPL of each (policy, budget) against the uncompressed PD protocol.

    A (policy, budget) that cannot meet its budget on some chunk is reported and skipped."""
    if not 2 <= continuation < context:
        raise ValueError("need 2 <= continuation < context")
    prefixes = []
    for chunk in corpus_chunks(engine, text, context, n_chunks):
        split = context - continuation
        pre = prefill(engine, chunk[: split - 1])
        prefixes.append((pre, chunk[split - 1 :]))

    ref_nll = ref_n = 0
    for pre, feed in prefixes:
        nll, n = continuation_nll(engine, reference_state(engine, pre), feed)
        ref_nll, ref_n = ref_nll + nll, ref_n + n
    ppl_fp16 = math.exp(ref_nll / ref_n)

    records = []
    for policy_name, budget in runs:
        policy = PolicyConfig(policy_name, budget=budget)
        total = count = wire = fp16 = nominal = 0.0
        try:
            for pre, feed in prefixes:
                header, plan = plan_transfer(engine, pre, policy, scoring)
                state = receive(engine, encode(header, pre, plan))
                nll, n = continuation_nll(engine, state, feed)
                total, count = total + nll, count + n
                wire, fp16 = wire + plan.wire_bytes, fp16 + plan.fp16_bytes
                nominal += plan.nominal_budget / len(prefixes)
        except BudgetError as e:
            print(f"skip {policy_name} at budget {budget}: {e}")
            continue
        ppl = math.exp(total / count)
        records.append(
            PplRecord(
                model=engine.name,
                corpus=corpus,
                protocol="pd",
                policy=policy_name,
                budget=budget,
                wire_budget=wire / fp16,
                nominal_budget=nominal,
                ppl=ppl,
                ppl_fp16=ppl_fp16,
                delta_pct=100.0 * (ppl / ppl_fp16 - 1.0),
                context=context,
                continuation=continuation,
                chunks=n_chunks,
            )
        )
    return records
