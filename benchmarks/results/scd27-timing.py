"""SCD rounds 20-21 (sessions 27-28): B's rebuild time against its own prefill
(`scd.evaluate.rebuild_timing`, medians of 5 alternating reps, 1 thread) under several refreshes
(head, tail), for one artifact, at TOKENS tokens (env, default 4096).

    python benchmarks/results/scd27-timing.py A B ART benchmarks/results/OUT.json [H:T,...]

The refreshes default to 0:0,16:128,16:256.
"""

import json
import os
import sys

import torch

from spectrumkv.engines.hf import load
from spectrumkv.scd.artifact import load as load_art
from spectrumkv.scd.evaluate import rebuild_timing

torch.set_num_threads(1)
A, B, ART, OUT = sys.argv[1:5]
grid = sys.argv[5] if len(sys.argv) > 5 else "0:0,16:128,16:256"
refreshes = [tuple(int(x) for x in p.split(":")) for p in grid.split(",")]
tokens = int(os.environ.get("TOKENS", "4096"))
a, b, art = load(A), load(B), load_art(ART)
out = {f"h{h}t{t}": rebuild_timing(a, b, art, tokens, "wiki-es", 5, (h, t)) for h, t in refreshes}
for k, v in out.items():
    print(k, {x: v[x] for x in v if x != "reps_s"})
with open(OUT, "w") as f:
    json.dump(out, f, indent=1)
