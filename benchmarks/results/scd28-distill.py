"""SCD round 21 (session 28): distillation through the refresh, continued from a finished
artifact (its alphas, ranks, patches and refresh kept), then the refresh chosen again on dev from
the artifact's own grid (manifest `refresh_dev`), as `scd calibrate` does at its end.

    python benchmarks/results/scd28-distill.py ART A B STEPS CHUNKS OUT_ART

THREADS (env, default 1) sets torch's threads; lr 3e-5 and fixed chunks as `scd27.sh`.
"""

import os
import sys

import msgspec
import torch

from spectrumkv.engines.hf import load
from spectrumkv.scd.artifact import load as load_art
from spectrumkv.scd.artifact import save
from spectrumkv.scd.calibrate import CalibConfig, _choose_refresh, _Dev
from spectrumkv.scd.distill import distill

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
art = load_art(sys.argv[1])
a, b = load(sys.argv[2]), load(sys.argv[3])
steps, chunks, out = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
m = art.manifest
grid = tuple((h, t) for h, t, _ in m.refresh_dev)
fit = max(grid, key=sum) if grid else (m.head_tokens, m.tail_tokens)
cfg = CalibConfig(corpus=m.corpus, eps=m.eps, distill_steps=steps, distill_chunks=chunks,
                  head_tokens=fit[0], tail_tokens=fit[1], refresh_grid=grid)  # fmt: skip
dev = _Dev(a, b, cfg)
done = distill(a, b, art, cfg, dev.kl)
print("dev KL by step", done.dev_kl, "kept step", done.kept_step, flush=True)
art = done.artifact
art.manifest = msgspec.structs.replace(art.manifest, kl_dev=min(k for _, k in done.dev_kl))
if grid:
    art.manifest = _choose_refresh(art, dev, cfg)
save(art, out)
print(out, "refresh", art.manifest.head_tokens, art.manifest.tail_tokens, "dev KL",
      art.manifest.kl_dev, art.manifest.refresh_dev)  # fmt: skip
