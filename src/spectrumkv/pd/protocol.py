"""Messages between the decode and the prefill worker (msgspec JSON; never pickle)."""

from __future__ import annotations

import msgspec


class TransferOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How one request's KV travels. score_layers: plan from the first N layers (0 = all);
    link_gbps / link_latency_s: link emulation on the sender (0 = off); overlap: stream frames
    during prefill (False: send after prefill, as a pull-after-prefill connector does)."""

    policy: str = "spectrum"
    budget: float | None = 0.5
    score_layers: int = 0
    link_gbps: float = 0.0
    link_latency_s: float = 0.0
    overlap: bool = True


class PrefillRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Prefill `token_ids` (the prompt without its last token) and stream the KV back."""

    request_id: str
    token_ids: list[int]
    options: TransferOptions = TransferOptions()


class PrefillDone(msgspec.Struct):
    """Sent after the last frame. Times in seconds, sizes in bytes."""

    request_id: str
    prefill_s: float
    encode_s: float
    wire_s: float
    transfer_exposed_s: float
    wire_bytes: int
    fp16_bytes: int
    nominal_budget: float


class ErrorReply(msgspec.Struct):
    request_id: str
    error: str
    message: str


MAX_PROMPT_TOKENS = 1 << 20
encode = msgspec.json.encode


def with_overrides(defaults: TransferOptions, overrides: dict) -> TransferOptions:
    """Per-request options over server defaults; unknown keys and wrong types are refused."""
    merged = {**msgspec.structs.asdict(defaults), **overrides}
    return msgspec.convert(merged, TransferOptions)


def decode_request(body: bytes) -> PrefillRequest:
    req = msgspec.json.decode(body, type=PrefillRequest)
    if not req.token_ids or len(req.token_ids) > MAX_PROMPT_TOKENS:
        raise msgspec.ValidationError(f"prompt must have 1..{MAX_PROMPT_TOKENS} tokens")
    return req
