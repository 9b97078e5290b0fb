"""Plot and summarise a `python -m spectrumkv.paged.gpu_bench` JSON: decode tokens/s per
(shape, trace, batch), median over seeds, one line per method; and the workqueue's ratio to
FlashInfer's best variant and to the copy-bandwidth limit.

    python benchmarks/gpu/plot.py RUN.json OUT.png
"""

import json
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

with open(sys.argv[1]) as f:
    run = json.load(f)
records = run["records"]
shapes = sorted({r["shape"] for r in records}, reverse=True)
trace_names = ["bimodal", "uniform", "zipf", "bucketed"]
methods = ["workqueue", "workqueue-unsplit", "flashinfer", "flashinfer-tc", "padded"]
med: dict[tuple, float] = {}
limit: dict[tuple, float] = {}
for key in {(r["shape"], r["trace"], r["batch"], r["route"]) for r in records}:
    rs = [r for r in records if (r["shape"], r["trace"], r["batch"], r["route"]) == key]
    med[key] = statistics.median(r["step_ms"] for r in rs)
    limit[key[:3]] = statistics.median(r["limit_ms"] for r in rs)
fig, axes = plt.subplots(len(shapes), 4, figsize=(16, 4 * len(shapes)), squeeze=False)
for i, shape in enumerate(shapes):
    for j, trace in enumerate(trace_names):
        ax = axes[i][j]
        batches = sorted({k[2] for k in med if k[:2] == (shape, trace)})
        for m in methods:
            xs = [b for b in batches if (shape, trace, b, m) in med]
            ax.plot(xs, [b / med[(shape, trace, b, m)] * 1e3 for b in xs], marker="o", label=m)
        ax.plot(batches, [b / limit[(shape, trace, b)] * 1e3 for b in batches], "k--",
                label="copy-bandwidth limit")  # fmt: skip
        ax.set(xscale="log", yscale="log", title=f"{shape} {trace}", xlabel="batch")
        ax.set_xticks(batches, [str(b) for b in batches])
        if j == 0:
            ax.set_ylabel("decode tokens/s per layer")
axes[0][0].legend(fontsize=8)
fig.suptitle(f"{run['meta']['device']}: paged decode attention, bf16, page 16 "
             f"(FlashInfer {run['meta']['flashinfer']})")  # fmt: skip
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=90)
for shape in shapes:
    keys = [k for k in limit if k[0] == shape and (*k, "workqueue") in med]
    fi = [min(med[(*k, m)] for m in ("flashinfer", "flashinfer-tc") if (*k, m) in med) / med[
        (*k, "workqueue")] for k in keys]  # fmt: skip
    lim = [limit[k] / med[(*k, "workqueue")] for k in keys]
    pad = [med[(*k, "padded")] / med[(*k, "workqueue")] for k in keys if (*k, "padded") in med]
    print(f"{shape}: workqueue speed / FlashInfer best: median {statistics.median(fi):.2f}, "
          f"range {min(fi):.2f}-{max(fi):.2f} over {len(fi)} (trace, batch); limit / step: "
          f"median {statistics.median(lim):.2f}, max {max(lim):.2f}"
          + (f"; vs padded: median {statistics.median(pad):.2f}x, min {min(pad):.2f}x"
             if pad else ""))  # fmt: skip
