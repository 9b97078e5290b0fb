"""Transfer statistics through vLLM's connector-stats path (logged every interval) and its
Prometheus registry (`/metrics` of `vllm serve`).

Observations are per-transfer lists so the logger can aggregate across workers; sizes in bytes,
times in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

_LISTS = ("wire_bytes", "fp16_bytes", "seconds")
_COUNTS = ("send_failures", "load_failures")


def _empty() -> dict[str, Any]:
    return {**{k: [] for k in _LISTS}, **{k: 0 for k in _COUNTS}}


@dataclass
class SpectrumKVStats(KVConnectorStats):
    """Producer: one entry per pushed payload (`seconds`: score + encode + push until the
    receiver's verdict). Consumer: one entry per loaded payload (`seconds`: claim + write into
    the paged cache). Failure counters on both sides."""

    data: dict[str, Any] = field(default_factory=_empty)

    def record(self, wire_bytes: int, fp16_bytes: int, seconds: float) -> None:
        self.data["wire_bytes"].append(wire_bytes)
        self.data["fp16_bytes"].append(fp16_bytes)
        self.data["seconds"].append(seconds)

    def count(self, name: str) -> None:
        self.data[name] += 1

    def reset(self) -> None:
        self.data = _empty()

    def take(self) -> SpectrumKVStats | None:
        """The observations so far (None if there are none); this object starts empty again."""
        if self.is_empty():
            return None
        out = SpectrumKVStats(self.data)
        self.reset()
        return out

    def aggregate(self, other: KVConnectorStats) -> SpectrumKVStats:
        for k in _LISTS:
            self.data[k].extend(other.data.get(k, []))
        for k in _COUNTS:
            self.data[k] += other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        n = len(self.data["seconds"])
        wire, fp16 = sum(self.data["wire_bytes"]), sum(self.data["fp16_bytes"])
        return {
            "transfers": n,
            "wire_MB": round(wire / 1e6, 3),
            "wire_over_fp16": round(wire / fp16, 4) if fp16 else 0.0,
            "avg_ms": round(1e3 * sum(self.data["seconds"]) / n, 2) if n else 0.0,
            "send_failures": self.data["send_failures"],
            "load_failures": self.data["load_failures"],
        }

    def is_empty(self) -> bool:
        return not self.data["seconds"] and not any(self.data[k] for k in _COUNTS)


class SpectrumKVPromMetrics(KVConnectorPromMetrics):
    """vllm:spectrumkv_* counters and a latency histogram, one child per engine."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def counter(name: str, doc: str):
            metric = self._counter_cls(name=name, documentation=doc, labelnames=labelnames)
            return create_metric_per_engine(metric, per_engine_labelvalues)

        self.wire = counter("vllm:spectrumkv_wire_bytes", "KV payload bytes on the wire.")
        self.fp16 = counter(
            "vllm:spectrumkv_fp16_bytes", "Bytes the same KV would take uncompressed (16-bit)."
        )
        self.transfers = counter("vllm:spectrumkv_transfers", "KV payloads pushed or loaded.")
        self.failures = counter(
            "vllm:spectrumkv_failures", "Pushes or loads that failed (load failures recompute)."
        )
        hist = self._histogram_cls(
            name="vllm:spectrumkv_transfer_seconds",
            documentation="Producer: score+encode+push; consumer: claim+write, per payload.",
            buckets=[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            labelnames=labelnames,
        )
        self.seconds = create_metric_per_engine(hist, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        self.wire[engine_idx].inc(sum(d.get("wire_bytes", [])))
        self.fp16[engine_idx].inc(sum(d.get("fp16_bytes", [])))
        self.transfers[engine_idx].inc(len(d.get("seconds", [])))
        self.failures[engine_idx].inc(sum(d.get(k, 0) for k in _COUNTS))
        for s in d.get("seconds", []):
            self.seconds[engine_idx].observe(s)
