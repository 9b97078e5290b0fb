"""Paired held-out check of SCD artifacts against raw reuse (only those two methods, so it can
use more chunks than `scd eval`): per `wiki-es` eval chunk (896 + 128 tokens, the same chunks
`scd eval --chunks N` reads first), B's token KL against its own prefill and its NLL per token,
from A's raw cache and from each artifact's codes (FP16).

    [SCD_A=MODEL SCD_B=MODEL] .venv/bin/python benchmarks/results/scd-shrink-heldout.py \
        THREADS CHUNKS OUT.json ART...

The pair defaults to smollm2-135m -> smollm2-135m-wiki.
"""

import json
import math
import os
import statistics
import sys

import torch

from spectrumkv.engines.hf import decode_state, load
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.scd.artifact import load as load_artifact
from spectrumkv.scd.capture import capture
from spectrumkv.scd.codes import encode_layer, reconstruct_layer
from spectrumkv.scd.evaluate import rerotated
from spectrumkv.scd.metrics import kl, score
from spectrumkv.scd.splits import split_text


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    n, out, paths = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    arts = {p: load_artifact(p) for p in paths}
    a = load(os.environ.get("SCD_A", "smollm2-135m"))
    b = load(os.environ.get("SCD_B", "smollm2-135m-wiki"))
    inputs = set().union(*(set(x.manifest.patch_layers) for x in arts.values()))
    res = {k: {"kl": [], "nll": []} for k in ("oracle", "raw", *arts)}
    split = 1024 - 128
    for ids in corpus_chunks(a, split_text("wiki-es", "eval"), 1024, n):
        ca, cb = capture(a, ids[: split - 1], input_layers=inputs), capture(b, ids[: split - 1])
        feed, n_tok = ids[split - 1 :], cb.pre.n_tokens
        caches = {"oracle": cb.pre.layers, "raw": rerotated(a, b, ca.pre.layers)}
        for p, art in arts.items():
            caches[p] = [
                reconstruct_layer(art, b, encode_layer(art, a, i, kv, ca.inputs.get(i)))
                for i, kv in enumerate(ca.pre.layers)
            ]
        oracle = score(b, decode_state(b, caches["oracle"], n_tok), feed)
        for k, layers in caches.items():
            got = oracle if k == "oracle" else score(b, decode_state(b, layers, n_tok), feed)
            res[k]["kl"].append(kl(got, oracle))
            res[k]["nll"].append(got.nll / got.n)
        print({k: round(v["kl"][-1], 4) for k, v in res.items()}, flush=True)
    summary = {}
    for k, v in res.items():
        dkl = [x - y for x, y in zip(v["kl"], res["raw"]["kl"], strict=True)]
        dnll = [x - y for x, y in zip(v["nll"], res["raw"]["nll"], strict=True)]
        gap = statistics.fmean(v["nll"]) - statistics.fmean(res["oracle"]["nll"])
        summary[k] = {
            "kl": statistics.fmean(v["kl"]),
            "kl_minus_raw": statistics.fmean(dkl),
            "kl_minus_raw_se": statistics.stdev(dkl) / math.sqrt(n),
            "delta_ppl_pct": 100 * (math.exp(gap) - 1),
            "nll_minus_raw": statistics.fmean(dnll),
            "nll_minus_raw_se": statistics.stdev(dnll) / math.sqrt(n),
            "chunks_below_raw_kl": sum(x < 0 for x in dkl),
        }
        print(k, json.dumps(summary[k]))
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"chunks": n, "per_chunk": res, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
