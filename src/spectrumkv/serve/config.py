"""The batch engine's one validated config (`EngineConfig`) and its default page pool."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..paged.routes import ROUTES

PREFILL_MODES = ("between", "mixed")


def default_pool_mb() -> float:
    """Default page pool: 1/8 of the machine's physical memory, at most 4 GiB (MiB)."""
    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(min(4096, phys / 8 / (1 << 20)))


@dataclass(frozen=True)
class EngineConfig:
    """pool_mb: K+V page pool, MiB, all layers. page_size: tokens per page. max_batch: most
    requests decoding in one step (bf16 on a CPU without AMX: above engines.packed.DOT_ROWS, 64,
    a step's linears move from the few-row kernel to oneDNN, whose sums run in another order, so
    a request's bits then depend on whether its step had more than 64 rows; "mixed" prefill steps
    cross it too). max_queue: most requests waiting for pages. queue_timeout_s: longest wait for
    pages before PoolBusy (seconds). route: the decode-attention route (paged.routes.ROUTES),
    "adaptive" = the cost model's pick every step. attention_profile: the machine profile JSON
    adaptive reads (`spectrumkv bench calibrate --dtype <page dtype>`); None = this machine's
    default one for the page dtype if it exists (paged.cost.profile_for), else the built-in
    uncalibrated constants.

    prefill_chunk: recompute path, context tokens prefilled per iteration (0 = whole). 256
    measured here: the decoding requests' longest stall during a 1,024-token local prefill 9.1 s
    vs 19-24 s whole, the recompute's TTFT 20.1 s vs 19.9-24.4 s (serve/prefill_mix.py).

    prefill_mode: how a local prefill's chunk shares an iteration with the decode step.
    "between": its own HF forward (DynamicCache) between two decode steps, the KV written into
    pages at the end. "mixed": batched into the decode step, one model call whose rows are the
    decode tokens plus the chunk (serve.chunk_attention), its K/V written straight into pages;
    only for models with the hand-written Llama step (engines.llama_step), others run "between".
    Default "between", measured here (serve/prefill_mix.py, chunk 256, 8 requests decoding
    beside a 2,048-token recompute, paired rounds in one process, load 2.3-3.6): float32, mixed
    / between over 6 rounds: longest decode stall 0.80x, decode tok/s 1.14x, recompute TTFT
    0.93x (0.69-1.07); bfloat16 over 4 rounds: stall 1.12x, median step gap 1.25x, TTFT 1.13x
    (1.10-1.20), and the decoding requests' bf16 tokens change when a chunk shares their
    linears (16 of 32 request-runs; float32: 0 of 48). Mixed wins only in float32, by less.
    """

    pool_mb: float = field(default_factory=default_pool_mb)
    page_size: int = 16
    max_batch: int = 32
    max_queue: int = 64
    queue_timeout_s: float = 30.0
    route: str = "adaptive"
    attention_profile: str | None = None
    prefill_chunk: int = 256
    prefill_mode: str = "between"

    def __post_init__(self) -> None:
        if not self.pool_mb > 0 or self.page_size < 1 or self.max_batch < 1:
            raise ConfigError(f"pool_mb, page_size and max_batch must be positive: {self}")
        if self.prefill_chunk < 0:
            raise ConfigError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.prefill_mode not in PREFILL_MODES:
            raise ConfigError(f"unknown prefill_mode {self.prefill_mode!r}; choose from "
                              f"{', '.join(PREFILL_MODES)}")  # fmt: skip
        if self.route not in ROUTES:
            raise ConfigError(f"unknown route {self.route!r}; choose from {', '.join(ROUTES)}")
        if self.max_queue < 0 or not self.queue_timeout_s >= 0:
            raise ConfigError(f"max_queue and queue_timeout_s must be >= 0: {self}")
