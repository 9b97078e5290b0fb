"""Prometheus metrics of the batch engine, in a decode worker's registry: per step batch size,
route, step time and tokens; pool pages used/free/reserved and queue length after each step."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .engine import BatchEngine

_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def attach(engine: BatchEngine, registry: CollectorRegistry) -> None:
    """Register the engine's metrics in `registry` and update them from its step hook."""
    batch = Histogram("spectrumkv_engine_batch_size", "requests per decode step",
                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)  # fmt: skip
    step = Histogram("spectrumkv_engine_step_seconds", "decode step time",
                     buckets=_STEP_BUCKETS, registry=registry)  # fmt: skip
    routes = Counter("spectrumkv_engine_route_steps", "decode steps by attention route",
                     ["route"], registry=registry)  # fmt: skip
    tokens = Counter("spectrumkv_engine_tokens", "tokens generated", registry=registry)
    rate = Gauge("spectrumkv_engine_tokens_per_second", "batch / step time of the last step",
                 registry=registry)  # fmt: skip
    pages = Gauge("spectrumkv_engine_pages", "KV pool pages", ["state"], registry=registry)
    queue = Gauge("spectrumkv_engine_queue", "requests waiting for KV pages", registry=registry)
    active = Gauge("spectrumkv_engine_active", "requests decoding", registry=registry)

    def on_step(n: int, seconds: float, route: str) -> None:
        batch.observe(n)
        step.observe(seconds)
        routes.labels(route).inc()
        tokens.inc(n)
        rate.set(n / seconds if seconds > 0 else 0)
        load = engine.load()
        pages.labels("used").set(load["pages_total"] - load["pages_free"])
        pages.labels("free").set(load["pages_free"])
        pages.labels("reserved").set(load["pages_reserved"])
        queue.set(load["queued"])
        active.set(load["active"])

    engine.on_step = on_step
