"""`spectrumkv demo`: a prefill and a decode worker as separate processes on loopback; prompts go
through the decode worker's HTTP front, the KV cache crosses a real socket, and the table shows
bytes on the wire, agreement with the uncompressed transfer, per-stage times and TTFT.

Each round (one policy and budget) sends all prompts at once, so the decode worker's
continuous-batching engine decodes them together; `batch` is the round's mean engine batch size
(requests per decode step) and `tok/s` its decode tokens per second of step time, both read from
the decode worker's /metrics before and after the round."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from .pd.client import complete, token_ids
from .pd.launch import Cluster
from .serve.metrics import read as read_metrics

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
    """One prompt under one policy. A request whose transfer failed (`outcome` "recomputed":
    the decode worker prefilled it itself) has no transfer figures: they are 0."""

    prompt: int
    policy: str
    budget: float
    outcome: str  # "ok" (the KV crossed the socket) or "recomputed"
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
    batch: float  # the round's mean engine batch size (requests per decode step)
    decode_tok_s: float  # the round's tokens generated / seconds in decode steps
    text: str


#: the engine counters the demo reads from /metrics: field -> sample name
_ENGINE = {
    "steps": "spectrumkv_engine_batch_size_count",
    "batch_sum": "spectrumkv_engine_batch_size_sum",
    "tokens": "spectrumkv_engine_tokens_total",
    "step_s": "spectrumkv_engine_step_seconds_sum",
}


def engine_counters(url: str) -> dict[str, float]:
    """The decode worker's engine counters (steps, batch_sum, tokens, step_s) from /metrics;
    zeros for a worker without the batch engine (`serve decode --engine sequential`)."""
    samples = read_metrics(url)
    return {k: samples.get(name, 0.0) for k, name in _ENGINE.items()}


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
    """One round per policy (the FP16 reference first), all prompts of a round concurrently."""
    rows = []
    refs: list[list[int]] = []
    with Cluster(model) as cluster, ThreadPoolExecutor(max(1, len(prompts))) as pool:
        for policy, budget in (("fp16", 1.0), *runs):

            def ask(prompt: str, policy=policy, budget=budget) -> dict:
                return complete(
                    cluster.url, prompt, max_new_tokens, chat=True, policy=policy, budget=budget
                )

            before = engine_counters(cluster.url)
            answers = list(pool.map(ask, prompts))
            after = engine_counters(cluster.url)
            d = {k: after[k] - before[k] for k in after}
            batch = d["batch_sum"] / d["steps"] if d["steps"] else 0.0
            rate = d["tokens"] / d["step_s"] if d["step_s"] else 0.0
            if not refs:
                refs = [token_ids(r) for r in answers]
                continue
            for i, r in enumerate(answers):
                text, s, ids = r["choices"][0]["text"], r["spectrumkv"], token_ids(r)
                rows.append(
                    DemoRow(
                        prompt=i,
                        policy=policy,
                        budget=budget,
                        outcome=s["outcome"],
                        wire_bytes=s.get("wire_bytes", 0),
                        fp16_bytes=s.get("fp16_bytes", 0),
                        wire_ratio=s.get("wire_ratio", 0.0),
                        matched_tokens=matched_prefix(ids, refs[i]),
                        generated_tokens=r["usage"]["completion_tokens"],
                        prefill_s=s.get("prefill_s", 0.0),
                        encode_s=s.get("encode_s", 0.0),
                        transfer_exposed_s=s.get("transfer_exposed_s", 0.0),
                        unpack_s=s.get("unpack_s", 0.0),
                        ttft_s=s["ttft_s"],
                        batch=batch,
                        decode_tok_s=rate,
                        text=text,
                    )
                )
    rows.sort(key=lambda r: r.prompt)  # stable: each prompt's rows in run order
    return rows


def print_table(rows: list[DemoRow], prompts: tuple[str, ...]) -> None:
    head = (
        f"{'#':>2} {'policy':<9} {'budget':>6} {'wire bytes':>10} {'wire/fp16':>9} "
        f"{'match':>6} {'prefill':>8} {'exposed':>8} {'unpack':>7} {'TTFT':>7} {'batch':>5} "
        f"{'tok/s':>6}  text"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        text = r.text.replace("\n", " ").strip()
        text = text[:40] + "..." if len(text) > 43 else text
        if r.outcome != "ok":
            text = f"({r.outcome}: no transfer) {text}"
        print(
            f"{r.prompt:>2} {r.policy:<9} {r.budget:>6.2f} {r.wire_bytes:>10,} "
            f"{r.wire_ratio:>9.3f} {r.matched_tokens:>2}/{r.generated_tokens:<3} "
            f"{r.prefill_s:>7.2f}s {r.transfer_exposed_s:>7.3f}s {r.unpack_s:>6.3f}s "
            f"{r.ttft_s:>6.2f}s {r.batch:>5.2f} {r.decode_tok_s:>6.1f}  {text}"
        )
    print()
    for i, p in enumerate(prompts):
        print(f"prompt {i}: {p}")


def write_json(rows: list[DemoRow], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
