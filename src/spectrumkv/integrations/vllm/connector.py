"""SpectrumKVConnector: the facade vLLM loads (`kv_connector_module_path`).

vLLM builds one instance per role: SCHEDULER in the engine-core process, WORKER in each worker
process. This class only routes each call to the scheduler-side or worker-side object of the
configured kv_role (see scheduler.py, worker.py); every setting is checked here, at start-up, so
a configuration the connector cannot serve stops `vllm serve` with a clear message.

Supported: vLLM's CPU attention backend, one KV cache group (no sliding-window hybrids), tensor
and pipeline parallel size 1, 16-bit KV cache (kv_cache_dtype auto, bfloat16 model dtype).
Prefix caching and chunked prefill may stay at vLLM's defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ...config import PolicyConfig
from ...engines.hf import dir_fingerprint
from ...errors import BudgetError, ConfigError
from ...pipeline import new_header
from ...policy import plan
from ...wire import Fingerprint
from .config import ConnectorConfig
from .meta import SpectrumKVMetadata
from .scheduler import ConsumerScheduler, ProducerScheduler
from .stats import SpectrumKVPromMetrics, SpectrumKVStats
from .worker import ConsumerWorker, ProducerWorker, plan_no_drop

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

#: Prompt length at which the start-up budget check plans (tokens).
_CHECK_TOKENS = 1024


class SpectrumKVConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        cfg = ConnectorConfig.from_extra(ktc.kv_role, ktc.kv_connector_extra_config or {})
        _check_engine(vllm_config, kv_cache_config)
        fp = check_model(vllm_config.model_config.model)
        if cfg.role == "producer":
            _check_budget(fp, cfg.policy)
        self.cfg = cfg
        self.scheduler: ProducerScheduler | ConsumerScheduler | None = None
        self.worker: ProducerWorker | ConsumerWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = (
                ProducerScheduler(cfg) if cfg.role == "producer" else ConsumerScheduler(cfg)
            )
        else:
            self.worker = (
                ProducerWorker(cfg, fp) if cfg.role == "producer" else ConsumerWorker(cfg, fp)
            )

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        t = next(iter(kv_caches.values()))
        cache_dtype = self._vllm_config.cache_config.cache_dtype
        isa = _get_attn_isa(t.dtype, t.shape[2], t.shape[3] // 2, cache_dtype)
        self.worker.register(kv_caches, isa)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if isinstance(self.worker, ConsumerWorker):
            self.worker.load_all(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are synchronous and finish in start_load_kv

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs
    ) -> None:
        return  # the whole prompt is read from the paged cache in wait_for_save

    def wait_for_save(self) -> None:
        if isinstance(self.worker, ProducerWorker):
            self.worker.send_all(self._meta())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_errors() if isinstance(self.worker, ConsumerWorker) else set()

    def get_kv_connector_stats(self) -> SpectrumKVStats | None:
        return self.worker.stats.take() if self.worker is not None else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()

    def _meta(self) -> SpectrumKVMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, SpectrumKVMetadata)
        return meta

    # ---- scheduler side ----

    def on_new_request(self, request: Request) -> None:
        if isinstance(self.scheduler, ProducerScheduler):
            self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        if isinstance(self.scheduler, ConsumerScheduler):
            return self.scheduler.matched_tokens(request, num_computed_tokens)
        return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if isinstance(self.scheduler, ConsumerScheduler):
            self.scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_meta(scheduler_output)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        return False, self.scheduler.request_finished(request)

    # ---- stats ----

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> SpectrumKVStats:
        return SpectrumKVStats(data=data) if data is not None else SpectrumKVStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return SpectrumKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)


def _check_engine(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
    """Refuse, at start-up, engine settings the connector does not support."""
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise ConfigError("SpectrumKVConnector supports tensor/pipeline parallel size 1 only")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise ConfigError("SpectrumKVConnector needs kv_cache_dtype auto (a 16-bit KV cache)")
    if vllm_config.model_config.dtype != torch.bfloat16:
        raise ConfigError("SpectrumKVConnector needs --dtype bfloat16 (the CPU backend's KV dtype)")
    if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
        raise ConfigError(
            "SpectrumKVConnector supports models with one KV cache group (no sliding-window or "
            "hybrid attention layers)"
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ConfigError("SpectrumKVConnector supports vLLM's CPU backend in this release")


def check_model(path: str) -> Fingerprint:
    """The fingerprint of the model directory vLLM serves; ConfigError, at start-up, for a
    model with sliding-window layers (any kind: Gemma-3's mix or Mistral-style all-sliding)."""
    fp = dir_fingerprint(path, "bfloat16")
    if fp.sliding_layers:
        raise ConfigError(
            "SpectrumKVConnector does not support models with sliding-window layers yet "
            f"({len(fp.sliding_layers)} of {fp.n_layers} here): vLLM keeps their whole "
            "prompt when a connector is set, the wire format sends only the window"
        )
    return fp


def _check_budget(fp: Fingerprint, policy: PolicyConfig) -> None:
    """A budget below what the policy reaches without dropping tokens fails at start-up."""
    scores = torch.zeros(_CHECK_TOKENS)
    try:
        plan_no_drop(scores, new_header(fp, _CHECK_TOKENS, policy), policy)
    except BudgetError as e:
        int4 = PolicyConfig("uniform-int4", budget=None, quant=policy.quant)
        least = plan(scores, new_header(fp, _CHECK_TOKENS, int4), int4).wire_budget
        raise ConfigError(
            f"{e}; the smallest budget is about {least:.3f} (all INT4, {_CHECK_TOKENS}-token "
            "prompt)"
        ) from None
