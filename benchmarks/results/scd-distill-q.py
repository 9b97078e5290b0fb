"""SCD with quantized codes (INT8/INT4 tiers by importance at 0.5 of raw FP16 KV bytes, as
`scd eval`'s scd-q0.5) on the first N `wiki-es` eval chunks (896 + 128 tokens), for each artifact
given: B's mean token KL against its own prefill and ΔPPL, paired on the same chunks.

    .venv/bin/python benchmarks/results/scd-distill-q.py THREADS CHUNKS OUT.json ART...
"""

import json
import math
import statistics
import sys

import torch

from spectrumkv.engines.hf import decode_state, load
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.scd.artifact import load as load_artifact
from spectrumkv.scd.capture import capture
from spectrumkv.scd.codes import encode_layer, reconstruct_layer
from spectrumkv.scd.evaluate import _payload
from spectrumkv.scd.metrics import kl, score
from spectrumkv.scd.splits import split_text
from spectrumkv.scd.wire import Layout, decode


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    n, out, paths = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    arts = {p: load_artifact(p) for p in paths}
    a, b = load("smollm2-135m"), load("smollm2-135m-wiki")
    inputs = set().union(*(set(x.manifest.patch_layers) for x in arts.values()))
    res = {p: {"kl": [], "nll": [], "bytes": []} for p in ("oracle", *arts)}
    split = 1024 - 128
    for ids in corpus_chunks(a, split_text("wiki-es", "eval"), 1024, n):
        ca, cb = capture(a, ids[: split - 1], input_layers=inputs), capture(b, ids[: split - 1])
        feed, n_tok = ids[split - 1 :], cb.pre.n_tokens
        oracle = score(b, decode_state(b, cb.pre.layers, n_tok), feed)
        res["oracle"]["kl"].append(0.0)
        res["oracle"]["nll"].append(oracle.nll / oracle.n)
        for p, art in arts.items():
            cs = [
                encode_layer(art, a, i, kv, ca.inputs.get(i)) for i, kv in enumerate(ca.pre.layers)
            ]
            payload = _payload(Layout.of(art), cs, ca.pre, 0.5)
            cs = decode(payload, Layout.of(art))[1]
            got = score(b, decode_state(b, [reconstruct_layer(art, b, c) for c in cs], n_tok), feed)
            res[p]["kl"].append(kl(got, oracle))
            res[p]["nll"].append(got.nll / got.n)
            res[p]["bytes"].append(len(payload))
        print({k: round(v["kl"][-1], 4) for k, v in res.items()}, flush=True)
    fp = a.fingerprint
    raw = fp.n_layers * 2 * fp.n_kv_heads * fp.head_dim * 2 * n_tok
    summary = {
        p: {
            "kl": statistics.fmean(v["kl"]),
            "delta_ppl_pct": 100
            * (math.exp(statistics.fmean(v["nll"]) - statistics.fmean(res["oracle"]["nll"])) - 1),
            "bytes_ratio": statistics.fmean(v["bytes"]) / raw if v["bytes"] else 1.0,
        }
        for p, v in res.items()
    }
    print(json.dumps(summary, indent=1))
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"chunks": n, "budget": 0.5, "per_chunk": res, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
