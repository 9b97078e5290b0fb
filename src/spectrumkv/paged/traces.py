"""Seeded length mixes for decode-attention benchmarks (the PersistentKV paper's four, scaled
by `scale`), and user traces from JSON.

Each generator returns the context lengths (tokens) of one batch of `batch` requests:
- bimodal: every 4th request 24.6K-64K tokens, the others 2K-12K;
- uniform: 4K-32K;
- zipf: 2048 + 65536 / sqrt(rank), ranks a seeded shuffle of 1..batch, +-10 % jitter;
- bucketed: one of 8K / 16K / 32K / 64K each.
A user trace (`--trace FILE`) is a JSON list of {"context": n, "decode": m}: requests cycle
through it; `decode` (the tokens it would generate) is recorded but attention is measured at
the context length.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from .errors import PagedInputError

TRACES = ("bimodal", "uniform", "zipf", "bucketed")


def lengths(trace: str, batch: int, seed: int, scale: float = 1.0) -> list[int]:
    """Context lengths of one batch (each >= 1)."""
    if batch < 1:
        raise PagedInputError(f"batch must be >= 1, got {batch}")
    rng = random.Random(f"{trace}/{batch}/{seed}")
    if trace == "bimodal":
        out = [
            rng.randint(24_600, 64_000) if i % 4 == 3 or batch == 1 and rng.random() < 0.25
            else rng.randint(2_000, 12_000)
            for i in range(batch)
        ]  # fmt: skip
    elif trace == "uniform":
        out = [rng.randint(4_000, 32_000) for _ in range(batch)]
    elif trace == "zipf":
        ranks = list(range(1, batch + 1))
        rng.shuffle(ranks)
        out = [int((2048 + 65536 / math.sqrt(r)) * rng.uniform(0.9, 1.1)) for r in ranks]
    elif trace == "bucketed":
        out = [rng.choice((8_192, 16_384, 32_768, 65_536)) for _ in range(batch)]
    else:
        raise PagedInputError(f"unknown trace {trace!r}; choose from {', '.join(TRACES)}")
    return [max(1, int(n * scale)) for n in out]


def load_trace(path: str | Path) -> list[dict]:
    """A user trace: a JSON list of {"context": n >= 1, "decode": m >= 0}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PagedInputError(f"cannot read trace {path}: {e}") from None
    ok = isinstance(data, list) and data and all(
        isinstance(r, dict) and set(r) <= {"context", "decode"}
        and isinstance(r.get("context"), int) and r["context"] >= 1
        and isinstance(r.get("decode", 0), int) and r.get("decode", 0) >= 0
        for r in data
    )  # fmt: skip
    if not ok:
        raise PagedInputError(
            f'trace {path} must be a non-empty JSON list of {{"context": n >= 1, "decode": m}}'
        )
    return data


def file_lengths(records: list[dict], batch: int, seed: int) -> list[int]:
    """One batch from a user trace: `batch` consecutive records from a seeded start, cycling."""
    start = random.Random(seed).randrange(len(records))
    return [records[(start + i) % len(records)]["context"] for i in range(batch)]
