"""Decode attention over block tables, by route. The entry point of the paged package.

    out = decode_attention(q, k_pages, v_pages, tables, lengths, route="adaptive")

q: [batch, q_heads, head_dim], any float dtype (one new token per request; q_heads a multiple of
kv_heads: grouped-query attention). k_pages, v_pages: one layer's pool, [pages, kv_heads,
page_size, head_dim], float16 or bfloat16, contiguous (`PagedKVCache.layer`). tables: int32
[batch, width], page ids; lengths: int32 [batch], tokens per request (1 <= n <= width x
page_size). Returns float32 [batch, q_heads, head_dim] (cast to the model dtype as needed).
scale defaults to head_dim ** -0.5. starts: optional int32 [batch], the first token each request
attends to (a sliding-window layer's first visible slot; None = 0): request b sees its tokens
[starts[b], lengths[b]). Bad input raises PagedInputError before anything runs.

Routes (all on the same pages; see cost.py for how `adaptive` picks):
- per-request: one kernel dispatch (and merge) per request, split by the profile's settings;
- split: one dispatch, every request cut into the profile's `split_splits` ranges;
- workqueue: one dispatch over only the (request, KV heads, split) tasks that exist, a split
  every `min_split_tokens` tokens (at most `max_splits`), longest first, then one merge;
- padded: gather into a padded dense batch and run torch SDPA (no compiled code);
- adaptive: the route the cost model predicts fastest for these lengths (`plan`; an engine
  plans once per model step and passes the chosen route to every layer); with the profile's
  `batch_invariant` (the default) one of the kernel routes, which then all keep one partial
  per `part_tokens` tokens of a request: its output is the same bits whatever the route and
  the batch it decodes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cost, kernel, reference
from .errors import PagedInputError

ROUTES = (*cost.FIXED_ROUTES, "adaptive")


@dataclass
class StepInfo:
    """What one call did: the route that ran, kernel dispatches, tasks, merge bytes."""

    route: str
    dispatches: int
    tasks: int
    merge_bytes: int


def geometry(q: torch.Tensor, k_pages: torch.Tensor) -> cost.Geometry:
    return cost.Geometry(
        k_pages.shape[1], q.shape[1] // k_pages.shape[1], k_pages.shape[3], k_pages.itemsize
    )


_last_plan: tuple = ((), None, "")  # (key, profile, route) of the last plan() call


def plan(
    q: torch.Tensor, k_pages: torch.Tensor, lengths: torch.Tensor,
    starts: torch.Tensor | None = None, profile: cost.MachineProfile | None = None,
) -> str:  # fmt: skip
    """The fixed route `adaptive` runs for this step: the cost model's pick for the spans
    (lengths - starts) on this geometry. An engine calls it once per model step and passes the
    route to every layer. A call with the same lengths and starts (compared by value), shapes
    and profile as the previous call returns that plan at once (no Geometry or cost-model
    lookup: 2-5 us), so `run_route(route="adaptive")` per layer plans only on a step's first
    layer. Inputs as `run_route` checks them."""
    global _last_plan
    profile = profile or cost.MachineProfile()
    lens = lengths.tolist()
    first = None if starts is None else starts.tolist()
    key = (lens, first, q.shape, k_pages.shape, k_pages.dtype)
    last_key, last_profile, route = _last_plan
    if key == last_key and (profile is last_profile or profile == last_profile):
        return route
    if first is not None:
        lens = [n - s for n, s in zip(lens, first, strict=True)]
    if min(lens) < 1:
        raise PagedInputError("a length or span is < 1 (start not below its length)")
    route = cost.choose(lens, geometry(q, k_pages), profile)
    _last_plan = (key, profile, route)
    return route


def clear_plans() -> None:
    """Forget every memoized plan (plan's last one and cost.choose's): the next plan() plans
    from scratch (benchmarks charge planning to every timed step this way)."""
    global _last_plan
    _last_plan = ((), None, "")
    cost.clear_plans()


def run_route(
    q, k_pages, v_pages, tables, lengths, route: str = "adaptive", scale: float | None = None,
    profile: cost.MachineProfile | None = None, threads: int | None = None,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, StepInfo]:  # fmt: skip
    """`decode_attention` that also reports what ran (for benchmarks and engines' metrics)."""
    if route not in ROUTES:
        raise PagedInputError(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
    kernel.check_inputs(q, k_pages, v_pages, tables, lengths, starts)
    profile = profile or cost.MachineProfile()
    scale = float(scale) if scale is not None else k_pages.shape[3] ** -0.5
    if route == "adaptive":
        route = plan(q, k_pages, lengths, starts, profile)
    if k_pages.device.type == "cuda":  # every route runs as the Triton workqueue (paged.gpu)
        spans = lengths if starts is None else lengths - starts  # tokens each request reads
        return _run_gpu(q, k_pages, v_pages, tables, lengths, scale, starts, spans)
    if route == "padded" or not kernel.AVAILABLE:
        if route != "padded":
            raise PagedInputError(f"route {route!r} needs the compiled kernel (not built)")
        kernel.check_tables(tables, lengths, k_pages.shape[0], k_pages.shape[2], starts)
        return reference.padded(q, k_pages, v_pages, tables, lengths, scale, starts), StepInfo(
            "padded", 1, 0, 0
        )
    max_splits, min_split, part = cost.route_settings(route, profile)
    if route == "per-request":
        out = torch.empty(q.shape, dtype=torch.float32)
        tasks = partials = 0
        for b in range(q.shape[0]):
            one = None if starts is None else starts[b : b + 1]
            _, t, p = kernel.decode(
                q[b : b + 1], k_pages, v_pages, tables[b : b + 1], lengths[b : b + 1], scale,
                max_splits, min_split, threads, out[b : b + 1], one, part, profile.fuse_heads,
            )  # fmt: skip
            tasks, partials = tasks + t, partials + p
        dispatches = q.shape[0]
    else:
        out, tasks, partials = kernel.decode(
            q, k_pages, v_pages, tables, lengths, scale, max_splits, min_split, threads,
            starts=starts, part_tokens=part, fuse_heads=profile.fuse_heads,
        )  # fmt: skip
        dispatches = 1
    merge = cost.merge_bytes(partials, geometry(q, k_pages))
    return out, StepInfo(route, dispatches, tasks, merge)


def _run_gpu(q, k_pages, v_pages, tables, lengths, scale, starts, spans, programs=None):
    """CUDA pages: the Triton workqueue kernels of paged.gpu, whatever route was asked (the CPU
    routes' dispatch choices do not apply there), split to fill the device (`gpu.split_settings`
    for `programs` programs; default: the device's `gpu.device_programs`)."""
    from . import gpu  # imports triton: only where CUDA pages exist

    programs = programs or gpu.device_programs(k_pages.device)
    settings = gpu.split_settings(spans.tolist(), k_pages.shape[1], programs)
    out, tasks = gpu.decode(q, k_pages, v_pages, tables, lengths, scale, *settings, starts=starts)
    partials = (cost.cut(max(n, 1), *settings)[2] for n in spans.tolist())  # one per range
    merge = cost.merge_bytes(sum(x for x in partials if x > 1), geometry(q, k_pages))
    return out, StepInfo("workqueue", 1 + (merge > 0), tasks, merge)


def decode_attention(
    q, k_pages, v_pages, tables, lengths, route: str = "adaptive", scale: float | None = None,
    profile: cost.MachineProfile | None = None, threads: int | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention of one new query token per request over its paged K/V (see module doc)."""
    out, _ = run_route(q, k_pages, v_pages, tables, lengths, route, scale, profile, threads, starts)
    return out
