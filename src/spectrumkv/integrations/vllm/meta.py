"""What the scheduler-side connector tells the worker-side connector each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class SendReq:
    """Producer: push the first `n_tokens` prompt positions of a finished prefill.
    `error`: the request cannot be sent (e.g. a bad per-request budget); push a failure notice
    so the consumer recomputes at once instead of waiting out its deadline."""

    req_id: str
    transfer_id: str
    token_ids: list[int]
    block_ids: list[int]
    budget: float | None
    error: str = ""


@dataclass
class LoadReq:
    """Consumer: write prompt positions [start, end) of a received payload into `block_ids`.
    The payload must cover exactly `n_prompt` tokens whose digest is `digest`."""

    req_id: str
    transfer_id: str
    block_ids: list[int]
    start: int
    end: int
    n_prompt: int
    digest: int


@dataclass
class SpectrumKVMetadata(KVConnectorMetadata):
    sends: list[SendReq] = field(default_factory=list)
    loads: list[LoadReq] = field(default_factory=list)
