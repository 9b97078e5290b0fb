"""Perplexity under the PD protocol.

Each chunk of `context` tokens is split into a prefix and a continuation of `continuation` tokens.
The prefill side prefills prefix[:-1], plans, encodes to bytes; the decode side decodes those bytes,
feeds prefix[-1] + continuation[:-1] and is scored on the continuation. The reference is the same
protocol with the uncompressed cache, so Delta-PPL isolates what the transfer changed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engines.hf import DecodeState, Engine, prefill, step
from ..errors import BudgetError
from ..pipeline import encode, plan_transfer, receive, reference_state
from .runs import RunSpec, load_records, save_records


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


def _key(r: dict) -> tuple:
    return (
        r["model"],
        r["corpus"],
        r["policy"],
        r["budget"],
        r["context"],
        r["continuation"],
        r["chunks"],
    )


def run_ppl(
    engine: Engine,
    corpus: str,
    text: str,
    runs: list[RunSpec],
    context: int = 1024,
    continuation: int = 128,
    n_chunks: int = 4,
    json_path: str | None = None,
) -> list[PplRecord]:
    """Delta-PPL of each run against the uncompressed PD protocol.

    Records already in `json_path` are kept and their runs skipped (resume); the file is
    rewritten after every run. A run that cannot meet its budget is reported and skipped."""
    if not 2 <= continuation < context:
        raise ValueError("need 2 <= continuation < context")
    existing = load_records(json_path)
    done = {_key(r) for r in existing}
    meta = dict(
        model=engine.name,
        corpus=corpus,
        context=context,
        continuation=continuation,
        chunks=n_chunks,
    )
    todo = [r for r in runs if _key({**meta, "policy": r.label, "budget": r.budget}) not in done]
    if not todo:
        return []
    prefixes = []
    split = context - continuation
    for chunk in tqdm(corpus_chunks(engine, text, context, n_chunks), desc="prefill", leave=False):
        prefixes.append((prefill(engine, chunk[: split - 1]), chunk[split - 1 :]))

    ref_nll = ref_n = 0
    for pre, feed in prefixes:
        nll, n = continuation_nll(engine, reference_state(engine, pre), feed)
        ref_nll, ref_n = ref_nll + nll, ref_n + n
    ppl_fp16 = math.exp(ref_nll / ref_n)

    records = []
    for run in tqdm(todo, desc=f"ppl {engine.name}"):
        policy, scoring = run.configs()
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
            tqdm.write(f"skip {run.label} at budget {run.budget}: {e}")
            continue
        ppl = math.exp(total / count)
        rec = PplRecord(
            protocol="pd",
            policy=run.label,
            budget=run.budget,
            wire_budget=wire / fp16,
            nominal_budget=nominal,
            ppl=ppl,
            ppl_fp16=ppl_fp16,
            delta_pct=100.0 * (ppl / ppl_fp16 - 1.0),
            **meta,
        )
        records.append(rec)
        existing.append(asdict(rec))
        save_records(json_path, existing)
    return records
