"""How an SCD payload's codes are quantized under a byte budget: the plan (how many tokens at
INT8, how many dropped, sinks at FP16), the per-token tiers it gives from importance scores, and
whether a budget may drop tokens. The byte counts are the SCD wire's (`wire.frame_size`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import BudgetError
from ..policy import rank_order, raw_kv_bytes
from ..tiers import Tier
from .wire import Layout, ScdHeader, frame_size, header_bytes

#: Quantized codes keep the first SINKS tokens (attention sinks) at FP16 and never drop them
#: or the last token.
SINKS = 4
#: Below the budget of all codes kept, 1 / INT8_SHARE of the tokens (the most important) stay at
#: INT8 and more are dropped: measured at 0.25 of the bytes (`scd10` in RESULTS.md), 10 % at INT8
#: with 21 % dropped gave KL 0.038 against 0.044 for all-INT4 with 12 % dropped.
INT8_SHARE = 10


class CodePlan(NamedTuple):
    """How a payload's codes are quantized: the first SINKS tokens at FP16 (attention sinks:
    the most attended, and the worst hurt by INT4), of the others the `int8` most important at
    INT8, the `dropped` least important not sent, the rest at INT4 (drops only when all-INT4
    codes do not fit the budget). `int8` None: every token at FP16."""

    int8: int | None
    dropped: int = 0

    def needs_scores(self, n: int) -> bool:
        """Whether its tiers for n tokens depend on importance scores: some but not all of the
        others at INT8, or tokens dropped."""
        if self.int8 is None:
            return False
        return self.dropped > 0 or 0 < self.int8 < n - min(SINKS, n)


def code_plan(layout: Layout, n: int, budget: float | None, header_len: int) -> CodePlan:
    """The plan under which the whole payload (header, frame heads, tier maps, codes and
    quantization parameters) takes at most `budget` x the consumer's raw FP16 KV bytes
    (`raw_kv_bytes`), the first SINKS tokens at FP16: the most INT8 tokens that fit with every
    token kept, or if not even 1 / INT8_SHARE of them at INT8 fits, that many at INT8 (else
    none) and the fewest dropped tokens. A bound whichever tokens are picked:
    with sliding-window layers it counts every INT8 token inside each window and as many
    dropped ones outside it as fit (the most bytes they can take). None: FP16 codes.
    BudgetError when dropping every token but the protected ones (`SINKS` and the last) does
    not fit either."""
    if budget is None:
        return CodePlan(None)
    limit = budget * raw_kv_bytes(layout.consumer, n)
    rows = [n - layout.first(i, n) for i in range(len(layout.widths))]

    def size(int8: int, dropped: int) -> int:
        total = header_len
        for r, w in zip(rows, layout.widths, strict=True):
            # sinks at FP16 where the layer holds them; INT8 inside the window; drops land
            # outside it first (not on the sinks there; never the last token)
            sinks = max(0, min(SINKS, n) - (n - r))
            hi, gone = min(int8, r - sinks), max(0, dropped - max(0, n - r - SINKS))
            counts = {Tier.FP16: sinks, Tier.INT8: hi, Tier.INT4: max(0, r - sinks - hi - gone)}
            total += frame_size(r, counts, w)
        return total

    def most(fits, hi: int) -> int:  # the largest k in [0, hi] with fits(k); fits(0) holds
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo

    others = n - min(SINKS, n)
    floor = min(others, -(-n // INT8_SHARE))
    if size(floor, 0) <= limit:  # size grows with int8: the most INT8 tokens within the limit
        return CodePlan(most(lambda k: size(k, 0) <= limit, others))
    for int8 in (floor, 0):  # the INT8 floor and the fewest drops, else all-INT4 and drops
        top = min(max_dropped(n), others - int8)
        if size(int8, top) <= limit:
            return CodePlan(int8, top - most(lambda k, i=int8, t=top: size(i, t - k) <= limit, top))
    raise BudgetError(
        f"SCD codes at all-INT4 with {top} of {n} tokens dropped take "
        f"{size(0, top) / raw_kv_bytes(layout.consumer, n):.3f} of raw FP16 KV bytes with "
        f"every byte on the wire counted; budget {budget} is below that"
    )


def payload_size(layout: Layout, tiers: torch.Tensor, header_len: int) -> int:
    """Exact wire bytes of a payload whose codes go at `tiers` ([n] uint8 Tier codes, one per
    prompt position): each layer's frame counts the tiers of the rows it caches."""
    n = tiers.numel()
    total = header_len
    for i, widths in enumerate(layout.widths):
        first = layout.first(i, n)
        per = torch.bincount(tiers[first:].long(), minlength=len(Tier)).tolist()
        counts = {t: per[t] for t in Tier if t != Tier.DROP and per[t]}
        total += frame_size(n - first, counts, widths)
    return total


def placed_tiers(
    layout: Layout, n: int, budget: float | None, header_len: int,
    scores: torch.Tensor | None, plan: CodePlan,
) -> torch.Tensor:  # fmt: skip
    """`code_tiers` of a dropping `plan` with as few tokens dropped as fit `budget` for the
    placement `scores` give, counted exactly (`payload_size`). With sliding-window layers,
    `code_plan` bounds the worst placement (drops outside every window save nothing there);
    once the scores are known the real payload is often smaller, so the least important of
    the planned drops are sent at INT4 again while the payload still fits. Never more bytes
    than the plan's bound, never more drops than `plan.dropped`. Without sliding-window layers
    the bound is exact, and a plan that drops nothing has nothing to fit: its tiers are
    returned without a search (`scores` may then be None where `plan.needs_scores(n)` is not)."""
    if not plan.dropped or all(layout.first(i, n) == 0 for i in range(len(layout.widths))):
        return code_tiers(n, scores, plan)
    limit = budget * raw_kv_bytes(layout.consumer, n)

    def tiers(dropped: int) -> torch.Tensor:
        return code_tiers(n, scores, plan._replace(dropped=dropped))

    def fits(dropped: int) -> bool:
        return payload_size(layout, tiers(dropped), header_len) <= limit

    lo, hi = 0, plan.dropped  # the fewest drops that fit: the size falls as drops rise
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return tiers(lo)


def may_drop(layout: Layout, n: int, budget: float | None) -> bool:
    """Whether a payload of n tokens at `budget` may drop tokens, whatever its header's ids
    (counted at their longest): a receiver that needs every position (pages staged for all n)
    asks before it sends the request."""
    longest = ScdHeader(layout.producer, layout.consumer, layout.artifact, n,
                        payload_id=(1 << 63) - 1, tokens_digest=(1 << 64) - 1)  # fmt: skip
    try:
        return code_plan(layout, n, budget, len(header_bytes(longest))).dropped > 0
    except BudgetError:
        return True


def max_dropped(n: int) -> int:
    """How many of n tokens may be dropped: all but the first SINKS and the last."""
    return max(0, n - min(n, SINKS + 1))


def code_tiers(n: int, scores: torch.Tensor | None, plan: CodePlan) -> torch.Tensor:
    """Per-token tiers of a payload under `plan` (see `CodePlan`): all FP16 (`plan.int8` None),
    else the first SINKS at FP16, the `plan.int8` most important others at INT8 (by `scores`
    [n], higher = more important, the last token first), the `plan.dropped` least important
    dropped, the rest at INT4. `scores` may be None only where `plan.needs_scores(n)` is not."""
    if plan.int8 is None:
        return torch.full((n,), int(Tier.FP16), dtype=torch.uint8)
    sinks = min(SINKS, n)
    if plan.int8 + plan.dropped > n - sinks or plan.dropped > max_dropped(n):
        raise ValueError(f"plan {plan} for {n} tokens")
    t = torch.full((n,), int(Tier.INT4), dtype=torch.uint8)
    t[:sinks] = int(Tier.FP16)
    if scores is None:
        if plan.needs_scores(n):
            raise ValueError(f"plan {plan} for {n} tokens needs importance scores")
        t[sinks:] = int(Tier.INT8) if plan.int8 else int(Tier.INT4)
        return t
    s = scores.clone().float()
    s[-1] = float("inf")
    order = rank_order(s, sinks)[sinks:]  # the others, most important first
    t[order[: plan.int8]] = int(Tier.INT8)
    t[order[order.numel() - plan.dropped :]] = int(Tier.DROP)
    return t
