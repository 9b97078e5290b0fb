"""Needle in a haystack through the transfer path.

A needle sentence ("The secret code of the blue door is 4817.") is inserted at a relative depth
into real text; the model's chat template wraps haystack + a retrieval question; the prefill side
prefills and transfers the prompt's cache; the decode side answers greedily. Success: the needle's
value appears in the answer. The FP16 transfer (budget 1.0) is always run beside, so a model's own
limits are not blamed on compression.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..engines.hf import Engine, chat_ids, generate, prefill
from ..errors import BudgetError
from ..pipeline import encode, plan_transfer, receive, split_prompt
from .runs import RunSpec, load_records, save_records

#: (subject, value): the needle says "The {subject} is {value}." and the question asks for it.
NEEDLES = (
    ("secret code of the blue door", "4817"),
    ("name of the captain's parrot", "Biscuit"),
    ("password for the old library", "marigold"),
    ("number of lanterns on the bridge", "62"),
    ("color of the wizard's boots", "turquoise"),
    ("city where Mira hid the map", "Lisbon"),
    ("year the lighthouse was rebuilt", "1893"),
)


@dataclass
class NiahRecord:
    model: str
    corpus: str
    context: int
    depth: float
    needle: str
    policy: str
    budget: float | None
    wire_budget: float
    success: bool
    answer: str


def build_prompt(
    engine: Engine, haystack: str, needle: tuple[str, str], depth: float, context: int
) -> torch.Tensor:
    """Chat-template token ids of about `context` tokens with the needle at relative `depth`."""
    subject, value = needle
    question = f"What is the {subject}? Answer with the {subject.split(' of ')[0]} only."
    sentence = f" The {subject} is {value}. "
    overhead = chat_ids(engine, sentence + "\n\n" + question).numel()
    tok = engine.tokenizer
    hay_ids = tok(haystack[: context * 8], add_special_tokens=False)["input_ids"]
    hay_ids = hay_ids[: max(0, context - overhead)]
    text = tok.decode(hay_ids)
    cut = int(len(text) * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = boundary + 1 if boundary > 0 and depth > 0 else (0 if depth == 0 else cut)
    body = text[:cut] + sentence + text[cut:]
    return chat_ids(engine, f"{body.strip()}\n\n{question}")


def _key(r: dict) -> tuple:
    return (
        r["model"],
        r["corpus"],
        r["context"],
        r["depth"],
        r["needle"],
        r["policy"],
        r["budget"],
    )


def run_niah(
    engine: Engine,
    corpus: str,
    haystack: str,
    runs: list[RunSpec],
    contexts: list[int],
    depths: list[float],
    n_needles: int = 5,
    max_new_tokens: int = 16,
    json_path: str | None = None,
) -> list[NiahRecord]:
    """One trial per (context, depth, needle); every run on the same prefilled prompt."""
    runs = [RunSpec("fp16", 1.0), *[r for r in runs if r != RunSpec("fp16", 1.0)]]
    existing = load_records(json_path)
    done = {_key(r) for r in existing}
    records = []
    trials = [(c, d, nd) for c in contexts for d in depths for nd in NEEDLES[:n_needles]]
    for i, (context, depth, needle) in enumerate(tqdm(trials, desc=f"niah {engine.name}")):
        meta = dict(
            model=engine.name, corpus=corpus, context=context, depth=depth, needle=needle[0]
        )
        todo = [
            r for r in runs if _key({**meta, "policy": r.label, "budget": r.budget}) not in done
        ]
        if not todo:
            continue
        offset = (i * 7919) % max(1, len(haystack) - context * 8)
        ids = build_prompt(engine, haystack[offset:], needle, depth, context)
        context_ids, last = split_prompt(ids)
        pre = prefill(engine, context_ids)
        for run in todo:
            policy, scoring = run.configs()
            try:
                header, plan = plan_transfer(engine, pre, policy, scoring)
            except BudgetError as e:
                tqdm.write(f"skip {run.label} at budget {run.budget}: {e}")
                continue
            state = receive(engine, encode(header, pre, plan))
            answer = engine.tokenizer.decode(
                generate(engine, state, last, max_new_tokens), skip_special_tokens=True
            )
            rec = NiahRecord(
                policy=run.label,
                budget=run.budget,
                wire_budget=plan.wire_budget,
                success=needle[1].lower() in answer.lower(),
                answer=answer.strip(),
                **meta,
            )
            records.append(rec)
            existing.append(asdict(rec))
        save_records(json_path, existing)
    return records
