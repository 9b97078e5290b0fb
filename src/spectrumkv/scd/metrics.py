"""What the PD protocol measures for SCD: B, from some cache of a prefix, fed the last prefix token
and the continuation; its NLL on the continuation, its token KL against the oracle (B's own
prefill), and greedy agreement with the oracle's greedy continuation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engines.hf import DecodeState, Engine, decode_state, step
from .capture import capture


@dataclass
class Scored:
    """Continuation scores of one chunk: summed NLL over `n` tokens, log-probs [n, vocab]."""

    nll: float
    n: int
    logp: torch.Tensor


def score(engine: Engine, state: DecodeState, feed: torch.Tensor) -> Scored:
    """Feed feed[:-1] from `state`; score feed[1:] (the state is consumed)."""
    logp = F.log_softmax(step(engine, state, feed[:-1]), dim=-1)
    nll = float(-logp.gather(1, feed[1:, None]).sum())
    return Scored(nll, int(feed.numel() - 1), logp)


def oracle_score(engine_b: Engine, prefix: torch.Tensor, feed: torch.Tensor) -> Scored:
    """The oracle of the PD protocol: B's scores of `feed` from its own prefill of `prefix`."""
    pre = capture(engine_b, prefix).pre
    return score(engine_b, decode_state(engine_b, pre.layers, pre.n_tokens), feed)


def kl(got: Scored, oracle: Scored) -> float:
    """Mean over positions of KL(got || oracle) in nats."""
    p = got.logp.exp()
    return float((p * (got.logp - oracle.logp)).sum(-1).mean())


def agreement(got: list[int], ref: list[int]) -> tuple[int, float]:
    """(exact-match prefix length, token F1 as multisets) of `got` against `ref`."""
    prefix = next((i for i, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), None)
    if prefix is None:
        prefix = min(len(got), len(ref))
    common = sum(min(got.count(t), ref.count(t)) for t in set(got))
    if not got or not ref or common == 0:
        return prefix, 0.0
    p, r = common / len(got), common / len(ref)
    return prefix, 2 * p * r / (p + r)
