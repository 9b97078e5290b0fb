"""Messages between the decode and the prefill worker (msgspec JSON; never pickle), and the one
place that turns transfer options into the library's validated configs.

Both workers decode `TransferOptions` with the same bounds (msgspec `Meta`), so a value out of
range is refused by whichever side reads it first; `policy_configs` then builds the library's
`PolicyConfig` / `ScoreConfig`, whose `ConfigError` / `BudgetError` name what is wrong.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from ..config import PolicyConfig, QuantConfig, ScoreConfig
from ..errors import ConfigError

#: Link emulation bounds (per request and per server). A rate of 0 means unshaped; a slower
#: rate than MIN_LINK_GBPS or a latency above MAX_LINK_LATENCY_S could park a transfer for
#: longer than any deadline, so they are refused.
MIN_LINK_GBPS = 0.001
MAX_LINK_GBPS = 10_000.0
MAX_LINK_LATENCY_S = 10.0
MAX_SCORE_LAYERS = 4096

LinkGbps = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_LINK_GBPS)]
LinkLatency = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_LINK_LATENCY_S)]
ScoreLayers = Annotated[int, msgspec.Meta(ge=0, le=MAX_SCORE_LAYERS)]


class TransferOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one request's KV travels. policy / budget: see `config.PolicyConfig` (budget None =
    a fixed-rate policy at its own rate). score_layers: plan from the first N layers (0 = all);
    link_gbps (Gbit/s, 0 = unshaped, else >= MIN_LINK_GBPS) / link_latency_s (seconds, one-way,
    <= MAX_LINK_LATENCY_S): link emulation on the sender; overlap: stream frames during prefill
    (False: send after prefill, as a pull-after-prefill connector does)."""

    policy: str = "spectrum"
    budget: float | None = 0.5
    score_layers: ScoreLayers = 0
    link_gbps: LinkGbps = 0.0
    link_latency_s: LinkLatency = 0.0
    overlap: bool = True


class PrefillRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Prefill `token_ids` (the prompt without its last token) and stream the KV back."""

    request_id: str
    token_ids: list[int]
    options: TransferOptions = TransferOptions()


class PrefillDone(msgspec.Struct):
    """Sent after the last frame. Times in seconds, sizes in bytes. prefill_s: from when the
    prefill thread took the request; queued_s: the wait for that thread before it."""

    request_id: str
    prefill_s: float
    encode_s: float
    wire_s: float
    transfer_exposed_s: float
    wire_bytes: int
    fp16_bytes: int
    nominal_budget: float
    queued_s: float = 0.0


class ErrorReply(msgspec.Struct):
    """`error`: the exception's class name (e.g. BudgetError); `message`: why."""

    request_id: str
    error: str
    message: str


MAX_PROMPT_TOKENS = 1 << 20
encode = msgspec.json.encode


def policy_configs(opt: TransferOptions) -> tuple[PolicyConfig, ScoreConfig]:
    """The library configs for `opt`. Raises ConfigError /
    BudgetError (both ValueError) naming the bad value: unknown policy, budget outside (0, 1],
    a budgeted policy without a budget, a link rate below MIN_LINK_GBPS, or `spectrum-layer`
    (which needs every layer's scores) with score_layers other than 0 (all)."""
    if 0 < opt.link_gbps < MIN_LINK_GBPS:
        raise ConfigError(f"link_gbps must be 0 (unshaped) or >= {MIN_LINK_GBPS}")
    quant = QuantConfig(scheme="kivi") if opt.policy == "kivi2" else QuantConfig()
    policy = PolicyConfig(opt.policy, budget=opt.budget, quant=quant)
    if policy.name == "spectrum-layer" and opt.score_layers:
        raise ConfigError("policy 'spectrum-layer' needs every layer's scores: score_layers 0")
    return policy, ScoreConfig(layers=opt.score_layers)


def decode_request(body: bytes) -> PrefillRequest:
    req = msgspec.json.decode(body, type=PrefillRequest)
    if not req.token_ids or len(req.token_ids) > MAX_PROMPT_TOKENS:
        raise msgspec.ValidationError(f"prompt must have 1..{MAX_PROMPT_TOKENS} tokens")
    return req
