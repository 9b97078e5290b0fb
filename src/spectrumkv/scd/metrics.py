"""What the PD protocol measures for SCD: B, from some cache of a prefix, fed the last prefix token
and the continuation; its NLL on the continuation, its token KL against the oracle (B's own
prefill), greedy agreement with the oracle's greedy continuation, and a method's ΔPPL and KL as
a fraction of raw reuse's with a paired bootstrap interval over chunks."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
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


@dataclass
class Ratio:
    """A method's figure as a fraction of raw reuse's over the same chunks: the point estimate
    and a 95 % paired bootstrap interval (the same resampled chunks for both methods)."""

    value: float
    lo: float
    hi: float


def ratio_to_raw(
    got: list[float], raw: list[float], oracle: list[float] | None = None,
    tokens: list[int] | None = None, resamples: int = 4000, seed: int = 0,
) -> Ratio:  # fmt: skip
    """Per-chunk figures -> (method - oracle) / (raw - oracle) over the pooled chunks.

    With `oracle` and `tokens` (per-chunk NLL sums in nats, tokens scored per chunk): the ratio
    of ΔPPL, each perplexity exp(sum NLL / sum tokens) as `scd eval` pools it. Without them,
    `got` and `raw` are per-chunk mean token KLs (nats) and the ratio is of their chunk means,
    as `scd eval` reports KL. A resample in which raw's figure is not above the oracle's has no
    ratio and counts as +inf (against the method): such noise widens the interval, never hides.
    """
    c = len(got)
    if c < 1 or len(raw) != c or (oracle is None) != (tokens is None):
        raise ValueError("ratio_to_raw needs one figure per chunk and method (NLL with tokens)")
    if oracle is not None and not len(oracle) == len(tokens) == c:
        raise ValueError("ratio_to_raw needs one oracle NLL and token count per chunk")
    g, r = torch.tensor(got, dtype=torch.float64), torch.tensor(raw, dtype=torch.float64)
    if oracle is not None:
        o, n = torch.tensor(oracle, dtype=torch.float64), torch.tensor(tokens, dtype=torch.float64)

    def pooled(pick: torch.Tensor) -> torch.Tensor:
        if oracle is None:
            num, den = g[pick].mean(-1), r[pick].mean(-1)
        else:
            tok = n[pick].sum(-1)
            base = (o[pick].sum(-1) / tok).exp()
            num = (g[pick].sum(-1) / tok).exp() - base
            den = (r[pick].sum(-1) / tok).exp() - base
        return torch.where(den > 0, num / den.clamp_min(1e-300), math.inf)

    return Ratio(float(pooled(torch.arange(c))), *_interval(pooled, c, resamples, seed))


def delta_pct_interval(
    got: list[float], oracle: list[float], tokens: list[int], resamples: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """95 % bootstrap interval over chunks of a method's pooled ΔPPL vs the oracle, in percent,
    from per-chunk NLL sums (nats) and token counts, pooled as `scd eval` pools perplexity."""
    c = len(got)
    if c < 1 or not len(oracle) == len(tokens) == c:
        raise ValueError("delta_pct_interval needs two NLLs and one token count per chunk")
    g, o = torch.tensor(got, dtype=torch.float64), torch.tensor(oracle, dtype=torch.float64)
    n = torch.tensor(tokens, dtype=torch.float64)

    def pooled(pick: torch.Tensor) -> torch.Tensor:
        return 100 * (((g[pick] - o[pick]).sum(-1) / n[pick].sum(-1)).exp() - 1)

    return _interval(pooled, c, resamples, seed)


def _interval(
    pooled: Callable[[torch.Tensor], torch.Tensor], c: int, resamples: int, seed: int
) -> tuple[float, float]:
    """The 2.5 % and 97.5 % points of `pooled` over `resamples` resamples of `c` chunks."""
    gen = torch.Generator().manual_seed(seed)
    boot = pooled(torch.randint(c, (resamples, c), generator=gen)).sort().values
    lo, hi = int(0.025 * resamples), math.ceil(0.975 * resamples) - 1
    return float(boot[lo]), float(boot[hi])


#: One-sided 95 % quantiles of Student's t for 1 to 30 degrees of freedom (1.645 beyond).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782,
        1.771, 1.761, 1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711,
        1.708, 1.706, 1.703, 1.701, 1.699, 1.697)  # fmt: skip


def resolved_gain(before: list[float], after: list[float], min_fraction: float) -> bool:
    """Whether per-chunk figures `after` (e.g. mean token KLs) are lower than `before` on the same
    chunks by a gain the chunks resolve: the mean paired gain is above `min_fraction` of
    `before`'s mean and, with two or more chunks, its one-sided 95 % Student-t lower bound
    (mean - t * sd / sqrt(n)) is above 0. One chunk gives no spread: the mean rule alone."""
    n = len(before)
    if n < 1 or len(after) != n:
        raise ValueError("resolved_gain needs one figure per chunk, the same chunks both times")
    gains = [b - a for b, a in zip(before, after, strict=True)]
    mean = statistics.fmean(gains)
    if mean <= min_fraction * statistics.fmean(before):
        return False
    if n == 1:
        return True
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.645
    return mean - t * statistics.stdev(gains) / math.sqrt(n) > 0
