"""SCD round 21 (session 28): where an artifact's remaining error sits, by oracle splices. On the
held-out wiki-es chunks of `scd eval` (895 + 128 tokens), B's cache rebuilt from codes with the
artifact's refresh; then, one at a time, with B's own prefill's rows put in place of
- one layer's rows (the KL that layer alone accounts for: base KL - KL with it replaced);
- the k positions whose rebuilt rows deviate most from B's own (squared error over all layers,
  each layer's relative to its mean squared row norm), k = 8, 32, 64, 128, and 64 random
  positions as the control.
These are upper bounds on what a better map of one layer, or a recompute of chosen tokens,
could gain: a real recompute attends to the rebuilt rows of the other tokens.

    python benchmarks/results/scd28-attribution.py ART A B CHUNKS benchmarks/results/OUT.json

THREADS (env, default 2) sets torch's threads.
"""

import json
import os
import statistics
import sys

import torch

from spectrumkv.engines.hf import decode_state, load
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.kv import LayerKV
from spectrumkv.scd.artifact import load as load_art
from spectrumkv.scd.capture import capture
from spectrumkv.scd.codes import encode, reconstruct_layer
from spectrumkv.scd.metrics import kl, score
from spectrumkv.scd.refresh import coded_tokens, refresh, splice
from spectrumkv.scd.splits import split_text

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
art = load_art(sys.argv[1])
a, b = load(sys.argv[2]), load(sys.argv[3])
chunks, out_path = int(sys.argv[4]), sys.argv[5]
head, tail = art.manifest.head_tokens, art.manifest.tail_tokens
TOP = (8, 32, 64, 128)


def rows_at(layers: list[LayerKV], sel: torch.Tensor) -> list[LayerKV]:
    """Each layer's rows at the positions `sel` (those it holds)."""
    out = []
    for kv in layers:
        keep = torch.isin(kv.positions, sel)
        out.append(LayerKV(kv.keys[:, keep], kv.values[:, keep], kv.positions[keep]))
    return out


def deviation(layers: list[LayerKV], own: list[LayerKV], n: int) -> torch.Tensor:
    """[n] per position: squared error of the rebuilt K and V rows, summed over layers, each
    relative to the layer's mean squared row norm in B's own cache."""
    dev = torch.zeros(n)
    for r, o in zip(layers, own, strict=True):
        for x, y in ((r.keys, o.keys), (r.values, o.values)):
            x, y = x.float(), y.float()
            dev.index_add_(0, o.positions, ((x - y) ** 2).sum((0, 2)) / (y**2).sum((0, 2)).mean())
    return dev


res = []
for n, ids in enumerate(corpus_chunks(a, split_text("wiki-es", "eval"), 1024, chunks), 1):
    prompt, feed = ids[:895], ids[895:]
    own = capture(b, prompt).pre.layers
    oracle = score(b, decode_state(b, own, 895), feed)

    def kl_of(layers: list[LayerKV], feed=feed, oracle=oracle) -> float:
        return kl(score(b, decode_state(b, layers, 895), feed), oracle)

    m = coded_tokens(895, tail)
    rebuilt = refresh(b, [reconstruct_layer(art, b, c) for c in encode(art, a, prompt[:m])], m,
                      prompt, head)  # fmt: skip
    base = kl_of(rebuilt)
    layer_gain = [base - kl_of(rebuilt[:i] + [own[i]] + rebuilt[i + 1 :]) for i in range(len(own))]
    order = torch.argsort(deviation(rebuilt, own, 895), descending=True)
    top = {k: kl_of(splice(rebuilt, rows_at(own, order[:k].sort().values))) for k in TOP}
    rand = torch.randperm(895, generator=torch.Generator().manual_seed(n))[:64].sort().values
    r = {"chunk": n, "kl": base, "layer_gain": layer_gain, "kl_top": top,
         "kl_random64": kl_of(splice(rebuilt, rows_at(own, rand)))}  # fmt: skip
    res.append(r)
    print(n, round(base, 4), {k: round(v, 4) for k, v in top.items()}, flush=True)

gain = [statistics.fmean(r["layer_gain"][i] for r in res) for i in range(len(res[0]["layer_gain"]))]
summary = {
    "artifact": sys.argv[1], "models": sys.argv[2:4], "refresh": [head, tail], "chunks": len(res),
    "kl": statistics.fmean(r["kl"] for r in res),
    "layer_gain": gain,
    "layer_gain_se": [statistics.stdev(r["layer_gain"][i] for r in res) / len(res) ** 0.5
                      for i in range(len(gain))],
    "kl_top": {k: statistics.fmean(r["kl_top"][k] for r in res) for k in TOP},
    "kl_random64": statistics.fmean(r["kl_random64"] for r in res),
    "per_chunk": res,
}  # fmt: skip
print(json.dumps({k: v for k, v in summary.items() if k != "per_chunk"}))
with open(out_path, "w") as f:
    json.dump(summary, f, indent=1)
