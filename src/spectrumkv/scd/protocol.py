"""The SCD request between a decode worker of model B and a prefill worker of model A (msgspec
JSON on the authenticated channel, message kind `Kind.SCD_REQUEST`; never pickle). The prefill
worker answers as for KV requests: HEADER, one FRAME per layer, DONE (`pd.protocol.PrefillDone`)
or ERROR (`pd.protocol.ErrorReply`)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from ..pd.protocol import MAX_PROMPT_TOKENS, LinkGbps, LinkLatency, ScoreLayers
from ..wire import Fingerprint

CodeBudget = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]


class ScdRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Prefill `token_ids` on A and stream SCD codes for `consumer` made with the artifact of
    digest `artifact`. `code_budget`: None = FP16 codes; else codes quantized (INT8 for the
    most important tokens, INT4 for the rest, scored on the first `score_layers` layers; below
    all-INT4 the least important dropped, `budget.code_plan`) so that the payload, every byte
    counted, is at most this fraction of B's raw FP16 KV bytes.
    Link emulation and `overlap` as in `pd.protocol.TransferOptions`."""

    request_id: str
    token_ids: list[int]
    artifact: str
    consumer: Fingerprint
    code_budget: CodeBudget | None = None
    score_layers: ScoreLayers = 4
    link_gbps: LinkGbps = 0.0
    link_latency_s: LinkLatency = 0.0
    overlap: bool = True


def decode_request(body: bytes) -> ScdRequest:
    """Parse an SCD request; msgspec.ValidationError for a bad one."""
    req = msgspec.json.decode(body, type=ScdRequest)
    if not req.token_ids or len(req.token_ids) > MAX_PROMPT_TOKENS:
        raise msgspec.ValidationError(f"prompt must have 1..{MAX_PROMPT_TOKENS} tokens")
    if not 0 < len(req.artifact) <= 128:
        raise msgspec.ValidationError("artifact digest must have 1..128 characters")
    return req
