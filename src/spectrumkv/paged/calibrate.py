"""`spectrumkv bench calibrate`: measure this machine's cost-model constants (cost.py), fit the
rest on calibration seeds only (the benchmark reports held-out seeds).

Every time below is the median over `rounds` rounds in which the variants being compared run
one after another in a rotated order (one pass over a ring of layers each): interleaving gives
every variant the same conditions, and on the loaded shared VM the median of the rounds scatters
about half as much as their least (a route timed against itself: log-sd 0.09 vs 0.17).

1. beta, beta_1: KV bytes/s of the kernel on a large uniform batch, all threads and one thread;
   lam_pad, beta_pad: the padded route's time on a 32-token step, and its rate over the padded
   bytes of the large batch;
2. heads per task (fuse_heads): workqueue and split at the default split settings with fused
   tasks (several KV heads of a request per task, cost.task_heads) and with one head per task,
   on the calibration traces x batches 4, 8, 16; the variant with the least geometric-mean
   time (relative to each case's best) is kept for everything after, and with fused tasks the
   geometric mean of one head / fused becomes `one_head_scale` (the cost of a dispatch that
   has too few pieces to fuse: one request, per-request dispatches);
3. split settings: min_split_tokens / max_splits (workqueue, per-request) and split_splits
   (split): the grid point with the least geometric-mean time over the calibration cases
   (traces x batches 1, 4, 8), each case's times relative to its best;
4. lam, tau and the stream scale: relative least squares of
   T = scale * stream + dispatches * lam + tasks * tau (cost.py) over every kernel run of
   step 3 and of the three kernel routes on the traces x batches 1-32 (non-negative; a
   coefficient that fits below its floor is pinned there and the rest refitted), once with one
   scale for the three kernel routes and once with a scale per route (`_fit` says why); the
   per-route fit is kept only if the routes it picks on these cases are faster in sum (log
   time / the fastest's), else the shared one.
The fit's error, how often the model picks the measured best route on these cases, and what
the profile's batch_invariant grid (one partial per part_tokens tokens) costs there against
one partial per range (workqueue timed both ways) are printed (calibration-set figures;
`bench attention` reports held-out seeds).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time

import torch

from . import cost, traces
from .bench import SHAPES, _fill
from .cache import PagedConfig
from .routes import run_route

CAL_SEEDS = (0, 1)
GRID_BATCHES = (1, 4, 8)
FUSE_BATCHES = (4, 8, 16)  # at batch 1 both variants mostly run one head per task anyway
FIT_BATCHES = (1, 2, 4, 8, 16, 32)
WQ_GRID = tuple(itertools.product((1024, 2048, 4096, 8192), (4, 16)))
SPLIT_GRID = (2, 4, 8)
FLOORS = {"lam": 1e-6, "tau": 1e-8, "scale": 0.5}


class _Case:
    """A batch in a ring of layers (~ring_bytes), with a query; times routes over the ring."""

    def __init__(self, shape, lens, seed, page_size, dtype, ring_bytes, max_layers=16):
        hkv, hq, d = SHAPES[shape]
        pages = sum(-(-n // page_size) for n in lens)
        layer_bytes = 2 * pages * hkv * page_size * d * dtype.itemsize
        self.layers = max(1, min(max_layers, -(-ring_bytes // layer_bytes)))
        cfg = PagedConfig(self.layers, hkv, d, pages, page_size, dtype)
        self.cache, self.tables, self.lengths = _fill(cfg, lens, seed)
        self.lens = lens
        self.q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(seed))
        self.kv_bytes = sum(lens) * 2 * hkv * d * dtype.itemsize
        self.geometry = cost.Geometry(hkv, hq // hkv, d, dtype.itemsize)

    def runner(self, route: str, profile: cost.MachineProfile, threads: int | None = None):
        return lambda k, v: run_route(
            self.q, k, v, self.tables, self.lengths, route, None, profile, threads
        )

    def times(self, fns: list, rounds: int) -> list[float]:
        """Median seconds per layer of one ring pass, per fn(k, v); fns interleaved per round."""
        got: list[list[float]] = [[] for _ in fns]
        for r in range(rounds):
            for i in [(r + j) % len(fns) for j in range(len(fns))]:
                fns[i](*self.cache.layer(self.layers - 1))  # untimed: wakes the threads
                t0 = time.perf_counter()
                for layer in range(self.layers):
                    fns[i](*self.cache.layer(layer))
                got[i].append((time.perf_counter() - t0) / self.layers)
        return [statistics.median(t) for t in got]


def _rates(shape, page_size, dtype, ring_bytes, profile, rounds, progress, scale):
    big = _Case(shape, traces.lengths("uniform", 8, CAL_SEEDS[0], scale), 0, page_size, dtype,
                ring_bytes)  # fmt: skip
    spread = dataclasses.replace(profile, max_splits=16, min_split_tokens=1024)
    t_all, t_one = big.times(
        [big.runner("workqueue", spread), big.runner("workqueue", spread, threads=1)], rounds
    )
    tiny = _Case(shape, [32], 0, page_size, dtype, 1)
    (lam_pad,) = tiny.times([tiny.runner("padded", profile)], 3 * rounds)
    big.layers = min(big.layers, 2)  # padded is 10-100x slower: two layers of the ring suffice
    (t_pad,) = big.times([big.runner("padded", profile)], rounds)
    padded = len(big.lens) * max(big.lens) * big.kv_bytes // sum(big.lens)
    rates = dict(beta=big.kv_bytes / t_all, beta_1=big.kv_bytes / t_one, lam_pad=lam_pad,
                 beta_pad=padded / max(t_pad - lam_pad, 1e-9))  # fmt: skip
    progress(f"beta {rates['beta'] / 1e9:.2f} GB/s, beta_1 {rates['beta_1'] / 1e9:.2f} GB/s, "
             f"padded {rates['beta_pad'] / 1e9:.2f} GB/s + {lam_pad * 1e6:.0f} us")  # fmt: skip
    return rates


def _cases(shape, batches, page_size, dtype, ring_bytes, scale):
    for trace, batch, seed in itertools.product(traces.TRACES, batches, CAL_SEEDS):
        lens = traces.lengths(trace, batch, seed, scale)
        yield f"{trace} B{batch} seed {seed}", _Case(shape, lens, seed, page_size, dtype,
                                                     ring_bytes)  # fmt: skip


def _geomean_best(table: dict) -> object:
    """The key of `table` (key -> list of times, one per case) with the least geometric mean of
    its times relative to each case's best."""
    cases = list(zip(*table.values(), strict=True))
    rel = {k: [math.log(t / min(c)) for t, c in zip(v, cases, strict=True)]
           for k, v in table.items()}  # fmt: skip
    return min(rel, key=lambda k: sum(rel[k]))


def _fit(rows: list[tuple[str, float, int, int, float]], per_route: bool = False) -> dict:
    """lam, tau and the stream scales by relative least squares over rows (route, stream s,
    dispatches, tasks, measured s); coefficients below their floors pinned there. Returned as
    scale_<route> for every kernel route. per_route=False: one scale shared by the three kernel
    routes, which run the same kernel on the same bytes while `route_terms` already simulates
    how each cuts and schedules them (fitted per route on bf16 pages, the scales took up the
    noise of this VM: two calibrations of the same seeds minutes apart gave per-request 0.68 vs
    0.80 against workqueue 0.77 vs 0.85, and adaptive picked per-request where workqueue was
    faster). per_route=True: a scale per route, for what the terms miss about one route (on the
    Zen 4 VM, fp16 pages: per-request, one head per task, ran 4-12 % faster than workqueue at
    batch 8 in every run); `calibrate` keeps it only where it picks better on the calibration
    cases."""
    scales = [f"scale_{r.replace('-', '_')}" for r in cost.KERNEL_ROUTES]
    names = ["lam", "tau", *(scales if per_route else ["scale"])]
    floors = {n: FLOORS["scale" if n.startswith("scale") else n] for n in names}
    x = torch.zeros(len(rows), len(names), dtype=torch.float64)
    y = torch.tensor([r[4] for r in rows], dtype=torch.float64)
    for i, (route, stream, dispatches, tasks, _) in enumerate(rows):
        col = names.index(f"scale_{route.replace('-', '_')}" if per_route else "scale")
        x[i, 0], x[i, 1], x[i, col] = dispatches, tasks, stream
    x, target = x / y[:, None], torch.ones_like(y)  # relative errors
    pinned: dict[str, float] = {}
    while True:
        free = [i for i, n in enumerate(names) if n not in pinned and x[:, i].any()]
        rest = target - sum(
            (x[:, names.index(n)] * v for n, v in pinned.items()), torch.zeros_like(y)
        )
        coef = torch.linalg.lstsq(x[:, free], rest[:, None]).solution[:, 0].tolist()
        low = [(names[i], c) for i, c in zip(free, coef, strict=True) if c < floors[names[i]]]
        if not low:
            fit = {**pinned, **{names[i]: c for i, c in zip(free, coef, strict=True)}}
            if not per_route:
                return fit | dict.fromkeys(scales, fit.pop("scale"))
            return {n: fit.get(n, 1.0) for n in ["lam", "tau", *scales]}  # unmeasured: 1.0
        name = min(low, key=lambda nc: nc[1])[0]
        pinned[name] = floors[name]


def _regret(profile: cost.MachineProfile, checks) -> float:
    """Sum over calibration cases of log(time of the kernel route `profile` picks / the
    fastest's)."""
    return sum(math.log(times[cost.choose(lens, g, profile, cost.KERNEL_ROUTES)]
                        / min(times.values())) for lens, g, times in checks)  # fmt: skip


def calibrate(
    shape: str = "smollm2-135m", page_size: int = 32, dtype=torch.bfloat16,
    ring_bytes: int = 1 << 28, rounds: int = 5, progress=print, scale: float = 1.0,
) -> cost.MachineProfile:  # fmt: skip
    """Measure and fit a MachineProfile (see module doc). scale multiplies every calibration
    trace length (1.0: the traces as `bench attention` runs them; tests use a small one)."""
    threads = torch.get_num_threads()
    profile = cost.MachineProfile(threads=threads, dtype=cost.dtype_name(dtype),
                                  machine=cost.this_machine())  # fmt: skip
    profile = dataclasses.replace(
        profile, **_rates(shape, page_size, dtype, ring_bytes, profile, rounds, progress, scale)
    )
    rows = []  # (route, stream seconds, dispatches, tasks, measured seconds)

    def measure(case, variants):
        """Time (route, profile) variants on a case; record fit rows; return the times."""
        got = case.times([case.runner(r, p) for r, p in variants], rounds)
        for (route, p), t in zip(variants, got, strict=True):
            rows.append((route, *cost.route_terms(route, case.lens, case.geometry, p), t))
        return got

    fuse_variants = [("workqueue", profile), ("split", profile)]
    fuse_variants += [(r, dataclasses.replace(p, fuse_heads=False)) for r, p in fuse_variants]
    fuse: dict[bool, list[float]] = {True: [], False: []}
    for name, case in _cases(shape, FUSE_BATCHES, page_size, dtype, ring_bytes, scale):
        got = measure(case, fuse_variants)
        for (_, p), t in zip(fuse_variants, got, strict=True):
            fuse[p.fuse_heads].append(t)
        progress(f"heads per task: {name} done")
        del case
    one_vs_fused = statistics.geometric_mean(
        a / b for a, b in zip(fuse[False], fuse[True], strict=True)
    )
    fused = _geomean_best(fuse)  # then one_vs_fused >= 1 (the same geometric means)
    profile = dataclasses.replace(
        profile, fuse_heads=fused, one_head_scale=max(1.0, one_vs_fused) if fused else 1.0
    )
    progress(f"heads per task: {'fused' if profile.fuse_heads else 'one'} (one head / fused, "
             f"geometric mean over workqueue and split: {one_vs_fused:.3f})")  # fmt: skip
    rows.clear()  # the fit's stream terms use the one_head_scale just measured
    wq_variants = [dataclasses.replace(profile, min_split_tokens=a, max_splits=b)
                   for a, b in WQ_GRID]  # fmt: skip
    sp_variants = [dataclasses.replace(profile, split_splits=s) for s in SPLIT_GRID]
    wq, sp = {k: [] for k in WQ_GRID}, {k: [] for k in SPLIT_GRID}
    for name, case in _cases(shape, GRID_BATCHES, page_size, dtype, ring_bytes, scale):
        got = measure(case, [("workqueue", p) for p in wq_variants]
                      + [("split", p) for p in sp_variants])  # fmt: skip
        for k, t in zip([*WQ_GRID, *SPLIT_GRID], got, strict=True):
            (wq if isinstance(k, tuple) else sp)[k].append(t)
        progress(f"split grid: {name} done")
        del case
    min_split, max_splits = _geomean_best(wq)
    profile = dataclasses.replace(profile, min_split_tokens=min_split, max_splits=max_splits,
                                  split_splits=_geomean_best(sp))  # fmt: skip
    progress(f"split settings: workqueue/per-request every {min_split} tokens (<= {max_splits}"
             f" splits), split {profile.split_splits}")  # fmt: skip
    checks = []  # (lens, geometry, {route: measured s})
    free = dataclasses.replace(profile, batch_invariant=False)  # one partial per range
    invariance = []  # workqueue on the part grid / on ranges
    for name, case in _cases(shape, FIT_BATCHES, page_size, dtype, ring_bytes, scale):
        got = measure(case, [(r, profile) for r in cost.KERNEL_ROUTES] + [("workqueue", free)])
        *got, ranges = got
        times = dict(zip(cost.KERNEL_ROUTES, got, strict=True))
        invariance.append(times["workqueue"] / ranges)
        checks.append((case.lens, case.geometry, times))
        progress(f"fit case {name}: " + " ".join(f"{r}={t * 1e3:.2f}ms" for r, t in times.items()))
        del case
    shared, per_route = (dataclasses.replace(profile, **_fit(rows, p), calibrated=True)
                         for p in (False, True))  # fmt: skip
    r_shared, r_route = _regret(shared, checks), _regret(per_route, checks)
    profile = per_route if r_route < r_shared else shared
    progress(f"stream scales: {'per route' if profile is per_route else 'shared'} (picks "
             f"better on the calibration cases: regret sum {r_route:.3f} per route, "
             f"{r_shared:.3f} shared)")  # fmt: skip
    errs = [abs(cost.predict(r, lens, g, profile) / t - 1)
            for lens, g, times in checks for r, t in times.items()]  # fmt: skip
    regret = [times[cost.choose(lens, g, profile, cost.KERNEL_ROUTES)] / min(times.values())
              for lens, g, times in checks]  # fmt: skip
    progress(f"fit: lam {profile.lam * 1e6:.1f} us, tau {profile.tau * 1e6:.2f} us, scales "
             f"per-request {profile.scale_per_request:.3f} split {profile.scale_split:.3f} "
             f"workqueue {profile.scale_workqueue:.3f}")  # fmt: skip
    progress(f"on the calibration cases: median |predicted/measured - 1| "
             f"{statistics.median(errs):.3f}; the chosen kernel route's time / the best's: "
             f"median {statistics.median(regret):.3f}, worst {max(regret):.3f}")  # fmt: skip
    progress(f"batch-invariant grid ({profile.part_tokens}-token partials) / one partial per "
             f"range, workqueue: median {statistics.median(invariance):.3f}, worst "
             f"{max(invariance):.3f}")  # fmt: skip
    return profile
