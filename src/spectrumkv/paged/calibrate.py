"""`spectrumkv bench calibrate`: measure this machine's cost-model constants (cost.py) and fit
the split settings, on calibration seeds only (the benchmark reports held-out seeds).

- beta, beta_1: KV bytes/s of the kernel on a large uniform batch (a ring of layers, as in the
  benchmark), with all threads and with one;
- lam: one back-to-back call of a 32-token, one-request step (Python entry, checks, pool
  dispatch), less its bytes at beta_1; tau: the extra time per task of a 64-request step;
- lam_pad: the padded route's time on the 32-token step; beta_pad: its padded bytes/s on the
  large batch, less lam_pad;
- min_split_tokens / max_splits (workqueue, per-request) and split_splits (split): the grid
  point with the least total time over the calibration cases (traces x batches 1, 4, 8).
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from . import cost, kernel, reference, traces
from .bench import SHAPES, _fill
from .cache import PagedConfig

CAL_SEEDS = (0, 1)
WQ_GRID = tuple(itertools.product((1024, 2048, 4096, 8192), (4, 16)))
SPLIT_GRID = (2, 4, 8)


class _Case:
    """A batch in a ring of layers (~ring_bytes), with a query."""

    def __init__(self, shape, lens, seed, page_size, dtype, ring_bytes, max_layers=16):
        hkv, hq, d = SHAPES[shape]
        pages = sum(-(-n // page_size) for n in lens)
        layer_bytes = 2 * pages * hkv * page_size * d * dtype.itemsize
        self.layers = max(1, min(max_layers, -(-ring_bytes // layer_bytes)))
        cfg = PagedConfig(self.layers, hkv, d, pages, page_size, dtype)
        self.cache, self.tables, self.lengths = _fill(cfg, lens, seed)
        self.q = torch.randn(len(lens), hq, d, generator=torch.Generator().manual_seed(seed))
        self.kv_bytes = sum(lens) * 2 * hkv * d * dtype.itemsize
        self.scale = d**-0.5

    def step(self, fn, reps: int = 2) -> float:
        """Best-of-reps seconds per layer of one pass over the ring calling fn(k, v)."""
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for i in range(self.layers):
                fn(*self.cache.layer(i))
            best = min(best, (time.perf_counter() - t0) / self.layers)
        return best

    def kernel(self, max_splits, min_split, threads=None):
        return lambda k, v: kernel.decode(
            self.q, k, v, self.tables, self.lengths, self.scale, max_splits, min_split, threads
        )


def calibrate(
    shape: str = "smollm2-135m", page_size: int = 32, dtype=torch.bfloat16,
    ring_bytes: int = 1 << 30, progress=print,
) -> cost.MachineProfile:  # fmt: skip
    """Measure and fit a MachineProfile (see module doc)."""
    threads = torch.get_num_threads()
    big = _Case(shape, traces.lengths("uniform", 8, CAL_SEEDS[0]), 0, page_size, dtype,
                ring_bytes)  # fmt: skip
    beta = big.kv_bytes / big.step(big.kernel(16, 1024), 3)
    beta_1 = big.kv_bytes / big.step(big.kernel(16, 1024, threads=1), 2)
    tiny = _Case(shape, [32], 0, page_size, dtype, 1)
    fn = tiny.kernel(1, 1 << 30)
    lam = max(1e-7, tiny.step(lambda k, v: [fn(k, v) for _ in range(100)], 3) / 100
              - tiny.kv_bytes / beta_1)  # fmt: skip
    many = _Case(shape, [32] * 64, 0, page_size, dtype, 1)
    tasks = 64 * SHAPES[shape][0]
    tau = max(1e-8, (many.step(many.kernel(1, 1 << 30), 20) - lam - many.kv_bytes / beta) / tasks)
    # padded: its fixed cost on the tiny step, its rate on the large batch
    lam_pad = tiny.step(lambda k, v: reference.padded(tiny.q, k, v, tiny.tables, tiny.lengths,
                                                      tiny.scale), 5)  # fmt: skip
    padded = big.lengths.numel() * int(big.lengths.max()) * big.kv_bytes // int(big.lengths.sum())
    t_pad = big.step(
        lambda k, v, c=big: reference.padded(c.q, k, v, c.tables, c.lengths, c.scale), 1
    )
    beta_pad = padded / max(t_pad - lam_pad, 1e-9)
    del big
    progress(f"beta {beta / 1e9:.2f} GB/s, beta_1 {beta_1 / 1e9:.2f} GB/s, lambda "
             f"{lam * 1e6:.1f} us, tau {tau * 1e6:.2f} us, padded {beta_pad / 1e9:.2f} GB/s + "
             f"{lam_pad * 1e6:.0f} us")  # fmt: skip
    wq = dict.fromkeys(WQ_GRID, 0.0)
    sp = dict.fromkeys(SPLIT_GRID, 0.0)
    for trace, batch, seed in itertools.product(traces.TRACES, (1, 4, 8), CAL_SEEDS):
        c = _Case(shape, traces.lengths(trace, batch, seed), seed, page_size, dtype, ring_bytes)
        for min_split, max_splits in WQ_GRID:
            wq[(min_split, max_splits)] += c.step(c.kernel(max_splits, min_split))
        for s in SPLIT_GRID:
            sp[s] += c.step(c.kernel(s, cost.TILE))
        progress(f"calibration case {trace} B{batch} seed {seed} done")
        del c
    min_split, max_splits = min(wq, key=wq.get)
    split_splits = min(sp, key=sp.get)
    return dataclasses.replace(
        cost.MachineProfile(), beta=beta, beta_1=beta_1, lam=lam, tau=tau, beta_pad=beta_pad,
        lam_pad=lam_pad, threads=threads, min_split_tokens=min_split, max_splits=max_splits,
        split_splits=split_splits, calibrated=True,
    )  # fmt: skip
