"""Scheduler side of the connector: decides, per step, which prompts the worker pushes
(producer) or loads (consumer). Runs in vLLM's engine-core process; touches no tensors.

Producer: a request carrying a transfer id is tracked while its prompt is prefilled (chunked
prefill spreads it over several steps; prefix-cache hits are already in its blocks). In the step
that computes its last prompt token, the worker is told to push all prompt positions.

Consumer: a request carrying a transfer id and `spectrumkv_load` asks to load every prompt
position but the last (vLLM computes at least one token itself, which gives the first logits),
beyond what its local prefix cache already holds. Loads are synchronous: the proxy sends the
decode request only after the prefill instance answered, and the producer answers only after
the consumer has verified the payload, so the payload is waiting when the step starts. A
request is loaded at most once; after a preemption it recomputes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...config import PolicyConfig
from ...errors import SpectrumKVError
from ...wire import tokens_digest
from .config import BUDGET, LOAD, TRANSFER_ID, ConnectorConfig
from .meta import LoadReq, SendReq, SpectrumKVMetadata

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger("spectrumkv.vllm")


@dataclass
class _Prefill:
    transfer_id: str
    token_ids: list[int]
    budget: float | None
    error: str
    block_ids: list[int]


class ProducerScheduler:
    def __init__(self, cfg: ConnectorConfig) -> None:
        self.cfg = cfg
        self._tracked: dict[str, _Prefill] = {}

    def on_new_request(self, request: Request) -> None:
        params = request.kv_transfer_params or {}
        transfer_id = params.get(TRANSFER_ID)
        if not transfer_id:
            return
        budget, error = params.get(BUDGET), ""
        if budget is not None:
            try:
                PolicyConfig(self.cfg.policy.name, budget=float(budget))
            except (SpectrumKVError, TypeError, ValueError) as e:
                error = f"bad per-request budget {budget!r}: {e}"
        prompt = list(request.prompt_token_ids or [])
        self._tracked[request.request_id] = _Prefill(str(transfer_id), prompt, budget, error, [])

    def build_meta(self, so: SchedulerOutput) -> SpectrumKVMetadata:
        meta = SpectrumKVMetadata()
        progress: list[tuple[str, int]] = []
        for new in so.scheduled_new_reqs:
            if (p := self._tracked.get(new.req_id)) is not None:
                p.block_ids = list(new.block_ids[0])
                progress.append((new.req_id, new.num_computed_tokens))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if (p := self._tracked.get(req_id)) is None:
                continue
            blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                p.block_ids = list(blocks[0]) if blocks else []
            elif blocks:
                p.block_ids.extend(blocks[0])
            progress.append((req_id, cached.num_computed_tokens[i]))
        for req_id, computed in progress:
            p = self._tracked[req_id]
            if computed + so.num_scheduled_tokens.get(req_id, 0) >= len(p.token_ids):
                meta.sends.append(
                    SendReq(req_id, p.transfer_id, p.token_ids, p.block_ids, p.budget, p.error)
                )
                del self._tracked[req_id]
        return meta

    def request_finished(self, request: Request) -> dict[str, Any] | None:
        params = request.kv_transfer_params or {}
        if self._tracked.pop(request.request_id, None) is not None:
            log.warning("request %s finished before its prompt was pushed", request.request_id)
        if not params.get(TRANSFER_ID):
            return None
        return {TRANSFER_ID: params[TRANSFER_ID], "spectrumkv_n_tokens": request.num_prompt_tokens}


@dataclass
class _Load:
    transfer_id: str
    start: int
    end: int
    n_prompt: int
    digest: int


class ConsumerScheduler:
    def __init__(self, cfg: ConnectorConfig) -> None:
        self.cfg = cfg
        self._starts: dict[str, int] = {}
        self._pending: dict[str, _Load] = {}
        self._loaded: set[str] = set()

    def matched_tokens(self, request: Request, num_computed: int) -> tuple[int, bool]:
        params = request.kv_transfer_params or {}
        if not (params.get(TRANSFER_ID) and params.get(LOAD)):
            return 0, False
        if request.request_id in self._loaded:
            return 0, False  # loaded once already (then preempted): recompute
        count = request.num_prompt_tokens - 1 - num_computed
        if count <= 0:
            return 0, False
        self._starts[request.request_id] = num_computed
        return count, False

    def after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external: int) -> None:
        start = self._starts.pop(request.request_id, None)
        if num_external <= 0 or start is None:
            return
        prompt = list(request.prompt_token_ids or [])
        self._pending[request.request_id] = _Load(
            str(request.kv_transfer_params[TRANSFER_ID]),
            start,
            start + num_external,
            len(prompt),
            tokens_digest(prompt),
        )

    def build_meta(self, so: SchedulerOutput) -> SpectrumKVMetadata:
        meta = SpectrumKVMetadata()
        blocks: dict[str, list[int]] = {
            n.req_id: list(n.block_ids[0]) for n in so.scheduled_new_reqs
        }
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id in cached.resumed_req_ids and cached.new_block_ids[i]:
                blocks[req_id] = list(cached.new_block_ids[i][0])
        for req_id in [r for r in self._pending if r in blocks]:
            ld = self._pending.pop(req_id)
            meta.loads.append(
                LoadReq(
                    req_id, ld.transfer_id, blocks[req_id], ld.start, ld.end, ld.n_prompt, ld.digest
                )
            )
            self._loaded.add(req_id)
        return meta

    def request_finished(self, request: Request) -> None:
        for table in (self._starts, self._pending):
            table.pop(request.request_id, None)
        self._loaded.discard(request.request_id)
