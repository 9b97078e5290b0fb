"""4096-token rebuild time of SCD artifacts, interleaved rounds in one process (A's codes of one
`wiki-es` eval prompt computed once per artifact), against B's own prefill of the same prompt.

    .venv/bin/python benchmarks/results/scd-distill-timing.py OUT.json ART...
"""

import json
import sys
import time

import torch

from spectrumkv.engines.hf import decode_state, load, prefill
from spectrumkv.eval.ppl import corpus_chunks
from spectrumkv.scd.artifact import load as load_artifact
from spectrumkv.scd.capture import capture
from spectrumkv.scd.codes import encode_layer, reconstruct_layer
from spectrumkv.scd.splits import split_text


def main() -> None:
    torch.set_num_threads(2)
    out, paths = sys.argv[1], sys.argv[2:]
    a, b = load("smollm2-135m"), load("smollm2-135m-wiki")
    arts = {p: load_artifact(p) for p in paths}
    ids = corpus_chunks(a, split_text("wiki-es", "eval"), 4096, 1)[0]
    inputs = set().union(*(set(x.manifest.patch_layers) for x in arts.values()))
    cap = capture(a, ids, input_layers=inputs)
    codes = {
        p: [encode_layer(art, a, i, kv, cap.inputs.get(i)) for i, kv in enumerate(cap.pre.layers)]
        for p, art in arts.items()
    }
    res = {p: [] for p in arts}
    for _ in range(3):
        for p, art in arts.items():
            t0 = time.perf_counter()
            decode_state(b, [reconstruct_layer(art, b, x) for x in codes[p]], ids.numel())
            res[p].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    prefill(b, ids)
    pb = time.perf_counter() - t0
    rec = {
        "tokens": int(ids.numel()),
        "rebuild_s_rounds": res,
        "b_prefill_s": pb,
        "rebuild_over_prefill_min": {p: min(v) / pb for p, v in res.items()},
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
    print(rec)


if __name__ == "__main__":
    main()
