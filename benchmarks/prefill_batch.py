"""Prefill + encode of `bench decode`'s 16 prompts, one per forward vs N per forward (issue 18).

Runs what the prefill worker runs per request (a StreamingEncoder per prompt fed layer by layer,
frames collected, no network) on the prompts `spectrumkv bench decode --scale S` cuts from the
corpus (serve.bench.make_requests), one at a time (engines.hf.prefill) and in batches of N
(engines.hf.prefill_batch), interleaved per round in one process. Prints seconds per round and
ratios; writes JSON with --out.

    .venv/bin/python benchmarks/prefill_batch.py --dtypes float32 bfloat16 --sizes 1 4 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from spectrumkv.engines.hf import load, prefill, prefill_batch
from spectrumkv.pd.batcher import batch_take
from spectrumkv.pd.protocol import TransferOptions, policy_configs
from spectrumkv.pd.streaming import StreamingEncoder
from spectrumkv.serve.bench import DecodeBench, make_requests


def run(engine, prompts: list[torch.Tensor], size: int, capped: bool) -> int:
    """Prefill and encode every prompt, `size` per forward (capped: grouped as the prefill
    worker groups a queue of them, pd.batcher.batch_take); return the bytes encoded."""
    policy, scoring = policy_configs(TransferOptions())
    out = [0]

    def emit(kind: str, chunk: bytes) -> None:
        out[0] += len(chunk)

    at = 0
    while at < len(prompts):
        take = batch_take([p.numel() for p in prompts[at:]], size) if capped else size
        group, at = prompts[at : at + take], at + take
        encs = [StreamingEncoder(engine, p, policy, scoring, emit) for p in group]
        if len(group) == 1:
            prefill(engine, group[0], on_layer=encs[0].on_layer)
        else:
            errors = prefill_batch(engine, group, [e.on_layer for e in encs])
            if any(errors):
                raise RuntimeError(errors)
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--scale", type=float, default=0.015625)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--capped", action="store_true", help="group as the worker does (token cap)")
    ap.add_argument("--out")
    a = ap.parse_args()
    result = {"model": a.model, "scale": a.scale, "threads": a.threads, "capped": a.capped}
    result["runs"] = {}
    for dtype in a.dtypes:
        engine = load(a.model, threads=a.threads, dtype=dtype)
        prompts = [r.context for r in make_requests(engine, DecodeBench(scale=a.scale))]
        result["lengths"] = [int(p.numel()) for p in prompts]
        run(engine, prompts[:2], 2, False)  # warm-up
        times: dict[int, list[float]] = {n: [] for n in a.sizes}
        sent: dict[int, int] = {}
        for _ in range(a.rounds):
            for n in a.sizes:
                t0 = time.perf_counter()
                sent[n] = run(engine, prompts, n, a.capped)
                times[n].append(time.perf_counter() - t0)
        base = statistics.median(times[a.sizes[0]])
        for n in a.sizes:
            med = statistics.median(times[n])
            rounds = ", ".join(f"{t:.2f}" for t in times[n])
            print(f"{dtype} N={n:2d}: median {med:.2f} s (rounds {rounds}), {sent[n]} bytes, "
                  f"N={a.sizes[0]}/N={n} = {base / med:.2f}x", flush=True)  # fmt: skip
        result["runs"][dtype] = {str(n): {"s": times[n], "bytes": sent[n]} for n in a.sizes}
    result["loadavg"] = os.getloadavg()
    print("load average", result["loadavg"])
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
