"""What the batch-invariant part grid costs (issue 17, RESULTS "Partials on a fixed grid"):
split and workqueue with one partial per `part_tokens` tokens (the default profile) against one
partial per range (`batch_invariant=False`), 7 interleaved rounds each (calibrate._Case: the
medians of a ring pass per layer), SmolLM2 shape, bf16, 32-token pages, held-out seeds 100-101,
batches 4-16. Run from the repository root:
    .venv/bin/python benchmarks/results/part-grid-ab.py > benchmarks/results/part-grid-ab.txt
"""

import dataclasses
import statistics

import torch

from spectrumkv.paged import cost, traces
from spectrumkv.paged.calibrate import _Case

torch.set_num_threads(2)
grid = cost.load_profile("benchmarks/results/attention-profile.json")
ranges = dataclasses.replace(grid, batch_invariant=False)
ratios = []
for trace in ("bimodal", "uniform", "zipf", "bucketed"):
    for batch in (4, 8, 16):
        for seed in (100, 101):
            lens = traces.lengths(trace, batch, seed)
            case = _Case("smollm2-135m", lens, seed, 32, torch.bfloat16, 1 << 28)
            variants = [(r, p) for r in ("split", "workqueue") for p in (grid, ranges)]
            t = case.times([case.runner(r, p) for r, p in variants], 7)
            split, queue = t[0] / t[1], t[2] / t[3]
            ratios += [split, queue]
            print(f"{trace} B{batch} seed {seed}: grid/ranges split {split:.3f} "
                  f"workqueue {queue:.3f}", flush=True)  # fmt: skip
            del case
print(
    f"grid/ranges over {len(ratios)}: median {statistics.median(ratios):.3f}, "
    f"range {min(ratios):.3f}-{max(ratios):.3f}"
)
