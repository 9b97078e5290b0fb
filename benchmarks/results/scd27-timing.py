"""SCD round 20 (session 27): B's rebuild time at 4K tokens against its own prefill
(`scd.evaluate.rebuild_timing`, medians of 5 alternating reps, 1 thread) under the refreshes
(head, tail) 0:0, 16:128 and 16:256, for one artifact.

    python benchmarks/results/scd27-timing.py A B ART benchmarks/results/OUT.json
"""

import json
import sys

import torch

from spectrumkv.engines.hf import load
from spectrumkv.scd.artifact import load as load_art
from spectrumkv.scd.evaluate import rebuild_timing

torch.set_num_threads(1)
A, B, ART, OUT = sys.argv[1:5]
a, b, art = load(A), load(B), load_art(ART)
out = {
    f"h{h}t{t}": rebuild_timing(a, b, art, 4096, "wiki-es", 5, (h, t))
    for h, t in ((0, 0), (16, 128), (16, 256))
}
for k, v in out.items():
    print(k, {x: v[x] for x in v if x != "reps_s"})
with open(OUT, "w") as f:
    json.dump(out, f, indent=1)
