"""Same-process A/B of session 17's decode-step changes (RESULTS, "The decode step's per-layer
overhead"), old and new alternating step by step on one batch of 16 (the issue's mix at 1/64,
114-499 tokens, bf16 compute and pages):

- old: f5b5ade's compiled row ops (its .so, built in a worktree), torch's index_copy_ for the
  per-layer K/V slot write, run_route on every layer;
- new: the working tree (paged.kernel.write_rows, the kernel called directly per layer, bf16 row
  ops built for x86-64-v4).

    git worktree add /tmp/old f5b5ade && (cd /tmp/old && /work/main/.venv/bin/python \
        setup.py build_ext --inplace)
    .venv/bin/python benchmarks/results/s17-step-ab.py THREADS PAIRS [OLD_ROWOPS_SO]
"""

import dataclasses
import importlib.machinery
import importlib.util
import statistics
import sys
import time

import torch

from spectrumkv.engines import rowops
from spectrumkv.engines.hf import load
from spectrumkv.paged import kernel, traces
from spectrumkv.serve import runner
from spectrumkv.serve.step_bench import _Batch

OLD_SO = "/tmp/old/src/spectrumkv/engines/_rowops.cpython-311-x86_64-linux-gnu.so"


def load_old_rowops(path: str):
    loader = importlib.machinery.ExtensionFileLoader("old._rowops", path)
    spec = importlib.util.spec_from_file_location("old._rowops", path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def main() -> None:
    threads, pairs = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(threads)
    old_rowops = load_old_rowops(sys.argv[3] if len(sys.argv) > 3 else OLD_SO)
    new_rowops, new_write = rowops._rowops, kernel.write_rows
    new_rows = runner.ModelRunner._decode_rows

    def old_rows(self, rids, positions):
        return dataclasses.replace(new_rows(self, rids, positions), settings=None)

    def use(side: str) -> None:
        old = side == "old"
        rowops._rowops = old_rowops if old else new_rowops
        kernel.write_rows = (lambda *a: False) if old else new_write
        runner.ModelRunner._decode_rows = old_rows if old else new_rows

    engine = load("smollm2-135m", dtype="bfloat16", kv_dtype="bfloat16")
    batch = _Batch(engine, traces.lengths("uniform", 16, 0, 1 / 64), "adaptive")
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(pairs + 3):  # 3 warm-up pairs
        for side in ("old", "new") if i % 2 else ("new", "old"):
            use(side)
            t0 = time.perf_counter()
            batch.step().argmax(-1).tolist()
            if i >= 3:
                times[side].append(time.perf_counter() - t0)
    ratio = [o / n for o, n in zip(times["old"], times["new"], strict=True)]
    q1, _, q3 = statistics.quantiles(ratio, n=4)
    old_ms, new_ms = (1e3 * statistics.median(times[s]) for s in ("old", "new"))
    print(f"threads {threads}: old median {old_ms:.1f} ms, new {new_ms:.1f} ms; paired old/new "
          f"median {statistics.median(ratio):.3f} [IQR {q1:.3f}, {q3:.3f}], new faster in "
          f"{sum(r > 1 for r in ratio)}/{len(ratio)}")  # fmt: skip


if __name__ == "__main__":
    main()
