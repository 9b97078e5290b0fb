"""SCD round 19 (session 26): held-out token KL of an artifact with its own refresh (FP16 codes),
on the 24 held-out wiki-es chunks of `scd eval` (895 + 128 tokens), per chunk.

    python benchmarks/results/scd26-refresh-heldout.py ART benchmarks/results/OUT.json
"""

import json
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

torch.set_num_threads(2)
art = load_art(sys.argv[1])
a, b = load("smollm2-135m"), load("smollm2-135m-wiki")
head, tail = art.manifest.head_tokens, art.manifest.tail_tokens
kls = []
for ids in corpus_chunks(a, split_text("wiki-es", "eval"), 1024, 24):
    prompt, feed = ids[:895], ids[895:]
    m = coded_tokens(895, tail)
    layers = [reconstruct_layer(art, b, c) for c in encode(art, a, prompt[:m])]
    layers = refresh(b, layers, m, prompt, head)
    got = score(b, decode_state(b, layers, 895), feed)
    kls.append(kl(got, oracle_score(b, prompt, feed)))
    print(len(kls), round(kls[-1], 4), flush=True)
out = {"artifact": sys.argv[1], "refresh": [head, tail], "kl_dev": art.manifest.kl_dev,
       "kl": statistics.fmean(kls), "se": statistics.stdev(kls) / len(kls) ** 0.5,
       "chunks_le_eps": sum(x <= art.manifest.eps for x in kls), "kl_chunks": kls}  # fmt: skip
print(json.dumps({k: v for k, v in out.items() if k != "kl_chunks"}))
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=1)
