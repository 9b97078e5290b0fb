"""Refresh: B recomputes a prompt's first `head` and last `tail` tokens itself.

- Head: B's own prefill of the first `head` tokens gives their exact K/V (they attend to nothing
  else), which replaces the rebuilt rows. The first tokens are the attention sinks, which every
  later query attends to.
- Tail: A prefills and codes only the first n - tail tokens (so a sliding-window layer holds the
  window ending there, which the tail's queries need); B rebuilds their cache, then runs its own
  forward over the last `tail` prompt tokens, attending to the rebuilt cache, which appends B's
  K/V for them (the selective recompute of CacheBlend, on the newest tokens: the continuation
  attends to them most). A sends nothing for them, so the payload shrinks by tail / n.

On the SmolLM2 alias pair (RESULTS, SCD round 19; 895-token prompts) head 16 and tail 128 cut
raw reuse's token KL from 0.165 to 0.030 and SCD's from 0.061 to 0.018; on the Gemma-3 pair raw
reuse's from 0.281 to 0.173 only. The cost is B's forward over head + tail tokens, which keeps
no logits but the last position's: at 4K tokens, rebuild included, 9.0 % of B's own prefill
with 16 + 128 on the SmolLM2 pair, 5.1 % with 16 + 256 on the Gemma-3 pair (RESULTS, session
28); at 896 tokens a quarter to a third of it.
"""

from __future__ import annotations

import torch

from ..engines.hf import Engine, decode_state, prefill, step
from ..errors import ConfigError
from ..kv import LayerKV


def coded_tokens(n_tokens: int, tail: int) -> int:
    """How many of a prompt's `n_tokens` tokens A codes when B refreshes `tail` of them (at
    least one token is always coded)."""
    if tail < 0:
        raise ConfigError(f"tail tokens must be >= 0, got {tail}")
    return max(1, n_tokens - tail)


def splice(layers: list[LayerKV], own: list[LayerKV]) -> list[LayerKV]:
    """`layers` with the rows of the positions `own` holds replaced by `own`'s (out of place, so
    an autograd graph through `layers` is kept)."""
    out = []
    for kv, mine in zip(layers, own, strict=True):
        rows = torch.isin(kv.positions, mine.positions)
        if not rows.any():
            out.append(kv)
            continue
        at = torch.searchsorted(mine.positions, kv.positions[rows])
        keys, values = kv.keys.clone(), kv.values.clone()
        keys[:, rows] = mine.keys[:, at].to(keys.dtype)
        values[:, rows] = mine.values[:, at].to(values.dtype)
        out.append(LayerKV(keys, values, kv.positions))
    return out


def head_rows(engine_b: Engine, prompt: torch.Tensor, head: int, n_coded: int) -> list[LayerKV]:
    """B's own K/V of the prompt's first `head` tokens (no more than the `n_coded` tokens the
    cache was rebuilt for), the rows `splice` puts in place of the rebuilt ones; [] for head 0."""
    if head < 0:
        raise ConfigError(f"head tokens must be >= 0, got {head}")
    return prefill(engine_b, prompt[: min(head, n_coded)]).layers if head else []


@torch.inference_mode()
def refresh(
    engine_b: Engine, layers: list[LayerKV], n_coded: int, prompt: torch.Tensor, head: int = 0
) -> list[LayerKV]:
    """B's cache of the whole 1-D `prompt` from `layers`, the cache of its first `n_coded` tokens
    (rebuilt from codes; tokens a payload dropped stay absent): the rows of the first `head`
    tokens replaced by B's own, then B's forward over prompt[n_coded:] appends its own K/V for
    the rest. Returns the layers in B's KV dtype, each holding the slots a decode cache keeps (a
    sliding-window layer its last window)."""
    if not 0 < n_coded <= prompt.numel():
        raise ConfigError(f"{n_coded} coded tokens of a {prompt.numel()}-token prompt")
    if head:
        layers = splice(layers, head_rows(engine_b, prompt, head, n_coded))
    if n_coded == prompt.numel():
        return layers
    fp = engine_b.fingerprint
    state = decode_state(engine_b, layers, n_coded)
    step(engine_b, state, prompt[n_coded:], logits_to_keep=1)
    out = []
    for i, layer in enumerate(state.cache.layers):
        pos = state.sliding_positions if fp.is_sliding(i) else state.full_positions
        keys, values = layer.keys[0], layer.values[0]
        out.append(LayerKV(keys.to(engine_b.kv_dtype), values.to(engine_b.kv_dtype), pos))
    return out
