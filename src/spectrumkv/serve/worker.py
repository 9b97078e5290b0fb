"""The batch engine behind the decode worker (`serve decode --engine batched`): one blocking call
per request that submits its choices to the shared BatchEngine and waits for them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace

from ..kv import LayerKV
from ..pd.sampling import Choice, SamplingParams
from ..pipeline import split_prompt
from .engine import BatchEngine
from .requests import Generation
from .staged import StagedPrompt


def generate_batched(
    batch: BatchEngine,
    ids,
    layers: list[LayerKV] | StagedPrompt | None,
    n_tokens: int,
    p: SamplingParams,
    on_piece: Callable[[int, str], None],
    cancel: threading.Event,
) -> list[Choice]:
    """Run `p.n` choices of the prompt `ids` (1-D) on `batch`: from the received `layers` (the
    KV of ids[:-1], `n_tokens` long), from a prompt already in its pages (`StagedPrompt`, from
    `batch.stage`: choice 0 decodes from those pages, further choices from a copy of them), or
    prefilled by the engine when `layers` is None. Choice i samples with seed + i (if a seed is
    given). Blocks until all end; a set `cancel` cancels them (their pages are freed before the
    engine's next step; a staged prompt that was not submitted is aborted). Raises what the
    engine raised: PoolBusy, RequestTooLarge, Cancelled, ..."""
    context, last = split_prompt(ids)
    staged = layers if isinstance(layers, StagedPrompt) else None
    gens: list[Generation] = []
    try:
        if staged is not None and p.n > 1:
            layers = staged.layers()
        for i in range(p.n):
            pi = replace(p, n=1, seed=None if p.seed is None else p.seed + i)
            if staged is not None and i == 0:
                source = {"staged": staged}
            else:
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
        if staged is not None:
            staged.abort()  # no-op once submitted
        for g in gens:
            g.cancel()  # no-op for ended ones; frees the rest after an error
