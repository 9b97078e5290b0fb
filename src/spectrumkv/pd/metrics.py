"""Prometheus metrics of the decode worker (its own registry, served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self._wire_total = self._fp16_total = 0  # for the ratio gauge (bytes)
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "spectrumkv_requests", "Completion requests by outcome", ["outcome"], registry=r
        )
        self.wire_bytes = Counter("spectrumkv_wire_bytes", "KV payload bytes received", registry=r)
        self.fp16_bytes = Counter(
            "spectrumkv_fp16_bytes", "FP16 size of the KV caches received", registry=r
        )
        self.wire_ratio = Gauge(
            "spectrumkv_wire_ratio", "wire bytes / FP16 bytes since start", registry=r
        )
        self.in_flight = Gauge("spectrumkv_in_flight", "requests in flight", registry=r)
        self.stage = Histogram(
            "spectrumkv_stage_seconds",
            "per-stage latency: prefill, encode, transfer_exposed, unpack, ttft",
            ["stage"],
            buckets=_BUCKETS,
            registry=r,
        )

    def record_transfer(self, wire: int, fp16: int) -> None:
        self.wire_bytes.inc(wire)
        self.fp16_bytes.inc(fp16)
        self._wire_total += wire
        self._fp16_total += fp16
        if self._fp16_total:
            self.wire_ratio.set(self._wire_total / self._fp16_total)
