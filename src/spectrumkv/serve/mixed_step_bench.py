"""One engine iteration with a local prefill chunk, both ways, on the runner alone: "between"
(the chunk's HF forward over its DynamicCache, then the decode step) vs "mixed" (one step whose
rows are the decode tokens plus the chunk, serve.chunk_attention).

`python -m spectrumkv.serve.mixed_step_bench [--dtype float32] [--decoding 8] [--chunk 256]
[--start 768] [--reps 7]`: `decoding` requests of `decode_context` slots decode one token each
while a chunk of `chunk` tokens at slots `start`.. is prefilled; the two ways alternate `reps`
times in one process. Prints one JSON record: each way's median and min seconds per iteration,
the decode step alone, and mixed / between (median of the per-rep ratios).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import DynamicCache

from ..engines.hf import load
from ..paged.cache import PagedKVCache
from .chunk_attention import Chunk
from .runner import ModelRunner, pool_config


def run(dtype: str, decoding: int, decode_context: int, chunk: int, start: int, reps: int,
        threads: int | None) -> dict:  # fmt: skip
    engine = load("smollm2-135m", threads=threads, dtype=dtype)
    cache = PagedKVCache(pool_config(engine, 256))
    runner = ModelRunner(engine, cache)
    rids = list(range(decoding))
    toks = torch.randint(0, 40_000, (start + chunk,), generator=torch.Generator().manual_seed(0))
    prefix = DynamicCache(config=engine.model.config)
    model = engine.model
    with torch.inference_mode():
        model(input_ids=toks[:start].view(1, -1), past_key_values=prefix, use_cache=True)

    def decode() -> None:
        runner.step(rids, [5] * decoding, [decode_context] * decoding)

    def mixed() -> float:
        cache.allocate("p", start)
        t = time.perf_counter()
        runner.step(rids, [5] * decoding, [decode_context] * decoding,
                    Chunk("p", toks[start:].tolist(), start))  # fmt: skip
        dt = time.perf_counter() - t
        cache.free("p")
        return dt

    def between() -> float:
        kv = copy.deepcopy(prefix)
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=toks[start:].view(1, -1), past_key_values=kv, use_cache=True,
                  logits_to_keep=1)  # fmt: skip
        decode()
        return time.perf_counter() - t

    out: dict[str, list[float]] = {"mixed": [], "between": [], "decode": []}
    for r in range(reps + 1):
        for i in rids:  # each rep from the same decode lengths
            if r:
                cache.free(i)
            cache.allocate(i, decode_context)
        ways = (("mixed", mixed), ("between", between)) if r % 2 else (("between", between),
                                                                      ("mixed", mixed))  # fmt: skip
        got = {name: f() for name, f in ways}
        t = time.perf_counter()
        decode()
        got["decode"] = time.perf_counter() - t
        if r:  # the first round warms up
            for k, v in got.items():
                out[k].append(v)
    ratio = statistics.median(m / b for m, b in zip(out["mixed"], out["between"], strict=True))
    return {"dtype": dtype, "decoding": decoding, "decode_context": decode_context,
            "chunk": chunk, "start": start, "reps": reps,
            **{f"{k}_median_s": statistics.median(v) for k, v in out.items()},
            **{f"{k}_min_s": min(v) for k, v in out.items()},
            "mixed_over_between": ratio}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--decoding", type=int, default=8)
    ap.add_argument("--decode-context", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--start", type=int, default=768)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    print(json.dumps(run(a.dtype, a.decoding, a.decode_context, a.chunk, a.start, a.reps,
                         a.threads)), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
