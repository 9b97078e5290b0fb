"""`spectrumkv bench attention`: decode tokens/s of every route, and the anchors, on seeded
length mixes (traces.py), against the memory-bandwidth limit measured in the same run.

For each shape x page size x trace x batch x seed: a page pool (pages shuffled) holding the
batch in a ring of layers sized so one pass reads well over the L3 cache where memory allows.
The routes are timed in `reps` interleaved rounds on the same data: each round runs every route
once, in an order rotated from round to round, each time one untimed call (wakes its threads,
ours or torch's OpenMP ones; a whole untimed pass when the previous route was of another family
-- vLLM's own page copy, the torch routes' gathers -- so each starts from its data as warm as
after one of its own family) and then one timed pass over the ring (each layer one
decode-attention call, planning included: every memoized plan is cleared before every pass, so
`adaptive` plans once per pass; wall time around the calls, the same for every route).
`adaptive_timing` says how adaptive is called, and is recorded with it: "per-step" (default;
what serve/runner.py does) times `routes.plan` once at the start of the pass and passes the
chosen route to every layer's call; an engine plans once per model step, so the pass is
charged the plan's measured time x (layers in the pass / the model's layers, MODEL_LAYERS), at
most once (a ring of one 540 MB layer at batch 32 would otherwise pay a whole step's plan, ~0.5
ms, on every layer; `plan_ms` records the plan's own time); "per-layer" calls
`run_route(route="adaptive")` on every layer (the first call plans, the others find the plan
memoized by value: a few microseconds each). The slow torch routes (padded, sdpa) time only their
first two layers, in the first `slow_reps` rounds. Per route: step_ms = the least pass time /
layers over the rounds (noise on a shared machine only adds time), step_median_ms the median,
step_rounds_ms every round (for paired ratios and spreads, report.py); tokens_per_s = batch /
step_ms (one layer's attention; a model step is layers x this). limit_ms = the step's KV bytes /
plain-copy rate (best of 5 torch copies of a same-size buffer, same run). max_abs_err: against
the float64 reference on layer 0.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

from . import cost, reference, traces, vllm_anchor
from .cache import PagedConfig, PagedKVCache
from .errors import PagedInputError
from .routes import ROUTES, clear_plans, plan, run_route

SHAPES = {"smollm2-135m": (3, 9, 64), "7b-gqa": (8, 32, 128)}  # kv heads, q heads, head dim
MODEL_LAYERS = {"smollm2-135m": 30, "7b-gqa": 32}  # layers of a model step of that shape
ANCHORS = ("sdpa", "vllm")
PADDED_CAP = 1 << 30  # skip `padded` when its dense batch would exceed this many bytes
SDPA_CAP = 1 << 28  # skip the per-request SDPA anchor above this many KV bytes per step
SLOW_ROUTES = ("padded", "sdpa")  # 10-100x slower: two layers, the first slow_reps rounds
ADAPTIVE_TIMING = ("per-step", "per-layer")


@dataclass(frozen=True)
class BenchConfig:
    """One `bench attention` run (the CLI's options)."""

    shapes: tuple[str, ...] = ("smollm2-135m",)
    traces: tuple[str, ...] = traces.TRACES
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (100, 101, 102, 103, 104)  # held out: calibration uses 0..4
    page_sizes: tuple[int, ...] = (32,)
    routes: tuple[str, ...] = (*ROUTES, *ANCHORS)
    dtype: str = "bfloat16"
    scale: float = 1.0
    ring_bytes: int = 1 << 30
    max_layers: int = 16
    reps: int = 5  # interleaved rounds
    slow_reps: int = 2  # rounds that also time the slow torch routes (padded, sdpa)
    trace_records: tuple = ()  # from --trace FILE: replaces `traces` with ("file",)
    adaptive_timing: str = "per-step"  # see the module doc

    def __post_init__(self) -> None:
        if self.adaptive_timing not in ADAPTIVE_TIMING:
            raise PagedInputError(f"adaptive_timing: one of {ADAPTIVE_TIMING}")


def _fill(config: PagedConfig, lens: list[int], seed: int):
    cache = PagedKVCache(config, shuffle_seed=seed)
    g = torch.Generator().manual_seed(seed)
    for x in (cache.k, cache.v):  # random layer 0; the ring's other layers copy it
        x[0].copy_(torch.randn(x[0].shape, generator=g, dtype=torch.float32))
        for layer in x[1:]:
            layer.copy_(x[0])
    for i, n in enumerate(lens):
        cache.allocate(i, n)
    tables, lengths = cache.block_tables(list(range(len(lens))))
    return cache, tables, lengths


def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes/s of a plain torch copy of an nbytes buffer (best of reps; bytes copied, i.e.
    each byte read once and written once)."""
    src = torch.ones(nbytes // 2, dtype=torch.float16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def run_case(shape, page_size, trace, batch, seed, lens, cfg: BenchConfig, profile) -> list[dict]:
    """All routes on one batch; one record per route (see module doc)."""
    hkv, hq, d = SHAPES[shape]
    dtype = getattr(torch, cfg.dtype)
    pages = sum(-(-n // page_size) for n in lens)
    layer_bytes = 2 * pages * hkv * page_size * d * dtype.itemsize
    layers = max(1, min(cfg.max_layers, -(-cfg.ring_bytes // layer_bytes)))
    pc = PagedConfig(layers, hkv, d, pages, page_size, dtype)
    cache, tables, lengths = _fill(pc, lens, seed)
    q = torch.randn(batch, hq, d, generator=torch.Generator().manual_seed(seed + 1))
    scale = d**-0.5
    kv_bytes = sum(lens) * 2 * hkv * d * dtype.itemsize
    copy_rate = copy_bandwidth(max(64 << 20, min(kv_bytes, 512 << 20)))
    ref = reference.reference(q, *cache.layer(0), tables, lengths, scale)
    runners, infos = {}, {}
    per_step = cfg.adaptive_timing == "per-step"
    planned = [plan(q, cache.k[0], lengths, None, profile)]  # per-step: this pass's route
    padded_bytes = batch * max(lens) * 2 * hkv * d * dtype.itemsize
    for route in cfg.routes:
        if (
            route == "padded"
            and padded_bytes > PADDED_CAP
            or route == "sdpa"
            and kv_bytes > SDPA_CAP
        ):
            continue  # slow torch routes at sizes where they lose by far (see the JSON's config)
        if route == "vllm":
            if page_size % 32 or not vllm_anchor.available():
                continue
            anchors = [
                vllm_anchor.VllmDecode(*cache.layer(i), tables, lengths, hq, scale)
                for i in range(layers)
            ]
            runners[route] = lambda i, a=anchors: a[i](q)
        elif route == "sdpa":
            runners[route] = lambda i: reference.sdpa_per_request(
                q, *cache.layer(i), tables, lengths, scale
            )
        else:

            def run(i, route=route):
                chosen = planned[0] if route == "adaptive" and per_step else route
                out, infos[route] = run_route(
                    q, *cache.layer(i), tables, lengths, chosen, scale, profile
                )
                return out

            runners[route] = run
    errors = {r: (fn(0).double() - ref).abs().max().item() for r, fn in runners.items()}
    order = list(runners)
    times = {r: [] for r in order}
    plans: list[float] = []  # adaptive per-step: seconds of each pass's plan
    last = None  # whose data the cache holds: the previous timed route's family
    for rep in range(cfg.reps):
        for route in order[rep % len(order) :] + order[: rep % len(order)]:
            slow = route in SLOW_ROUTES
            if slow and rep >= cfg.slow_reps:
                continue
            fn = runners[route]
            family = route if route in ("vllm", *SLOW_ROUTES) else "ours"
            # untimed: wakes this route's threads (ours or torch's OpenMP ones); after another
            # family's pass (vLLM reads its own copy of the pages, padded/sdpa gather copies),
            # a whole pass, so every route starts from its own data as warm as a route that
            # follows one of its family (the small batches' rings fit in the L3 cache)
            for i in range(layers if family != last and not slow else 0):
                fn(i)
            fn(layers - 1)
            last = family
            passes = min(layers, 2) if slow else layers
            share = min(1.0, passes / MODEL_LAYERS[shape])  # of one step's plan (module doc)
            t0 = time.perf_counter()
            clear_plans()  # adaptive plans once per pass (an engine: once per model step)
            if route == "adaptive" and per_step:
                planned[0] = plan(q, cache.k[0], lengths, None, profile)
            t1 = time.perf_counter()
            for i in range(passes):
                fn(i)
            times[route].append(((t1 - t0) * share + time.perf_counter() - t1) / passes)
            if route == "adaptive" and per_step:
                plans.append(t1 - t0)
    records = []
    for route in order:
        step = min(times[route])
        info = infos.get(route)
        records.append(
            {
                "shape": shape, "dtype": cfg.dtype, "page_size": page_size, "trace": trace,
                "batch": batch, "seed": seed, "route": route, "lengths": lens,
                "tokens_per_s": batch / step, "step_ms": step * 1e3,
                "step_median_ms": statistics.median(times[route]) * 1e3,
                "step_rounds_ms": [t * 1e3 for t in times[route]],
                "limit_ms": kv_bytes / copy_rate * 1e3, "copy_gbps": copy_rate / 1e9,
                "kv_bytes": kv_bytes, "layers_in_ring": layers,
                "ring_bytes": layers * layer_bytes,
                "dispatches_per_step": info.dispatches if info else
                    (batch if route == "sdpa" else 1),
                "tasks": info.tasks if info else None,
                "merge_bytes": info.merge_bytes if info else 0,
                "padded_bytes": padded_bytes - kv_bytes if route == "padded" else 0,
                "chosen": info.route if route == "adaptive" else None,
                "adaptive_timing": cfg.adaptive_timing if route == "adaptive" else None,
                "plan_ms": statistics.median(plans) * 1e3 if route == "adaptive" and plans
                    else None,
                "max_abs_err": errors[route],
            }
        )  # fmt: skip
    return records


def run(cfg: BenchConfig, profile: cost.MachineProfile, progress=print, on_case=None) -> list[dict]:
    """Every case of `cfg`; records as in `run_case`. on_case(records so far) after each case
    (the command saves partial results with it)."""
    records = []
    names = ("file",) if cfg.trace_records else cfg.traces
    for shape in cfg.shapes:
        for page_size in cfg.page_sizes:
            for trace in names:
                for batch in cfg.batches:
                    for seed in cfg.seeds:
                        if cfg.trace_records:
                            lens = traces.file_lengths(list(cfg.trace_records), batch, seed)
                            lens = [max(1, int(n * cfg.scale)) for n in lens]
                        else:
                            lens = traces.lengths(trace, batch, seed, cfg.scale)
                        recs = run_case(shape, page_size, trace, batch, seed, lens, cfg, profile)
                        gc.collect()  # the case's pools before the next one is built
                        records += recs
                        if on_case:
                            on_case(records)
                        progress(
                            f"{shape} p{page_size} {trace} B{batch} seed {seed}: "
                            + " ".join(f"{r['route']}={r['step_ms']:.2f}ms" for r in recs)
                        )
    return records
