"""SCD rounds 19-20 (sessions 26-27): held-out token KL of an artifact with its own refresh (FP16
codes), on the 24 held-out wiki-es chunks of `scd eval` (895 + 128 tokens), per chunk; for an
artifact calibrated with `--refresh-grid`, also at every refresh candidate it scored on dev
(manifest `refresh_dev`), so the dev choice can be checked on held-out text.

    python benchmarks/results/scd26-refresh-heldout.py ART benchmarks/results/OUT.json [A B]

A and B default to the SmolLM2 alias pair; THREADS (env, default 2) sets torch's threads.
"""

import json
import os
import statistics
import sys

import torch

from spectrumkv.engines.hf import decode_state, load
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.scd.artifact import load as load_art
from spectrumkv.scd.codes import encode, reconstruct_layer
from spectrumkv.scd.metrics import kl, oracle_score, score
from spectrumkv.scd.refresh import coded_tokens, refresh
from spectrumkv.scd.splits import split_text

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
art = load_art(sys.argv[1])
names = sys.argv[3:5] if len(sys.argv) > 4 else ["smollm2-135m", "smollm2-135m-wiki"]
a, b = load(names[0]), load(names[1])
man = art.manifest
chosen = (man.head_tokens, man.tail_tokens)
dev = {(h, t): k for h, t, k in man.refresh_dev} or {chosen: man.kl_dev}
kls: dict[tuple[int, int], list[float]] = {r: [] for r in dev}
for n, ids in enumerate(corpus_chunks(a, split_text("wiki-es", "eval"), 1024, 24), 1):
    prompt, feed = ids[:895], ids[895:]
    oracle = oracle_score(b, prompt, feed)
    for head, tail in dev:
        m = coded_tokens(895, tail)
        layers = [reconstruct_layer(art, b, c) for c in encode(art, a, prompt[:m])]
        layers = refresh(b, layers, m, prompt, head)
        kls[head, tail].append(kl(score(b, decode_state(b, layers, 895), feed), oracle))
    print(n, {f"h{h}t{t}": round(v[-1], 4) for (h, t), v in kls.items()}, flush=True)


def summary(r: tuple[int, int]) -> dict:
    v = kls[r]
    return {"refresh": list(r), "kl_dev": dev[r], "kl": statistics.fmean(v),
            "se": statistics.stdev(v) / len(v) ** 0.5,
            "chunks_le_eps": sum(x <= man.eps for x in v), "kl_chunks": v}  # fmt: skip


out = {"artifact": sys.argv[1], "models": names, "eps": man.eps} | summary(chosen)
out["candidates"] = [summary(r) for r in dev]
print(json.dumps({k: v for k, v in out.items() if k not in ("kl_chunks", "candidates")}))
for c in out["candidates"]:
    print(c["refresh"], f"dev {c['kl_dev']:.4f} held out {c['kl']:.4f} +- {c['se']:.4f}")
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
