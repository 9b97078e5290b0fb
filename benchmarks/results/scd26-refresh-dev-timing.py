"""SCD round 19 (session 26): an artifact's dev-split KL (the 6 dev chunks of `scd calibrate`)
without and with B's refresh of the first 16 and last 128 prompt tokens, and B's rebuild time
at 4K tokens against its own prefill (`scd.evaluate.rebuild_timing`, medians of 3) for both.

    python benchmarks/results/scd26-refresh-dev-timing.py smollm2-135m smollm2-135m-wiki ART \
        benchmarks/results/scd26-refresh-dev-timing.json
"""

import json
import sys

import torch

from spectrumkv.engines.hf import load
from spectrumkv.scd.artifact import load as load_art
from spectrumkv.scd.calibrate import CalibConfig, _Dev
from spectrumkv.scd.evaluate import rebuild_timing

torch.set_num_threads(1)

A, B, ART, OUT = sys.argv[1:5]
a, b = load(A), load(B)
art = load_art(ART)
out = {}
for h, t in ((0, 0), (16, 128)):
    dev = _Dev(a, b, CalibConfig(corpus="wiki-es", head_tokens=h, tail_tokens=t))
    out[f"dev_kl_h{h}t{t}"] = dev.kls(art)
    print(h, t, sum(out[f"dev_kl_h{h}t{t}"]) / 6, flush=True)
for fresh in ((0, 0), (16, 128)):
    out[f"timing_h{fresh[0]}t{fresh[1]}"] = rebuild_timing(
        a, b, art, 4096, "wiki-es", reps=3, fresh=fresh
    )
    print(out[f"timing_h{fresh[0]}t{fresh[1]}"], flush=True)
with open(OUT, "w") as f:
    json.dump(out, f, indent=1)
