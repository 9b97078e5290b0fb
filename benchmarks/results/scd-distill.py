"""Distil an existing SCD artifact's reuse-path decoders on B's output KL (scd/distill.py),
starting from its tensors instead of re-running the fits and the alpha search; patch layers and
their aligners are kept as they are. Writes the new artifact (kl_dev = the kept candidate's dev
KL) and a JSON with the training KL of every step and the dev KL of every candidate.

    [SCD_A=MODEL SCD_B=MODEL] .venv/bin/python benchmarks/results/scd-distill.py THREADS \
        INIT_ART OUT_ART OUT.json STEPS CHUNKS LR [WINDOWS]

WINDOWS: `fixed` (default: CHUNKS chunks prepared once and cycled) or `random` (a fresh window
of the calib split every step; CHUNKS is then the number of steps between dev checks).

The pair defaults to smollm2-135m -> smollm2-135m-wiki. The optimizer starts afresh (no AdamW
moments are stored in an artifact), so continuing a distilled artifact is not the same
trajectory as one longer run.
"""

import json
import os
import sys
import time

import msgspec
import torch

from spectrumkv.engines.hf import load
from spectrumkv.scd.artifact import load as load_artifact
from spectrumkv.scd.artifact import save
from spectrumkv.scd.calibrate import CalibConfig, _Dev
from spectrumkv.scd.distill import distill


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    init, out, out_json = sys.argv[2:5]
    steps, chunks, lr = int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
    windows = sys.argv[8] if len(sys.argv) > 8 else "fixed"
    art = load_artifact(init)
    m = art.manifest
    cfg = CalibConfig(corpus=m.corpus, prompts=m.prompts, code_budget=m.code_budget,
                      distill_steps=steps, distill_chunks=chunks, distill_lr=lr,
                      distill_windows=windows)  # fmt: skip
    a = load(os.environ.get("SCD_A", "smollm2-135m"))
    b = load(os.environ.get("SCD_B", "smollm2-135m-wiki"))
    t0 = time.perf_counter()
    dev = _Dev(a, b, cfg)
    got = distill(a, b, art, cfg, dev.kl)
    wall = time.perf_counter() - t0
    best = min(k for _, k in got.dev_kl)
    new = got.artifact
    new.manifest = msgspec.structs.replace(new.manifest, kl_dev=best)
    save(new, out)
    rec = {
        "command": "python " + " ".join(sys.argv),
        "init": init,
        "out": out,
        "steps": steps,
        "chunks": chunks,
        "lr": lr,
        "windows": windows,
        "wall_s": wall,
        "train_kl": got.train_kl,
        "dev_kl": got.dev_kl,
        "kept_step": got.kept_step,
        "kl_dev_start": got.dev_kl[0][1],
        "kl_dev_kept": best,
    }
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(rec, f, indent=1)
    print({k: v for k, v in rec.items() if k != "train_kl"})


if __name__ == "__main__":
    main()
