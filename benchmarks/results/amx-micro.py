"""AMX vs AVX-512 paged decode kernel, one layer, in ONE process (helper amx, issues 17/18).

One request of NTOK tokens (pages consecutive in the pool, as in the lead's /tmp/hot.py), bf16
pages, either hot (NTOK=1024: 32-64 pages reused every call, L2-resident) or streaming (NTOK=8192
over a pool of 256 page sets cycled call after call: 0.8-3 GB, far above L3). Every round times
the AMX kernel and `set_isa("avx512")` back to back (order alternating), median over rounds,
and a torch sum's read rate between rounds. GB/s = K+V bytes read per call / time.

    .venv/bin/python benchmarks/results/amx-micro.py THREADS ROUNDS
"""

import os
import statistics
import sys
import time

import torch

from spectrumkv.paged import kernel

SHAPES = {"smollm2": (3, 9, 64), "7b": (8, 32, 128)}


def layer(ntok, sets, hkv, d, ps):
    npg = ntok // ps
    k = torch.randn(npg * sets, hkv, ps, d).to(torch.bfloat16)
    v = torch.randn_like(k)
    tabs = [torch.arange(i * npg, (i + 1) * npg, dtype=torch.int32)[None] for i in range(sets)]
    return k, v, tabs


def timed(q, k, v, tabs, lengths, threads, reps, start):
    t0 = time.perf_counter()
    for r in range(reps):
        kernel.decode(q, k, v, tabs[(start + r) % len(tabs)], lengths, 0.125, threads=threads)
    return (time.perf_counter() - t0) / reps


def main():
    threads, rounds = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    x = torch.randn(64 * 1024 * 1024 // 4)
    sums = []
    print(f"threads {threads}, rounds {rounds}, load {os.getloadavg()}")
    print("shape ps mode | amx_us avx512_us | amx/avx512 median (min-max) | amx GB/s avx512 GB/s")
    for name, (hkv, hq, d) in SHAPES.items():
        for ps in (16, 32):
            for mode, ntok, sets in (("hot", 1024, 1), ("stream", 8192, 256 if hkv == 3 else 96)):
                k, v, tabs = layer(ntok, sets, hkv, d, ps)
                q = torch.randn(1, hq, d)
                lengths = torch.tensor([ntok], dtype=torch.int32)
                reps = 200 if mode == "hot" else max(10, sets // 4)
                res = {"amx": [], "avx512": []}
                start = 0
                for rnd in range(rounds):
                    order = ("amx", "avx512") if rnd % 2 == 0 else ("avx512", "amx")
                    for isa in order:
                        kernel.set_isa(isa)
                        timed(q, k, v, tabs, lengths, threads, 2, start)  # warm
                        res[isa].append(timed(q, k, v, tabs, lengths, threads, reps, start))
                        start += reps
                    t0 = time.perf_counter()
                    x.sum()
                    sums.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
                kernel.set_isa("amx")
                byts = 2 * ntok * hkv * d * 2
                a, b = statistics.median(res["amx"]), statistics.median(res["avx512"])
                ratios = [x / y for x, y in zip(res["amx"], res["avx512"], strict=True)]
                print(f"{name} {ps} {mode} | {a * 1e6:.1f} {b * 1e6:.1f} | "
                      f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                      f"{byts / a / 1e9:.2f} {byts / b / 1e9:.2f}", flush=True)  # fmt: skip
                del k, v, tabs
    print(f"torch sum GB/s median {statistics.median(sums):.2f} "
          f"({min(sums):.2f}-{max(sums):.2f}); load {os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
