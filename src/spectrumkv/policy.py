"""Budget -> tier map, with exact byte accounting.

A plan assigns every (layer, token) a Tier. Policies here are per-token: one tier per token,
shared by all layers that hold the token (sliding-window layers hold only the recent window).
The dropped set is therefore the same in every layer, which is what the wire format requires.

Budget accounting (`PolicyConfig.budget_mode`):
- `wire`: bytes of the whole payload (preamble, header, checksums, frame heads, tier maps,
  codes, scales, minima) <= budget * bytes of the FP16 cache of the same slots.
- `nominal`: the paper's mean per-token cost (FP16 1, INT8 1/2, INT4 1/4, drop 0) <= budget.
Budget 1.0 is the uncompressed reference: every token FP16, whatever the policy; the header and
tier maps are then its only overhead, reported in `Plan.wire_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PolicyConfig
from .errors import BudgetError
from .kv import first_slot
from .quant import section_bytes
from .tiers import NOMINAL_COST, STORED_TIERS, TIER_ERROR, Tier
from .wire import Fingerprint, Header, frame_overhead, frame_size, header_bytes

#: The precision ladder (floor first) each greedy policy climbs.
_LADDERS = {
    "spectrum": (Tier.INT4, Tier.INT8, Tier.FP16),
    "random-tier": (Tier.INT4, Tier.INT8, Tier.FP16),
    "spectrum-2tier": (Tier.INT8, Tier.FP16),
    "snapkv-drop": (Tier.FP16,),
}
_UNIFORM = {"uniform-int8": Tier.INT8, "uniform-int4": Tier.INT4, "fp16": Tier.FP16}
#: KIVI's residual: the most recent tokens stay at full precision.
KIVI_RECENT = 32
#: Policies whose plan never reads the importance scores (see `reads_scores`).
_SCORELESS = {"kivi2", "pdtrim", "sink-protect", "random-tier", *_UNIFORM}


def reads_scores(policy: PolicyConfig) -> bool:
    """Whether `plan` reads the scores under this policy. At budget 1.0 every policy keeps every
    token at FP16, and the policies in `_SCORELESS` place tokens by position or by a seed, so
    scoring (a pass over every layer's keys) can be skipped and a stream can start at layer 0."""
    return policy.budget != 1.0 and policy.name not in _SCORELESS


@dataclass
class Plan:
    """tiers: [n_layers, n_tokens] uint8 Tier codes; `present` marks the slots each layer holds
    (a sliding-window layer holds only its window; other slots are DROP and never sent).

    wire_bytes: exact size of the encoded payload in bytes. fp16_bytes: size of the FP16 cache of
    the same slots (K and V, 2 bytes per element). nominal_budget: the paper's mean slot cost.
    """

    tiers: torch.Tensor
    present: torch.Tensor
    wire_bytes: int
    fp16_bytes: int
    nominal_budget: float

    @property
    def wire_budget(self) -> float:
        return self.wire_bytes / self.fp16_bytes if self.fp16_bytes else 0.0

    def counts(self) -> dict[str, int]:
        """Number of held (layer, token) slots per tier."""
        held = self.tiers[self.present]
        return {t.name: int((held == int(t)).sum()) for t in Tier}


def kv_firsts(fp: Fingerprint, n_tokens: int) -> list[int]:
    """Per layer, the first prompt position a model of fingerprint `fp` caches after
    prefilling n_tokens (`kv.first_slot`)."""
    return [
        first_slot(fp.is_sliding(layer), fp.sliding_window, n_tokens)
        for layer in range(fp.n_layers)
    ]


def layer_firsts(header: Header) -> list[int]:
    return kv_firsts(header.fingerprint, header.n_tokens)


def raw_kv_bytes(fp: Fingerprint, n_tokens: int) -> int:
    """Bytes of a raw FP16 KV cache of n_tokens for a model of fingerprint `fp`: the rows each
    layer caches (a sliding-window layer its window's)."""
    slots = sum(n_tokens - f for f in kv_firsts(fp, n_tokens))
    return slots * 2 * fp.n_kv_heads * fp.head_dim * 2


def fp16_bytes(header: Header) -> int:
    return raw_kv_bytes(header.fingerprint, header.n_tokens)


def wire_bytes(header: Header, tiers: torch.Tensor) -> int:
    """Exact payload size for a [n_layers, n_tokens] tier map (mirrors wire.frame_bytes)."""
    total = len(header_bytes(header))
    for layer, first in enumerate(layer_firsts(header)):
        row = tiers[layer, first:]
        counts = {t: int((row == int(t)).sum()) for t in STORED_TIERS}
        total += frame_size(row.numel(), counts, header.fingerprint, header.quant)
    return total


def _slot_bytes(header: Header, tier: Tier) -> float:
    """Wire bytes of one (layer, token) slot at `tier`, K and V; for kivi (fixed rate) the key
    parameters shared by a block of tokens are amortized over the block."""
    fp, q = header.fingerprint, header.quant  # the header says how tokens will be encoded
    g = q.group_size if q.scheme == "kivi" else 1
    return section_bytes(tier, g, fp.n_kv_heads, fp.head_dim, q) / g


def plan(
    scores: torch.Tensor,
    header: Header,
    policy: PolicyConfig,
    layer_scores: torch.Tensor | None = None,
) -> Plan:
    """Assign tiers to the header's n_tokens tokens.

    scores: [n_tokens], higher = more important. layer_scores: [n_layers, n_tokens] per-layer
    importance, required by `spectrum-layer`. Raises BudgetError if no plan of this policy fits.
    """
    n, n_layers = header.n_tokens, header.fingerprint.n_layers
    if scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},), got {tuple(scores.shape)}")
    firsts = torch.tensor(layer_firsts(header))
    present = torch.arange(n)[None, :] >= firsts[:, None]  # [L, n]
    costs = _token_costs(header, policy, present.sum(0))
    avail = _available(header, policy, present.sum(0))
    sinks = min(policy.sinks, n)

    if policy.name == "kivi2" and policy.budget != 1.0:
        token_tiers = torch.full((n,), int(Tier.INT2), dtype=torch.uint8)
        token_tiers[max(0, n - KIVI_RECENT) :] = int(Tier.FP16)
        if policy.budget is not None:
            _require_fits(costs, token_tiers, avail, policy)
    elif policy.budget == 1.0 or policy.name in _UNIFORM:
        tier = Tier.FP16 if policy.budget == 1.0 else _UNIFORM[policy.name]
        token_tiers = torch.full((n,), int(tier), dtype=torch.uint8)
        if policy.budget is not None and policy.budget < 1.0:
            _require_fits(costs, token_tiers, avail, policy)
    elif policy.name == "pdtrim":
        token_tiers = _pdtrim(costs, avail, policy.pdtrim_fr, n)
    elif policy.name == "sink-protect":
        token_tiers = _sink_protect(costs, avail, sinks, n)
    elif policy.name == "spectrum-opt":
        token_tiers = rate_distortion(scores, costs, avail, _first(n, sinks))
    else:
        if policy.name == "random-tier":
            g = torch.Generator().manual_seed(policy.seed)
            scores = torch.rand(n, generator=g)
        ladder = _LADDERS["spectrum" if policy.name == "spectrum-layer" else policy.name]
        token_tiers = greedy(rank_order(scores, sinks), costs, ladder, avail, _first(n, sinks))

    tiers = token_tiers[None, :].repeat(n_layers, 1)
    if policy.name == "spectrum-layer" and policy.budget != 1.0:
        if layer_scores is None or layer_scores.shape != (n_layers, n):
            raise ValueError("spectrum-layer needs per-layer scores [n_layers, n_tokens]")
        tiers = _per_layer(layer_scores, tiers, present, header, policy, avail, sinks)
    tiers[~present] = int(Tier.DROP)
    nominal_cost = torch.tensor([NOMINAL_COST[t] for t in Tier])[tiers.long()]
    nominal = float(nominal_cost[present].mean()) if n else 0.0
    return Plan(tiers, present, wire_bytes(header, tiers), fp16_bytes(header), nominal)


def _first(n: int, k: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:k] = True
    return mask


def _per_layer(
    layer_scores: torch.Tensor,
    token_tiers: torch.Tensor,
    present: torch.Tensor,
    header: Header,
    policy: PolicyConfig,
    avail: float,
    sinks: int,
) -> torch.Tensor:
    """Re-allocate precision per (layer, token) under the same budget.

    The dropped set stays the per-token one (the wire format wants one dropped set); every kept
    (layer, token) slot is ranked by that layer's own score (comparable across layers, see
    importance.attention_scores), sinks first in every layer, and the greedy runs over all
    slots at once: a layer whose attention is concentrated keeps few slots at high precision,
    a diffuse layer keeps more.
    """
    n_layers, n = layer_scores.shape
    kept = present & (token_tiers != int(Tier.DROP))
    s = layer_scores.clone().float()
    s[~kept] = float("-inf")
    flat = s.flatten()
    costs = torch.zeros(len(Tier), n_layers * n, dtype=torch.float64)
    for t in Tier:
        if policy.budget_mode == "nominal":
            costs[t] = NOMINAL_COST[t] * kept.flatten().double() / n_layers
        else:
            costs[t] = _slot_bytes(header, t) * kept.flatten().double()
    is_sink = torch.zeros(n_layers, n, dtype=torch.bool)
    is_sink[:, :sinks] = True
    is_sink &= kept
    flat[is_sink.flatten()] = float("inf")
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[kept.flatten()[order]]
    out = greedy(order, costs, _LADDERS["spectrum"], avail, is_sink.flatten())
    out[~kept.flatten()] = int(Tier.DROP)
    return out.view(n_layers, n)


def rank_order(scores: torch.Tensor, sinks: int) -> torch.Tensor:
    """Token indices from most to least important; the first `sinks` positions come first."""
    s = scores.clone().float()
    s[: min(sinks, s.numel())] = float("inf")
    return torch.sort(s, descending=True, stable=True).indices


def _token_costs(header: Header, policy: PolicyConfig, present: torch.Tensor) -> torch.Tensor:
    """[len(Tier), n] cost of each token at each tier in the policy's budget unit."""
    out = torch.zeros(len(Tier), present.numel(), dtype=torch.float64)
    for t in Tier:
        if policy.budget_mode == "nominal":
            out[t] = NOMINAL_COST[t]
        else:
            out[t] = present.double() * _slot_bytes(header, t)
    return out


def _available(header: Header, policy: PolicyConfig, present: torch.Tensor) -> float:
    """Budget left for token data, in the policy's unit; raises if overhead alone exceeds it."""
    if policy.budget is None:
        return float("inf")
    if policy.budget_mode == "nominal":
        return policy.budget * present.numel()
    overhead = len(header_bytes(header)) + sum(
        frame_overhead(header.n_tokens - f) for f in layer_firsts(header)
    )
    avail = policy.budget * fp16_bytes(header) - overhead
    if avail < 0 and policy.budget < 1.0:
        raise BudgetError(
            f"budget {policy.budget} allows {int(policy.budget * fp16_bytes(header))} bytes, "
            f"less than the {overhead} bytes of headers and tier maps alone"
        )
    return avail


def _cost(costs: torch.Tensor, token_tiers: torch.Tensor) -> float:
    return float(costs.gather(0, token_tiers.long()[None, :]).sum())


def _require_fits(costs: torch.Tensor, token_tiers: torch.Tensor, avail: float, policy) -> None:
    need = _cost(costs, token_tiers)
    if need > avail + 1e-9:
        raise BudgetError(
            f"policy {policy.name!r} is fixed-rate and needs more than budget {policy.budget}; "
            "pass budget=None to use it at its own rate"
        )


def greedy(
    order: torch.Tensor,
    costs: torch.Tensor,
    ladder: tuple[Tier, ...],
    avail: float,
    is_sink: torch.Tensor,
) -> torch.Tensor:
    """The SpectrumKV greedy allocator over items (tokens, or (layer, token) slots).

    `order`: the items to allocate, most important first (items not in it stay at DROP unless
    they are sinks). Sinks (`is_sink`) start at INT8 (or the ladder's top if lower), everything
    else at the ladder's floor; INT8 is lossless in practice (measured: uniform INT8 keeps greedy
    output), so spending FP16 bytes on sinks first only pushes other tokens down to INT4.
    If that is over budget, the least important non-sink tokens are dropped (sinks fall to
    the floor only if they alone do not fit). Otherwise tokens are promoted one level at a time in
    importance order while the budget lasts. Result: tiers are monotone in importance.
    """
    floor = ladder[0]
    sink_tier = min(ladder[-1], max(floor, Tier.INT8))
    tiers = torch.full((is_sink.numel(),), int(Tier.DROP), dtype=torch.uint8)
    tiers[order] = int(floor)
    tiers[is_sink] = int(sink_tier)
    ranked = order[~is_sink[order]]  # non-sinks, most important first

    used = _cost(costs, tiers)
    if used > avail:
        if _cost(costs, tiers.masked_fill(~is_sink, int(Tier.DROP))) > avail:
            tiers[is_sink] = int(floor)
        rev = ranked.flip(0)
        cum = torch.cumsum(costs[int(floor), rev], 0)
        need = _cost(costs, tiers) - avail
        if need > 0:
            k = int(torch.searchsorted(cum, torch.tensor([need], dtype=cum.dtype)))
            if k >= rev.numel():
                sink_cost = _cost(costs, tiers.masked_fill(~is_sink, int(Tier.DROP)))
                raise BudgetError(
                    f"budget leaves {avail:.0f} units for tokens; the {int(is_sink.sum())} sink "
                    f"tokens alone need {sink_cost:.0f}"
                )
            tiers[rev[: k + 1]] = int(Tier.DROP)
        return tiers

    slack = avail - used
    for cur, nxt in zip(ladder, ladder[1:], strict=False):
        cand = order[tiers[order] == int(cur)]
        if cand.numel() == 0:
            continue
        cum = torch.cumsum(costs[int(nxt), cand] - costs[int(cur), cand], 0)
        k = int((cum <= slack + 1e-9).sum())
        tiers[cand[:k]] = int(nxt)
        if k:
            slack -= float(cum[k - 1])
        if k < cand.numel():
            break
    return tiers


def rate_distortion(
    scores: torch.Tensor, costs: torch.Tensor, avail: float, is_sink: torch.Tensor
) -> torch.Tensor:
    """Importance-weighted rate-distortion allocation over every tier, drop included.

    Minimizes sum_i w_i * TIER_ERROR[t_i] subject to sum_i cost_i(t_i) <= avail, with w_i the
    token's importance (shifted to be >= 0), by bisection on the Lagrange multiplier: each token
    independently takes argmin_t w_i * err(t) + lam * cost_i(t). Unlike the level-by-level greedy,
    this decides per token whether INT2 is worth its bytes or the token is better dropped and the
    bytes spent on a more important token. Sinks are never below INT8. Tiers are monotone in
    importance when tokens cost the same.
    """
    err = torch.tensor([TIER_ERROR[t] for t in Tier], dtype=torch.float64)
    finite = scores[torch.isfinite(scores)]
    lo_s = float(finite.min()) if finite.numel() else 0.0
    hi_s = float(finite.max()) if finite.numel() else 1.0
    w = torch.nan_to_num(scores.double() - lo_s, posinf=2 * (hi_s - lo_s) + 1.0)
    w = w + 1e-9 * max(hi_s - lo_s, 1e-12)
    c = costs.double()  # [len(Tier), n]
    allowed = torch.ones(len(Tier), scores.numel(), dtype=torch.bool)
    allowed[: int(Tier.INT8), is_sink] = False

    def assign(lam: float) -> tuple[torch.Tensor, float]:
        obj = w[None, :] * err[:, None] + lam * c
        obj = obj.masked_fill(~allowed, float("inf"))
        t = obj.argmin(0)
        return t.to(torch.uint8), float(c.gather(0, t[None, :]).sum())

    t, cost = assign(0.0)
    if cost <= avail:
        return t
    t, cost = assign(1e30)
    if cost > avail:
        raise BudgetError(
            f"budget leaves {avail:.0f} units; the sinks alone at INT8 need {cost:.0f}"
        )
    lo, hi = 0.0, 1.0
    while assign(hi)[1] > avail:
        hi *= 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if assign(mid)[1] > avail:
            lo = mid
        else:
            hi = mid
    return assign(hi)[0]


def _pdtrim(costs: torch.Tensor, avail: float, fr: float, n: int) -> torch.Tensor:
    """PDTrim: keep the first floor(k*fr) and the last k - floor(k*fr) tokens at FP16, drop the
    rest; k is the largest count that fits the budget."""

    def tiers_for(k: int) -> torch.Tensor:
        t = torch.full((n,), int(Tier.DROP), dtype=torch.uint8)
        head = int(k * fr)
        t[:head] = int(Tier.FP16)
        if k - head:
            t[n - (k - head) :] = int(Tier.FP16)
        return t

    lo, hi = 0, n  # invariant: tiers_for(lo) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _cost(costs, tiers_for(mid)) <= avail + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0 and n > 0:
        raise BudgetError("budget too small for PDTrim to keep a single token at FP16")
    return tiers_for(lo)


def _sink_protect(costs: torch.Tensor, avail: float, sinks: int, n: int) -> torch.Tensor:
    """SinkProtect baseline: sinks at FP16, every other token at one uniform tier (INT8 if it
    fits, else INT4); below that, the oldest non-sink tokens are dropped (sinks + recent)."""
    sinks = min(sinks, n)
    for tier in (Tier.INT8, Tier.INT4):
        t = torch.full((n,), int(tier), dtype=torch.uint8)
        t[:sinks] = int(Tier.FP16)
        if _cost(costs, t) <= avail + 1e-9:
            return t
    recency = torch.cat([torch.arange(sinks), torch.arange(n - 1, sinks - 1, -1)])
    return greedy(recency, costs, (Tier.INT4,), avail, _first(n, sinks))
