"""`spectrumkv demo`: a prefill and a decode worker as separate processes on loopback; prompts go
through the decode worker's HTTP front, the KV cache crosses a real socket, and the table shows
bytes on the wire, agreement with the uncompressed transfer, per-stage times and TTFT."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .pd.client import complete, token_ids
from .pd.launch import Cluster

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
    matched_tokens: int
    generated_tokens: int
    prefill_s: float
    encode_s: float
    transfer_exposed_s: float
    unpack_s: float
    ttft_s: float
    text: str


def matched_prefix(a: list, b: list) -> int:
    """Number of leading items on which two sequences agree."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_demo(
    model: str,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    runs: tuple[tuple[str, float], ...] = DEFAULT_RUNS,
    max_new_tokens: int = 24,
) -> list[DemoRow]:
    rows = []
    with Cluster(model) as cluster:
        for i, prompt in enumerate(prompts):
            ref = None
            for policy, budget in (("fp16", 1.0), *runs):
                r = complete(
                    cluster.url, prompt, max_new_tokens, chat=True, policy=policy, budget=budget
                )
                text, s = r["choices"][0]["text"], r["spectrumkv"]
                ids = token_ids(r)
                if ref is None:
                    ref = ids
                    continue
                rows.append(
                    DemoRow(
                        prompt=i,
                        policy=policy,
                        budget=budget,
                        wire_bytes=s["wire_bytes"],
                        fp16_bytes=s["fp16_bytes"],
                        wire_ratio=s["wire_ratio"],
                        matched_tokens=matched_prefix(ids, ref),
                        generated_tokens=r["usage"]["completion_tokens"],
                        prefill_s=s["prefill_s"],
                        encode_s=s["encode_s"],
                        transfer_exposed_s=s["transfer_exposed_s"],
                        unpack_s=s["unpack_s"],
                        ttft_s=s["ttft_s"],
                        text=text,
                    )
                )
    return rows


def print_table(rows: list[DemoRow], prompts: tuple[str, ...]) -> None:
    head = (
        f"{'#':>2} {'policy':<9} {'budget':>6} {'wire bytes':>10} {'wire/fp16':>9} "
        f"{'match':>6} {'prefill':>8} {'exposed':>8} {'unpack':>7} {'TTFT':>7}  text"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        text = r.text.replace("\n", " ").strip()
        text = text[:40] + "..." if len(text) > 43 else text
        print(
            f"{r.prompt:>2} {r.policy:<9} {r.budget:>6.2f} {r.wire_bytes:>10,} "
            f"{r.wire_ratio:>9.3f} {r.matched_tokens:>2}/{r.generated_tokens:<3} "
            f"{r.prefill_s:>7.2f}s {r.transfer_exposed_s:>7.3f}s {r.unpack_s:>6.3f}s "
            f"{r.ttft_s:>6.2f}s  {text}"
        )
    print()
    for i, p in enumerate(prompts):
        print(f"prompt {i}: {p}")


def write_json(rows: list[DemoRow], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
