"""AMX vs AVX-512 paged decode kernel, one layer, in ONE process (helper amx, issues 17/18).

One request of NTOK tokens (pages consecutive in the pool, as in the lead's /tmp/hot.py), bf16
pages, either hot (NTOK=1024: 32-64 pages reused every call, L2-resident) or streaming (NTOK=8192
over a pool of 256 page sets cycled call after call: 0.8-3 GB, far above L3). Every round times
the AMX kernel and `set_isa("avx512")` back to back (order alternating), median over rounds,
and a torch sum's read rate between rounds. GB/s = K+V bytes read per call / time.

    .venv/bin/python benchmarks/results/amx-micro.py THREADS ROUNDS
        one request, hot and streaming, SmolLM2 and 7B shapes, 16- and 32-token pages
    .venv/bin/python benchmarks/results/amx-micro.py mix THREADS ROUNDS
        one decode-attention layer of the issue-18 mix (uniform x 1/16, seed 0: 16 requests,
        19,624 tokens) over a ring of layers (> 100 MB), workqueue splits (<= 4 of >= 8192
        tokens), as kernel4-oldnew.py's micro mode; OLD=COMMIT also times that commit's kernel
        (built from git by kernel4-oldnew.py's build_old, its best ISA: AVX-512 here)
    .venv/bin/python benchmarks/results/amx-micro.py step ROUNDS
        the engine's bf16 batch-16 SmolLM2 decode step (serve.step_bench's batch, route adaptive,
        1 thread, bf16 compute and bf16 pages), AMX and AVX-512 alternating: step and
        paged-attention ms
"""

import importlib.util
import os
import statistics
import sys
import time

import torch

from spectrumkv.paged import kernel, traces

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


LENS = traces.lengths("uniform", 16, 0, 1 / 16)


def _kernel4():
    """kernel4-oldnew.py as a module (its old-kernel build and its step A/B loop)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel4-oldnew.py")
    spec = importlib.util.spec_from_file_location("kernel4_oldnew", path)
    k4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k4)
    return k4


def build_old(commit):
    k4 = _kernel4()
    k4.OLD_COMMIT = commit
    return k4.build_old()


def mix(threads, rounds):
    old = build_old(os.environ["OLD"]) if os.environ.get("OLD") else None
    names = ("amx", "avx512", "old") if old else ("amx", "avx512")
    k4 = _kernel4()
    torch.set_num_threads(threads)
    buf = torch.ones((256 << 20) // 4)
    print(f"mix: tokens {sum(LENS)}, threads {threads}, load {os.getloadavg()}")
    for shape, (hkv, d, hq, layers) in {"smol": (3, 64, 9, 12), "7b": (8, 128, 32, 4)}.items():
        for ps in (16, 32):
            c, tables, lengths, q, kvb = k4.mix_layers(layers, hkv, hq, d, ps, torch.bfloat16)
            outs = {m: torch.empty(16, hq, d) for m in names}
            times, rates = {m: [] for m in names}, []
            for rd in range(rounds + 1):
                for isa in names if rd % 2 else names[::-1]:
                    kernel.set_isa("avx512" if isa == "old" else isa)
                    t0 = time.perf_counter()
                    for layer in range(layers):
                        kp, vp = c.layer(layer)
                        if isa == "old":
                            old.decode(q.data_ptr(), kp.data_ptr(), vp.data_ptr(), kp.numel(),
                                       tables.numpy(), lengths.numpy(), outs[isa].data_ptr(), hq,
                                       hkv, d, ps, 2, d**-0.5, 4, 8192, threads)  # fmt: skip
                        else:
                            kernel.decode(q, kp, vp, tables, lengths, d**-0.5, 4, 8192, threads,
                                          out=outs[isa])  # fmt: skip
                    if rd:
                        times[isa].append((time.perf_counter() - t0) / layers)
                if rd:
                    t0 = time.perf_counter()
                    buf.sum()
                    rates.append(buf.numel() * 4 / (time.perf_counter() - t0))
            kernel.set_isa("amx")
            assert (outs["amx"] - outs["avx512"]).abs().max() < 1e-4
            sr = statistics.median(rates)
            line = [f"{shape} p{ps} sum {sr / 1e9:.2f} GB/s"]
            for name, x in times.items():
                t = statistics.median(x)
                line.append(f"{name} {1e3 * t:.2f} ms [{1e3 * min(x):.2f}-{1e3 * max(x):.2f}] "
                            f"{kvb / t / 1e9:.2f} GB/s = {kvb / t / sr:.2f}x sum")  # fmt: skip
            pairs = (("amx", "avx512"), ("amx", "old"), ("avx512", "old"))
            for num, den in pairs[: 3 if old else 1]:
                r = [a / b for a, b in zip(times[num], times[den], strict=True)]
                m = statistics.median(r)
                line.append(f"{num}/{den} median {m:.3f} [{min(r):.3f}-{max(r):.3f}]")
            print(" | ".join(line), flush=True)
    print(f"load {os.getloadavg()}")


def step(rounds):
    from spectrumkv.serve.step_bench import _Batch, load

    torch.set_num_threads(1)
    b = _Batch(load("smollm2-135m", "bfloat16", 1, "bfloat16"), LENS, "adaptive", 0, "serve")
    isas = ("amx", "avx512")
    res = _kernel4().ab_steps(b, {k: (lambda k=k: kernel.set_isa(k)) for k in isas}, rounds)
    kernel.set_isa("amx")
    ra = [a / b for a, b in zip(res["amx"]["att"], res["avx512"]["att"], strict=True)]
    rs = [a / b for a, b in zip(res["amx"]["step"], res["avx512"]["step"], strict=True)]
    print(f"amx/avx512 paged attention, paired steps: median {statistics.median(ra):.3f} "
          f"[{min(ra):.3f}-{max(ra):.3f}]; whole step {statistics.median(rs):.3f} "
          f"[{min(rs):.3f}-{max(rs):.3f}]")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "mix":
        mix(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "step":
        step(int(sys.argv[2]))
    else:
        main()
