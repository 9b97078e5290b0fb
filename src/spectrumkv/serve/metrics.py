"""Prometheus metrics of the batch engine, in a decode worker's registry: per step batch size,
route, step time and tokens; pool pages used/free/reserved, queue length and active requests
as they are when scraped. `read` parses a worker's /metrics back (for the demo and benchmarks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from ..pd.client import get_text
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
    peak = Gauge("spectrumkv_engine_pages_peak", "most pool pages in use at a decode step since "
                 "start (a high-water mark that a scrape between steps cannot miss)",
                 registry=registry)  # fmt: skip
    queue = Gauge("spectrumkv_engine_queue", "requests waiting for KV pages", registry=registry)
    active = Gauge("spectrumkv_engine_active", "requests decoding", registry=registry)
    # read when scraped, so an idle engine reports its pool as it is (0 used after a drain)
    pages.labels("used").set_function(lambda: engine.total_pages - engine.cache.free_pages)
    pages.labels("free").set_function(lambda: engine.cache.free_pages)
    pages.labels("reserved").set_function(lambda: engine.load()["pages_reserved"])
    queue.set_function(lambda: engine.load()["queued"])
    active.set_function(lambda: engine.load()["active"])

    most = 0  # pages in use at the busiest step so far

    def on_step(n: int, seconds: float, route: str) -> None:
        batch.observe(n)
        step.observe(seconds)
        routes.labels(route).inc()
        tokens.inc(n)
        rate.set(n / seconds if seconds > 0 else 0)
        nonlocal most
        most = max(most, engine.total_pages - engine.cache.free_pages)
        peak.set(most)

    engine.on_step = on_step


def read(url: str) -> dict[str, float]:
    """A worker's /metrics as {sample: value}; a labelled sample is keyed `name{k=v,...}`,
    e.g. `spectrumkv_engine_pages{state=used}`."""
    out = {}
    for family in text_string_to_metric_families(get_text(url, "/metrics")):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out
