"""SCD round 19 (session 26): raw reuse + B's refresh (`scd.refresh`: B recomputes the first H
and last T prompt tokens), any pair (sliding layers included): token KL vs B's own prefill on
held-out wiki-es chunks (896 + 128 tokens), per chunk and summarized.

    python benchmarks/results/scd26-refresh-probe.py gemma3-270m gemma3-270m-wiki 16 1 \
        benchmarks/results/scd26-refresh-probe-gemma.json

scd26-refresh-probe-smollm2.json (smollm2-135m -> smollm2-135m-wiki, a finer H x T grid) was made
by the first version of this probe, which spliced rows by index (the same as by position on a
model without sliding layers). `scd eval --refreshes H:T,...` measures these as raw-hHtT.
"""

import json
import statistics
import sys

import torch

from spectrumkv.engines.hf import decode_state, load, prefill
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.scd.evaluate import rerotated
from spectrumkv.scd.metrics import kl, score
from spectrumkv.scd.refresh import refresh
from spectrumkv.scd.splits import split_text

A, B, CHUNKS, TH, OUT = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(TH)
a, b = load(A), load(B)
split = 1024 - 128
GRID = [(0, 0), (16, 0), (0, 64), (16, 64), (0, 128), (16, 128)]
res = {f"h{h}t{t}": [] for h, t in GRID}
for ci, ids in enumerate(corpus_chunks(a, split_text("wiki-es", "eval"), 1024, CHUNKS)):
    prefix, feed = ids[: split - 1], ids[split - 1 :]
    n = prefix.numel()
    pb = prefill(b, prefix)
    oracle = score(b, decode_state(b, pb.layers, n), feed)
    pa = {t: prefill(a, prefix[: n - t]) for t in {t for _, t in GRID}}
    for h, t in GRID:
        layers = refresh(b, rerotated(a, b, pa[t].layers), n - t, prefix, h)
        res[f"h{h}t{t}"].append(kl(score(b, decode_state(b, layers, n), feed), oracle))
    print(ci, {k: round(v[-1], 4) for k, v in res.items()}, flush=True)
base = res["h0t0"]
summary = {
    k: {
        "kl": statistics.fmean(v),
        "sd": statistics.stdev(v),
        "ratio_to_raw": statistics.fmean(v) / statistics.fmean(base),
        "lower_than_raw": sum(x < y for x, y in zip(v, base, strict=True)),
    }
    for k, v in res.items()
}
print(json.dumps(summary, indent=1))
with open(OUT, "w") as f:
    json.dump({"per_chunk": res, "summary": summary, "a": A, "b": B}, f)
