"""Measure how a local prefill (the recompute path) should share the engine with decode steps:
whole between two steps (`prefill_chunk` 0), in chunks with decode steps in between
(`prefill_mode` "between"), or in chunks batched into the decode step ("mixed").

`python -m spectrumkv.serve.prefill_mix [--chunks 0,128,256,512] [--modes between,mixed]
[--dtypes float32,bfloat16] [--rounds 2] ...` runs, in one process on the same prompts, for each
compute dtype, round, chunk and mode (the modes' order reversed every other round, so drift
falls on both): `decoding` requests (received KV of `decode_context` tokens each) decoding
`max_tokens` tokens; once they decode, one request arrives whose `prefill_context`-token prompt
must be prefilled locally. Reported per run, between that request's arrival and its first token:
the longest and median gap between consecutive decode steps (what the decoding requests' time
per output token suffers) and their decode tokens/s; the recompute request's TTFT; whether its
tokens equal those of the dtype's first run and how many decoding requests' tokens differ from
it (another mode or chunk sums in another order); the 1-minute load average. Prints one JSON
record a line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ..assets import load_text
from ..engines.hf import Engine, load, prefill
from ..pd.sampling import SamplingParams
from .engine import BatchEngine, EngineConfig


def _prompt(engine: Engine, words: list[str], start: int, n: int) -> torch.Tensor:
    ids = engine.tokenizer(" ".join(words[start : start + n]), return_tensors="pt")["input_ids"]
    return ids[0][:n]


def run(
    engine: Engine,
    chunks: list[int],
    decoding: int = 8,
    decode_context: int = 256,
    prefill_context: int = 2048,
    max_tokens: int = 48,
    modes: tuple[str, ...] = ("between",),
    rounds: int = 1,
) -> list[dict]:
    words = load_text("wiki").split()
    prompts = [_prompt(engine, words, 3000 * i, decode_context + 1) for i in range(decoding)]
    received = [(p[-1].item(), prefill(engine, p[:-1])) for p in prompts]
    long = _prompt(engine, words, 50_000, prefill_context + 1)
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    records, first = [], None
    for r in range(rounds):
        for chunk in chunks:
            for mode in modes if r % 2 == 0 else modes[::-1]:
                rec, outs = _one(engine, received, long, chunk, mode, max_tokens)
                first = first or (rec["recompute_tokens"], outs)
                rec.update(round=r, dtype=dtype, decoding=decoding,
                           prefill_context=prefill_context,
                           recompute_tokens_equal_first=rec["recompute_tokens"] == first[0],
                           decode_requests_differing_from_first=sum(
                               a != b for a, b in zip(outs, first[1], strict=True)),
                           load_1min=os.getloadavg()[0])  # fmt: skip
                records.append(rec)
                print(json.dumps(rec), flush=True)
    return records


def _one(engine, received, long, chunk: int, mode: str, max_tokens: int):
    """One run: the decoding batch, then the recompute request. Returns (record, the decoding
    requests' tokens)."""
    n = long.numel() - 1
    eng = BatchEngine(engine, EngineConfig(pool_mb=256, prefill_chunk=chunk, prefill_mode=mode))
    ends: list[float] = []
    eng.on_step = lambda *_: ends.append(time.perf_counter())
    p = SamplingParams(max_tokens=max_tokens)
    gens = [eng.submit(p, last, pre.n_tokens, layers=pre.layers) for last, pre in received]
    while len(ends) < 3:  # the batch is decoding
        time.sleep(0.01)
    rec = eng.submit(SamplingParams(max_tokens=8), long[-1].item(), n, context=long[:-1])
    rec.wait(3600)
    t0, t1 = rec.t_submit, rec.t_submit + rec.ttft_s  # arrival, first token
    outs = [g.wait(3600).token_ids for g in gens]
    eng.close()
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False) if t0 <= b <= t1]
    return {
        "prefill_chunk": chunk,
        "prefill_mode": mode,
        "max_step_gap_s": max(gaps, default=float("nan")),
        "median_step_gap_s": statistics.median(gaps) if gaps else float("nan"),
        "steps_during_prefill": len(gaps),
        "recompute_ttft_s": rec.ttft_s,
        "decode_tok_s_during_prefill": len(gaps) * len(gens) / (t1 - t0),
        "recompute_tokens": rec.token_ids,
    }, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--chunks", default="0,128,256,512")
    ap.add_argument("--decoding", type=int, default=8)
    ap.add_argument("--decode-context", type=int, default=256)
    ap.add_argument("--prefill-context", type=int, default=2048)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--modes", default="between,mixed")
    ap.add_argument("--dtypes", default="float32", help="compute dtypes, one model each")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="write the records here")
    a = ap.parse_args()
    records = []
    for dtype in a.dtypes.split(","):
        engine = load(a.model, threads=a.threads, dtype=dtype)
        records += run(engine, [int(c) for c in a.chunks.split(",")], a.decoding,
                       a.decode_context, a.prefill_context, a.max_tokens,
                       tuple(a.modes.split(",")), a.rounds)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
