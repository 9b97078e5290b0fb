"""`spectrumkv demo`: prompts through prefill -> plan -> encode -> bytes -> decode -> generate."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .config import PolicyConfig
from .engines.hf import Engine, chat_ids, generate, prefill
from .pipeline import encode, plan_transfer, receive, reference_state, split_prompt

DEFAULT_PROMPTS = (
    "Why is the sky blue? Explain it to a ten-year-old.",
    "Write a short poem about the sea at night.",
    "What are three good habits for staying healthy?",
)
DEFAULT_RUNS = (
    ("spectrum", 1.0),
    ("spectrum", 0.5),
    ("spectrum", 0.3),
    ("pdtrim", 0.5),
    ("pdtrim", 0.3),
)


@dataclass
class DemoRow:
    prompt: int
    policy: str
    budget: float
    wire_bytes: int
    fp16_bytes: int
    wire_ratio: float
    nominal_budget: float
    matched_tokens: int
    generated_tokens: int
    text: str


def matched_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens on which two generations agree."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_demo(
    engine: Engine,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    runs: tuple[tuple[str, float], ...] = DEFAULT_RUNS,
    max_new_tokens: int = 24,
) -> list[DemoRow]:
    rows = []
    for i, prompt in enumerate(prompts):
        context, last = split_prompt(chat_ids(engine, prompt))
        pre = prefill(engine, context)
        ref = generate(engine, reference_state(engine, pre), last, max_new_tokens)
        for policy, budget in runs:
            header, plan = plan_transfer(engine, pre, PolicyConfig(policy, budget=budget))
            payload = encode(header, pre, plan)
            out = generate(engine, receive(engine, payload), last, max_new_tokens)
            rows.append(
                DemoRow(
                    prompt=i,
                    policy=policy,
                    budget=budget,
                    wire_bytes=len(payload),
                    fp16_bytes=plan.fp16_bytes,
                    wire_ratio=len(payload) / plan.fp16_bytes,
                    nominal_budget=plan.nominal_budget,
                    matched_tokens=matched_prefix(out, ref),
                    generated_tokens=len(out),
                    text=engine.tokenizer.decode(out, skip_special_tokens=True),
                )
            )
    return rows


def print_table(rows: list[DemoRow], prompts: tuple[str, ...]) -> None:
    head = (
        f"{'#':>2} {'policy':<10} {'budget':>6} {'wire bytes':>11} {'wire/fp16':>9} "
        f"{'match':>7}  text"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        text = r.text.replace("\n", " ")
        if len(text) > 60:
            text = text[:57] + "..."
        match = f"{r.matched_tokens}/{r.generated_tokens}"
        print(
            f"{r.prompt:>2} {r.policy:<10} {r.budget:>6.2f} {r.wire_bytes:>11,} "
            f"{r.wire_ratio:>9.3f} {match:>7}  {text}"
        )
    print()
    for i, p in enumerate(prompts):
        print(f"prompt {i}: {p}")


def write_json(rows: list[DemoRow], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
