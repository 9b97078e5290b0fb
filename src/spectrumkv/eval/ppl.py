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

from ..engines.hf import DecodeState, Engine, forward_with_kv_transform, prefill, step
from ..errors import BudgetError, ConfigError
from ..kv import LayerKV
from ..pipeline import encode, plan_transfer, receive, reference_state
from ..policy import Plan, layer_firsts
from ..tiers import Tier
from ..wire import Header, frame_bytes, read_frame
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
    """The first `n_chunks` non-overlapping chunks of `context` tokens of the text; ConfigError
    when the text is shorter."""
    need_chars = context * n_chunks * 8  # generous: English averages ~4 characters per token
    ids = engine.tokenizer(text[:need_chars], return_tensors="pt")["input_ids"][0]
    if ids.numel() < context * n_chunks:
        raise ConfigError(
            f"corpus has {ids.numel()} tokens of {engine.name}'s tokenizer, need "
            f"{context * n_chunks} ({n_chunks} chunks of {context})"
        )
    return [ids[i * context : (i + 1) * context] for i in range(n_chunks)]


def continuation_nll(engine: Engine, state: DecodeState, feed: torch.Tensor) -> tuple[float, int]:
    """Sum of negative log-likelihoods of feed[1:] given the state and feed[:-1]."""
    logits = step(engine, state, feed[:-1])
    return float(F.cross_entropy(logits, feed[1:], reduction="sum")), int(feed.numel() - 1)


def paper_nll(
    engine: Engine, chunk: torch.Tensor, split: int, header: Header, plan: Plan
) -> tuple[float, int]:
    """The paper's protocol: one forward over the whole chunk, the first `split - 1` tokens' K/V
    replaced by their encoded-then-decoded values (the same codec and bytes as on the wire) and
    dropped tokens hidden from every query; scored on the continuation like the PD protocol."""
    n = header.n_tokens
    firsts = layer_firsts(header)
    kv_dtype = engine.kv_dtype

    def transform(layer: int, k: torch.Tensor, v: torch.Tensor):
        k, v = k.to(kv_dtype), v.to(kv_dtype)
        first = firsts[layer]
        src = LayerKV(k[:, first:n], v[:, first:n], torch.arange(first, n))
        frame = frame_bytes(layer, first, plan.tiers[layer, first:], src, header)
        got, _, _ = read_frame(frame, 0, header, layer)
        k, v = k.float(), v.float()
        k[:, got.positions], v[:, got.positions] = got.keys.float(), got.values.float()
        return k, v

    hidden = torch.zeros(chunk.numel(), dtype=torch.bool)
    hidden[:n] = plan.tiers[-1] == int(Tier.DROP)
    logits = forward_with_kv_transform(engine, chunk, transform, hidden)
    return _scored(logits, chunk, split)


def _scored(logits: torch.Tensor, chunk: torch.Tensor, split: int) -> tuple[float, int]:
    """NLL of chunk[split:] from full-chunk logits."""
    target = chunk[split:]
    return float(F.cross_entropy(logits[split - 1 : -1], target, reduction="sum")), target.numel()


def _key(r: dict) -> tuple:
    return (
        r["model"],
        r["corpus"],
        r.get("protocol", "pd"),
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
    protocol: str = "pd",
) -> list[PplRecord]:
    """Delta-PPL of each run against the same protocol without compression.

    protocol "pd": prefill the prefix, transfer, score the continuation on the decode side;
    "paper": one forward with the prefix's K/V passed through the codec (see `paper_nll`).

    Records already in `json_path` are kept and their runs skipped (resume); the file is
    rewritten after every run. A run that cannot meet its budget is reported and skipped."""
    if not 2 <= continuation < context:
        raise ValueError("need 2 <= continuation < context")
    existing = load_records(json_path)
    done = {_key(r) for r in existing}
    if protocol not in ("pd", "paper"):
        raise ValueError(f"protocol must be pd or paper, got {protocol!r}")
    meta = dict(
        model=engine.name,
        corpus=corpus,
        protocol=protocol,
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
        prefixes.append((prefill(engine, chunk[: split - 1]), chunk))

    def nll_of(pre, chunk, header=None, plan=None) -> tuple[float, int]:
        if protocol == "paper":
            if plan is None:  # reference: the same single forward, K/V rounded to the KV dtype
                dt = engine.kv_dtype
                logits = forward_with_kv_transform(
                    engine,
                    chunk,
                    lambda i, k, v: (k.to(dt).float(), v.to(dt).float()),
                    torch.zeros(chunk.numel(), dtype=torch.bool),
                )
                return _scored(logits, chunk, split)
            return paper_nll(engine, chunk, split, header, plan)
        state = (
            reference_state(engine, pre)
            if plan is None
            else receive(engine, encode(header, pre, plan))
        )
        return continuation_nll(engine, state, chunk[split - 1 :])

    ref_nll = ref_n = 0
    for pre, chunk in prefixes:
        nll, n = nll_of(pre, chunk)
        ref_nll, ref_n = ref_nll + nll, ref_n + n
    ppl_fp16 = math.exp(ref_nll / ref_n)

    records = []
    for run in tqdm(todo, desc=f"ppl {engine.name}"):
        policy, scoring = run.configs()
        total = count = wire = fp16 = nominal = 0.0
        try:
            for pre, chunk in prefixes:
                header, plan = plan_transfer(engine, pre, policy, scoring)
                nll, n = nll_of(pre, chunk, header, plan)
                total, count = total + nll, count + n
                wire, fp16 = wire + plan.wire_bytes, fp16 + plan.fp16_bytes
                nominal += plan.nominal_budget / len(prefixes)
        except BudgetError as e:
            tqdm.write(f"skip {run.label} at budget {run.budget}: {e}")
            continue
        ppl = math.exp(total / count)
        rec = PplRecord(
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
