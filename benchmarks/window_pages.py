"""KV pages of a sliding-window model (Gemma-3) with and without window groups (issue 17 item 1).

Gemma-3-270m attends over a 512-token window in 15 of its 18 layers. The batch engine's pool
(serve.runner.pool_config) makes those layers window layers: each step releases their pages
below every request's window, so they hold about a window per request, not the context
(paged.cache). This measures, per context length, on B requests of random K/V (the values do
not change what is held or how long a step takes) written as received prompts:

- page ids held and K/V bytes after `--steps` decode steps, window groups vs a pool of the same
  model without window layers (every layer keeps every slot: the engine before this change);
- requests of that length (+ `--max-tokens`) a `--pool-mb` pool admits (BatchEngine's
  reservation: cache.pages_needed);
- the decode step's time, the two pools alternating step by step in one process;
- the largest logit difference between the two (the same kernel over the same visible slots:
  expected 0).

    .venv/bin/python benchmarks/window_pages.py --lengths 1024,4096,16384 --batch 4 \
        --json benchmarks/results/window_pages.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from spectrumkv.engines.hf import load
from spectrumkv.kv import LayerKV
from spectrumkv.paged.cache import PagedConfig, PagedKVCache
from spectrumkv.serve.runner import ModelRunner, pool_config


def pools(engine, n_tokens: int) -> dict[str, PagedKVCache]:
    """The engine's pool (window groups) and the same pool without window layers, each large
    enough to hold `n_tokens` slots in every layer."""
    token_bytes = engine.fingerprint.kv_token_bytes(engine.kv_dtype.itemsize)
    window = pool_config(engine, 1.25 * n_tokens * token_bytes / 2**20)
    whole = PagedConfig.for_model(engine.model.config, window.pages * window.group_size
                                  // window.layers, window.page_size, window.dtype)  # fmt: skip
    return {"window": PagedKVCache(window), "whole": PagedKVCache(whole)}


def fill(engine, runners: dict[str, ModelRunner], n: int, batch: int, seed: int) -> None:
    """`batch` prompts of n random tokens' K/V, written into every runner's pages."""
    fp, g = engine.fingerprint, torch.Generator().manual_seed(seed)
    for rid in range(batch):
        shape = (fp.n_kv_heads, n, fp.head_dim)
        layers = [LayerKV(torch.randn(shape, generator=g).to(engine.kv_dtype),
                          torch.randn(shape, generator=g).to(engine.kv_dtype), torch.arange(n))
                  for _ in range(fp.n_layers)]  # fmt: skip
        for runner in runners.values():
            runner.write_prompt(rid, layers, n)


def measure(engine, n: int, args) -> dict:
    caches = pools(engine, args.batch * (n + args.steps + 32))
    runners = {name: ModelRunner(engine, c, args.route) for name, c in caches.items()}
    fill(engine, runners, n, args.batch, args.seed)
    rids, tokens = list(range(args.batch)), [1] * args.batch
    times: dict[str, list[float]] = {name: [] for name in runners}
    diff = 0.0
    for step in range(args.steps):
        positions = [n + step] * args.batch
        logits = {}
        for name, runner in runners.items():
            t0 = time.perf_counter()
            logits[name] = runner.step(rids, tokens, positions)
            times[name].append(time.perf_counter() - t0)
        diff = max(diff, (logits["window"] - logits["whole"]).abs().max().item())
    out = {"context": n, "batch": args.batch, "steps": args.steps, "max_logit_diff": diff}
    fp = engine.fingerprint
    for name, cache in caches.items():
        c = cache.config
        held = c.pages - cache.free_pages
        window = fp.sliding_window if c.window_layers else 0
        need = cache.pages_needed(n + args.max_tokens, window)
        out[name] = {
            "page_ids_held": held,
            "kv_mb": held * c.id_bytes / 2**20,
            "kv_mb_per_request": held * c.id_bytes / 2**20 / args.batch,
            "admitted_in_pool": int(args.pool_mb * 2**20) // c.id_bytes // need,
            "step_ms_median": statistics.median(times[name][1:]) * 1e3,
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=9, help="decode steps (the first untimed)")
    p.add_argument("--max-tokens", type=int, default=256, help="reserved per request")
    p.add_argument("--pool-mb", type=float, default=512.0)
    p.add_argument("--route", default="adaptive")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--kv-dtype", default="bfloat16", choices=["float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = load(args.model, kv_dtype=args.kv_dtype, dtype=args.dtype)
    rows = [measure(engine, int(n), args) for n in args.lengths.split(",")]
    print(f"{args.model}, {args.batch} requests, pool {args.pool_mb:.0f} MB, "
          f"+{args.max_tokens} tokens reserved, {args.threads} threads")  # fmt: skip
    print("context | KV MB/request whole | window | ratio | admitted whole | window | "
          "step ms whole | window | max logit diff")  # fmt: skip
    for r in rows:
        a, b = r["whole"], r["window"]
        cells = [f"{r['context']:>7}", f"{a['kv_mb_per_request']:.1f}",
                 f"{b['kv_mb_per_request']:.1f}", f"{a['kv_mb'] / b['kv_mb']:.2f}x",
                 str(a["admitted_in_pool"]), str(b["admitted_in_pool"]),
                 f"{a['step_ms_median']:.2f}", f"{b['step_ms_median']:.2f}",
                 f"{r['max_logit_diff']:.1e}"]  # fmt: skip
        print(" | ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
