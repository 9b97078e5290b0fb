"""The engine's decode step with the paged kernel's AMX path vs its AVX-512 path, in one process:
the same batch (serve.step_bench's: uniform x 1/16, 16 requests, bf16 compute, bf16 pages), the
two ISAs alternating every `steps` steps for `rounds` rounds, so both see the same load.

    .venv/bin/python benchmarks/results/amx-step.py [rounds] [steps] [json]
"""

import json
import os
import statistics
import sys
import time

import torch

from spectrumkv.engines.hf import load
from spectrumkv.paged import kernel, traces
from spectrumkv.serve.step_bench import _Batch

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
torch.set_num_threads(1)
engine = load("smollm2-135m", "bfloat16", threads=1, dtype="bfloat16")
lens = traces.lengths("uniform", 16, 0, 1 / 16)
batch = _Batch(engine, lens, "adaptive")
isas = ("amx", "avx512")
times = {i: [] for i in isas}
load0 = os.getloadavg()[0]
batch.step()
for r in range(rounds):
    for isa in isas if r % 2 == 0 else isas[::-1]:
        kernel.set_isa(isa)
        for _ in range(steps):
            t0 = time.perf_counter()
            batch.step()
            times[isa].append(time.perf_counter() - t0)
rec = {"lens": lens, "rounds": rounds, "steps": steps, "loadavg_1m": [load0, os.getloadavg()[0]]}
for isa in isas:
    ms = [1000 * t for t in times[isa]]
    rec[isa] = {"median_ms": statistics.median(ms), "min_ms": min(ms)}
    print(f"{isa:>7}: step median {rec[isa]['median_ms']:.1f} ms, min {rec[isa]['min_ms']:.1f} ms")
rec["amx_over_avx512_median"] = rec["amx"]["median_ms"] / rec["avx512"]["median_ms"]
rec["amx_over_avx512_min"] = rec["amx"]["min_ms"] / rec["avx512"]["min_ms"]
print(
    f"amx / avx512: median {rec['amx_over_avx512_median']:.3f}, "
    f"min {rec['amx_over_avx512_min']:.3f}; "
    f"load {rec['loadavg_1m'][0]:.1f} -> {rec['loadavg_1m'][1]:.1f}"
)
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as f:
        json.dump(rec, f, indent=1)
