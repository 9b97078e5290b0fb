"""Few-row bf16 linears: engines._bf16dot (AVX512-BF16 dot products) against oneDNN's packed
product, on 30 layers of SmolLM2-135M's projection shapes (q/k/v fused 960 x 576, o 576 x 576,
gate/up fused 3,072 x 576, down 576 x 1,536: 212 MB of bf16 weights, more than the L3, so the
weights stream from memory as in a decode step). Per thread count and row count, both run
interleaved `--rounds` times; median ms, GB/s of weights, the ratio, and a torch sum's read rate
over 256 MB measured in the same run (the memory's limit for streaming the weights).

    .venv/bin/python benchmarks/bf16dot.py --json benchmarks/results/bf16dot_zen4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from spectrumkv.engines import packed

LAYERS = 30
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in)


def read_gbps(rounds: int) -> float:
    """A torch sum over 256 MB of bf16: bytes read per second (best of `rounds`)."""
    x = torch.ones(128 << 20, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 2 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if packed._bf16dot is None or not packed._bf16dot.available() or not packed.available():
        raise SystemExit("needs AVX512-BF16 and oneDNN's bf16 ops on this CPU")
    g = torch.Generator().manual_seed(0)
    linears = [
        [nn.Linear(k, n, bias=False).to(torch.bfloat16) for n, k in SHAPES] for _ in range(LAYERS)
    ]
    layers = [[packed.PackedLinear(lin) for lin in layer] for layer in linears]
    dots = [[packed.dot_layout(lin.weight.detach()) for lin in layer] for layer in linears]
    del linears
    mb = LAYERS * sum(n * k for n, k in SHAPES) * 2 / 1e6
    rows_out = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        read = read_gbps(5)
        for rows in args.rows:
            xs = {k: torch.randn(rows, k, generator=g).to(torch.bfloat16) for _, k in SHAPES}

            def kernel(xs=xs) -> None:
                for layer in dots:
                    for w, (_, k) in zip(layer, SHAPES, strict=True):
                        packed.dot_matmul(xs[k], w)

            def onednn(xs=xs) -> None:
                for layer in layers:
                    for lin, (_, k) in zip(layer, SHAPES, strict=True):
                        torch.ops.mkldnn._linear_pointwise(xs[k], lin.packed, None, "none", [], "")

            times: dict[str, list[float]] = {"kernel": [], "onednn": []}
            with torch.inference_mode():
                kernel(), onednn()  # warm
                for _ in range(args.rounds):
                    for name, fn in (("kernel", kernel), ("onednn", onednn)):
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
            med = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
            row = {"threads": threads, "rows": rows, "weights_mb": mb, "read_gbps": read,
                   "kernel_ms": med["kernel"], "onednn_ms": med["onednn"],
                   "speedup": med["onednn"] / med["kernel"]}  # fmt: skip
            rows_out.append(row)
            print(f"threads {threads} rows {rows:3d}: kernel {med['kernel']:6.2f} ms "
                  f"({mb / med['kernel']:5.1f} GB/s)  oneDNN {med['onednn']:6.2f} ms "
                  f"({mb / med['onednn']:5.1f} GB/s)  {row['speedup']:.2f}x; read rate "
                  f"{read:.1f} GB/s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": _cpu(), "rows": rows_out}, f, indent=1)


def _cpu() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "?")


if __name__ == "__main__":
    main()
