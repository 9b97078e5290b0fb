"""The AMX tile's P.V reading V straight from the page (f1f3001) against the kernel before it
(2045b44, V re-packed into token pairs per tile), and vLLM's CPU decode attention, one decode
layer in ONE process. Run from the repository root:

    .venv/bin/python benchmarks/results/pv-direct-ab.py TRACE BATCH THREADS SHAPE ROUNDS [OLD]

OLD: the commit to build as "old" (default 2045b44; 6dc6eb7, the last kernel on the extensions'
own thread pool, for the OpenMP dispatch A/B in pv-direct-ab-omp.txt).

Builds the old `_attention.c` from git as setup.py builds it (kernel4-oldnew.py's build_old)
and loads it by path next to the installed one. The batch (held-out seed 100 of TRACE, bf16,
32-token pages, shuffled pool) sits in a ring of >= 256 MB of layers; each round times one pass
over the ring for old, new and vLLM in a rotated order (one untimed call first). Our kernel runs
the part grid (1,024-token partials, <= 16 splits of >= 1,024 tokens), as adaptive's routes do.
Prints the error against the float64 reference, the least and median ms per layer, K/V GB/s,
and the paired per-round ratios.
"""

import importlib.util
import os
import statistics
import sys
import time

import torch

from spectrumkv.paged import kernel, traces, vllm_anchor
from spectrumkv.paged.reference import reference

OLD_COMMIT = "2045b44"
SHAPES = {"smollm2": (3, 9, 64), "7b": (8, 32, 128)}


def build_old():
    """OLD_COMMIT's kernel, built from git as setup.py builds it (kernel4-oldnew.py's build_old)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel4-oldnew.py")
    spec = importlib.util.spec_from_file_location("kernel4_oldnew", path)
    k4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(k4)
    k4.OLD_COMMIT = OLD_COMMIT
    return k4.build_old()


def main(trace, batch, threads, shape, rounds):
    hkv, hq, d = SHAPES[shape]
    ps = 32
    torch.set_num_threads(threads)
    lens = traces.lengths(trace, batch, 100)
    npg = [-(-n // ps) for n in lens]
    pages = sum(npg)
    perm = torch.randperm(pages, generator=torch.Generator().manual_seed(0))
    tables = torch.zeros(batch, max(npg), dtype=torch.int32)
    o = 0
    for b, n in enumerate(npg):
        tables[b, :n] = perm[o : o + n].int()
        o += n
    lengths = torch.tensor(lens, dtype=torch.int32)
    layers = max(2, (256 << 20) // (2 * pages * hkv * ps * d * 2))
    ks = [torch.randn(pages, hkv, ps, d).bfloat16() for _ in range(layers)]
    vs = [torch.randn(pages, hkv, ps, d).bfloat16() for _ in range(layers)]
    kv_bytes = 2 * sum(lens) * hkv * d * 2
    q = torch.randn(batch, hq, d)
    anchors = [vllm_anchor.VllmDecode(ks[i], vs[i], tables, lengths, hq, d**-0.5)
               for i in range(layers)]  # fmt: skip
    mods = {"old": build_old(), "new": kernel._attention}

    def run(name, i):
        if name == "vllm":
            return anchors[i](q)
        kernel._attention = mods[name]
        out, *_ = kernel.decode(q, ks[i], vs[i], tables, lengths, d**-0.5, 16, 1024, threads,
                                part_tokens=1024)  # fmt: skip
        return out

    names = ["old", "new", "vllm"]
    ref = reference(q, ks[0], vs[0], tables, lengths, d**-0.5)
    errs = {n: (run(n, 0).double() - ref).abs().max().item() for n in names}
    print(f"{shape} {trace} B{batch} threads {threads}: {sum(lens)} tokens, {kv_bytes / 1e6:.1f} "
          f"MB K/V per layer, ring of {layers}; max abs err " +
          " ".join(f"{n} {e:.1e}" for n, e in errs.items()))  # fmt: skip
    got = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % 3 :] + names[: r % 3]:
            run(n, layers - 1)
            t0 = time.perf_counter()
            for i in range(layers):
                run(n, i)
            got[n].append((time.perf_counter() - t0) / layers)
    for n in names:
        least, median = min(got[n]), statistics.median(got[n])
        print(f"  {n:4s} least {least * 1e3:7.3f} ms  median {median * 1e3:7.3f} ms  "
              f"{kv_bytes / least / 1e9:5.2f} GB/s")  # fmt: skip

    def paired(a, b):
        return statistics.median(x / y for x, y in zip(got[a], got[b], strict=True))

    print(f"  paired median time ratios: old/new {paired('old', 'new'):.3f}  vllm/new "
          f"{paired('vllm', 'new'):.3f}  vllm/old {paired('vllm', 'old'):.3f}")  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) > 5:
        OLD_COMMIT = a[5]
    main(a[0], int(a[1]), int(a[2]), a[3], int(a[4]))
