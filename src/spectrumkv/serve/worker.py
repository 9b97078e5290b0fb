"""The batch engine behind the decode worker (`serve decode --engine batched`): one blocking call
per request that submits its choices to the shared BatchEngine and waits for them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from ..kv import LayerKV
from ..pd.sampling import Choice, SamplingParams
from ..pipeline import split_prompt
from .engine import BatchEngine, Generation


def generate_batched(
    batch: BatchEngine,
    ids,
    layers: list[LayerKV] | None,
    n_tokens: int,
    p: SamplingParams,
    on_piece: Callable[[int, str], None],
    cancel: threading.Event,
) -> list[Choice]:
    """Run `p.n` choices of the prompt `ids` (1-D) on `batch`: from the received `layers` (the
    KV of ids[:-1], `n_tokens` long), or prefilled by the engine when `layers` is None. Choice i
    samples with seed + i (if a seed is given). Blocks until all end; a set `cancel` cancels
    them (their pages are freed before the engine's next step). Raises what the engine raised:
    PoolBusy, RequestTooLarge, Cancelled, ..."""
    context, last = split_prompt(ids)
    gens: list[Generation] = []
    try:
        for i in range(p.n):
            pi = replace(p, n=1, seed=None if p.seed is None else p.seed + i)
            source = {"layers": layers} if layers is not None else {"context": context}
            n = n_tokens if layers is not None else int(context.numel())
            gens.append(batch.submit(pi, last, n, on_piece=lambda t, i=i: on_piece(i, t), **source))
        for g in gens:
            while not g.join(0.05):
                if cancel.is_set():
                    for other in gens:
                        other.cancel()
        return [Choice(i, g.wait().token_ids, g.text, g.finish_reason) for i, g in enumerate(gens)]
    finally:
        for g in gens:
            g.cancel()  # no-op for ended ones; frees the rest after an error
