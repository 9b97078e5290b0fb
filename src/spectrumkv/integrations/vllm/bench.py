"""`spectrumkv bench vllm`: TTFT and bytes for a 1P1D vLLM pair, SpectrumKV at several budgets
against vLLM's ExampleConnector, on the same prompts (Wikipedia text, exact token counts).

SpectrumKV over an emulated link is measured for real (the producer's sender is shaped, and the
push finishes inside the prefill step). ExampleConnector moves KV through a shared directory,
which has no link to shape: its rows at a link rate > 0 are *projected* as its measured
loopback TTFT plus bytes * 8 / rate, and marked so. Every request carries a fresh cache salt,
so no prefix-cache hit shortens either side.
"""

from __future__ import annotations

import statistics
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from .client import Answer, ask
from .launch import PDSetup, VllmPD


@dataclass
class Record:
    """Medians over the prompts (seconds, bytes per request)."""

    connector: str
    budget: float | None
    link_gbps: float
    prompt_tokens: int
    requests: int
    ttft_s: float
    wire_bytes: int
    fp16_bytes: int
    fallbacks: int
    push_s: float
    load_s: float
    projected: bool = False


def bench_prompts(model: str, n: int, tokens: int) -> list[list[int]]:
    """n + 1 disjoint windows of `tokens` Wikipedia tokens (the first is the warm-up)."""
    from transformers import AutoTokenizer

    from ...assets import corpus_ids

    ids = corpus_ids(AutoTokenizer.from_pretrained(model), "wiki", (n + 1) * tokens)
    return [ids[i * tokens : (i + 1) * tokens] for i in range(n + 1)]


def _record(connector, budget, link, tokens, answers: list[Answer], projected=False) -> Record:
    return Record(
        connector,
        budget,
        link,
        tokens,
        len(answers),
        statistics.median(a.ttft_s for a in answers),
        int(statistics.median(a.wire_bytes for a in answers)),
        int(statistics.median(a.fp16_bytes for a in answers)),
        sum(bool(a.fallback) for a in answers),
        statistics.median(a.push_s for a in answers),
        statistics.median(a.load_s for a in answers),
        projected,
    )


def run_bench(
    model: str,
    budgets: list[float],
    links: list[float],
    n_prompts: int,
    prompt_tokens: int,
    max_tokens: int,
    example: bool,
    log_dir: Path,
) -> list[Record]:
    warm, *prompts = bench_prompts(model, n_prompts, prompt_tokens)
    records: list[Record] = []
    for link in links:
        setup = PDSetup(model, log_dir / f"spectrumkv-{link:g}gbps", link_gbps=link)
        with VllmPD(setup) as pd:
            ask(pd, warm, max_tokens, salt=uuid.uuid4().hex)
            got: dict[float, list[Answer]] = {b: [] for b in budgets}
            for p in prompts:  # budgets interleaved, so drift hits them alike
                for b in budgets:
                    got[b].append(ask(pd, p, max_tokens, budget=b, salt=uuid.uuid4().hex))
        records += [_record("spectrumkv", b, link, prompt_tokens, got[b]) for b in budgets]
    if example:
        with VllmPD(PDSetup(model, log_dir / "example", connector="example")) as pd:
            ask(pd, warm, max_tokens)
            answers = [ask(pd, p, max_tokens) for p in prompts]
        for link in links:
            shifted = [
                replace(a, ttft_s=a.ttft_s + (a.wire_bytes * 8 / (link * 1e9) if link else 0.0))
                for a in answers
            ]
            records.append(_record("example", None, link, prompt_tokens, shifted, link > 0))
    return records


def markdown(records: list[Record]) -> str:
    rows = [
        "| connector | budget | link | prompt tokens | requests | TTFT p50 (s) | "
        "bytes per request (MB) | vs 16-bit KV | push p50 (s) | load p50 (s) | fallbacks |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        name = "vLLM ExampleConnector" if r.connector == "example" else "SpectrumKV"
        link = f"{r.link_gbps:g} Gbps" if r.link_gbps else "loopback"
        ttft = f"{r.ttft_s:.2f}" + (" (projected)" if r.projected else "")
        ratio = f"{r.wire_bytes / r.fp16_bytes:.3f}" if r.fp16_bytes else "-"
        budget = "-" if r.budget is None else f"{r.budget:g}"
        rows.append(
            f"| {name} | {budget} | {link} | {r.prompt_tokens} | {r.requests} | {ttft} | "
            f"{r.wire_bytes / 1e6:.2f} | {ratio} | {_secs(r.push_s)} | {_secs(r.load_s)} | "
            f"{r.fallbacks} |"
        )
    return "\n".join(rows)


def _secs(s: float) -> str:
    return f"{s:.3f}" if s else "-"
