"""The batch engine's decode step, measured apart: its time per compute dtype, where it goes,
and how far it is from the memory-bandwidth limit; and bf16 vs float32 output quality.

    python -m spectrumkv.serve.step_bench --dtypes float32,bfloat16 --batch 16 --rounds 3 \
        --breakdown --quality 8 --json benchmarks/results/decode_step.json

Step: `batch` requests at the context lengths of a paged.traces mix (default the issue's:
uniform x 1/16 = 250-2,000 tokens), their pages (`--kv-dtype`, fp16 by default) filled with
seeded random K/V (the step's cost does not depend on the values), one ModelRunner.step per
decode token, the dtypes in alternation (`rounds` x `steps` each), so they see the same machine
load.

Limit: a step reads every weight once (`weight_bytes`, in the compute dtype) and every active
request's K/V once (`kv_bytes`, at the median step's lengths; a sliding-window layer reads at
most its window). Two rates, both measured in this run on the same threads: a read rate (torch
sum over a 256 MiB buffer: bytes read / s) and the plain-copy rate (bytes copied / s; a copy
reads and writes each byte, so it is the looser limit the issue names). limit = (weight_bytes +
kv_bytes) / rate.

Paths (`--paths`, timed in the same alternation; labels `<dtype>` for the first, else
`<dtype>/<path>`): `serve`, the runner's step as it serves (engines.llama_step with the compiled
row ops for Llama-family models, the HF forward for others); `torch-ops`, llama_step with the
row ops' torch references; `hf`, the generic HF forward.

Breakdown (`--breakdown`): exclusive seconds per part from forward hooks on the HF modules
(projections, norms, MLP, LM head, the rest of each module = RoPE/reshapes/residuals) and the
attention function (KV write into pages, the paged-attention route); "HF overhead" is what the
model's forward spends outside its submodules. On the llama_step path only the projections, LM
head and embeddings are module calls: the rest of the step is "small ops". The hooks cost a
little time themselves.

Quality (`--quality N`): N corpus prompts (the trace's first N lengths, prefilled in float32 as
the prefill worker does), decoded greedily `--decode` tokens by a BatchEngine of each dtype
together; per request, where its tokens first differ from float32's, from the same engine
decoding it alone (batch invariance), and from the HF one-at-a-time path.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

import torch

from ..engines import llama_step
from ..engines.hf import COMPUTE_DTYPES, Engine, decode_state, generate, load, prefill
from ..kv import LayerKV
from ..paged import kernel, traces
from ..paged.bench import copy_bandwidth
from ..paged.cache import PagedKVCache
from ..pd.sampling import SamplingParams
from .bench import DecodeBench, make_requests, read_bandwidth, weight_bytes
from .engine import BatchEngine, EngineConfig
from .runner import ModelRunner, pool_config


class _Batch:
    """`lens` requests in a fresh page pool with random K/V; `step()` feeds one token each."""

    def __init__(
        self, engine: Engine, lens: list[int], route: str, seed: int = 0, path: str = "serve"
    ) -> None:
        fp = engine.fingerprint
        self.cache = PagedKVCache(pool_config(engine, 64 + 2 * sum(lens) * _token_mib(engine)))
        self.runner = ModelRunner(engine, self.cache, route, fast=path != "hf")
        if path == "torch-ops":
            self.runner.fast = llama_step.build(engine.model, compiled=False)
        g = torch.Generator().manual_seed(seed)
        for rid, n in enumerate(lens):
            shape = (fp.n_kv_heads, n, fp.head_dim)
            kv = engine.kv_dtype
            layers = [LayerKV(torch.randn(shape, generator=g).to(kv),
                              torch.randn(shape, generator=g).to(kv), torch.arange(n))
                      for _ in range(fp.n_layers)]  # fmt: skip
            self.runner.write_prompt(rid, layers, n)
        self.rids = list(range(len(lens)))
        self.positions = list(lens)

    def step(self) -> torch.Tensor:
        tokens = [100 + r for r in self.rids]
        out = self.runner.step(self.rids, tokens, self.positions)
        self.positions = [p + 1 for p in self.positions]
        return out

    def kv_bytes(self) -> int:
        """K/V bytes the next step reads (every slot of every request; at most the window in
        sliding-window layers)."""
        slots = [self.cache.length(r) + 1 for r in self.rids]
        itemsize = self.cache.config.dtype.itemsize
        return self.runner.engine.fingerprint.step_read_bytes(slots, itemsize)


PATHS = ("serve", "torch-ops", "hf")
_OPS = {True: "compiled row ops", False: "torch row ops"}


def _token_mib(engine: Engine) -> float:
    return engine.fingerprint.kv_token_bytes(engine.kv_dtype.itemsize) / (1 << 20)


_PARTS = {  # HF submodule name -> part
    "q_proj": "q/k/v projections", "k_proj": "q/k/v projections",
    "v_proj": "q/k/v projections", "o_proj": "o projection",
    "gate_proj": "MLP projections", "up_proj": "MLP projections", "down_proj": "MLP projections",
    "input_layernorm": "norms", "post_attention_layernorm": "norms", "norm": "norms",
    "pre_feedforward_layernorm": "norms", "post_feedforward_layernorm": "norms",
    "q_norm": "norms", "k_norm": "norms",
    "self_attn": "attention module rest (RoPE, reshapes)", "mlp": "MLP rest (activation, mul)",
    "lm_head": "LM head", "embed_tokens": "embeddings", "rotary_emb": "RoPE tables",
}  # fmt: skip


def breakdown(batch: _Batch, steps: int) -> dict[str, float]:
    """Exclusive ms per step by part (see module doc), over `steps` steps."""
    from . import runner as runner_mod

    acc: dict[str, float] = collections.defaultdict(float)
    stack: list[tuple[str, float]] = []

    def enter(part):
        return lambda *a, **k: stack.append((part, time.perf_counter()))

    def leave(*a, **k):
        part, t0 = stack.pop()
        dt = time.perf_counter() - t0
        acc[part] += dt
        if stack:
            acc[stack[-1][0]] -= dt

    model = batch.runner.engine.model
    hooks = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        part = _PARTS.get(leaf)
        if leaf.isdigit():
            part = "decoder layer rest (residuals)"
        elif mod is model:
            part = "HF overhead"
        if part:
            hooks += [mod.register_forward_pre_hook(enter(part)),
                      mod.register_forward_hook(leave)]  # fmt: skip
    timed = runner_mod.timed_parts = acc  # the attention function adds its two parts
    try:
        batch.step()
        acc.clear()
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = batch.step()
            t1 = time.perf_counter()
            logits.argmax(-1).tolist()
            acc["step (total)"] += t1 - t0
            acc["greedy sampling"] += time.perf_counter() - t1
    finally:
        runner_mod.timed_parts = None
        for h in hooks:
            h.remove()
    if batch.runner.fast is None:  # the attention function ran inside the self_attn hook
        acc["attention module rest (RoPE, reshapes)"] -= (
            timed["KV write"] + timed["paged attention"]
        )
    else:  # llama_step: only the linears and embeddings are module calls
        hooked = sum(v for k, v in acc.items() if k not in ("step (total)", "greedy sampling"))
        acc["small ops (norms, RoPE, SiLU, residuals)"] = acc["step (total)"] - hooked
    return {k: 1000 * v / steps for k, v in sorted(acc.items(), key=lambda kv: -kv[1])}


def time_steps(batches: dict[str, _Batch], steps: int, rounds: int) -> dict[str, list[float]]:
    """Per dtype, every step's seconds; the dtypes alternate `rounds` times."""
    out: dict[str, list[float]] = {d: [] for d in batches}
    for _ in range(rounds):
        for d, b in batches.items():
            b.step()  # warm
            for _ in range(steps):
                t0 = time.perf_counter()
                b.step()
                out[d].append(time.perf_counter() - t0)
    return out


def _engine_tokens(
    eng: Engine, pairs, decode: int, max_batch: int, route: str, fast: bool = True
) -> list[list[int]]:
    """Greedy tokens of every (request, prefilled) pair through a BatchEngine that decodes at
    most `max_batch` of them together (1: each alone, one after another); `fast=False`: its
    runner takes the generic HF forward."""
    be = BatchEngine(eng, EngineConfig(pool_mb=256, max_batch=max_batch, max_queue=len(pairs),
                                       queue_timeout_s=3600, route=route))  # fmt: skip
    if not fast:
        be.runner.fast = None  # set before any request: the engine thread has not stepped
    try:
        greedy = SamplingParams(max_tokens=decode)
        gens = [be.submit(greedy, r.last, p.n_tokens, layers=p.layers) for r, p in pairs]
        return [g.wait(3600).token_ids for g in gens]
    finally:
        be.close()


def _first_differences(toks: list[list[int]], base: list[list[int]]) -> list[int | None]:
    return [next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
            for a, b in zip(toks, base, strict=True)]  # fmt: skip


def quality(engines: dict[str, Engine], n: int, decode: int, seed: int, route: str) -> dict:
    """Per dtype, greedy tokens of n corpus prompts decoded together, against: float32's;
    the same engine decoding each alone (batch 1: batch invariance); the same engine's runner
    on the generic HF forward instead of llama_step (where it has one); and the one-at-a-time
    HF path (engines.hf generate: a DynamicCache in the compute dtype, HF's own attention).
    First differing token index per request (None: identical)."""
    ref = engines["float32"]
    reqs = make_requests(ref, DecodeBench(n=n, decode=decode, seed=seed))
    pairs = [(r, prefill(ref, r.context)) for r in reqs]
    out: dict = {}
    for d, eng in engines.items():
        toks = _engine_tokens(eng, pairs, decode, n, route)
        alone = _engine_tokens(eng, pairs, decode, 1, route)
        hf = [generate(eng, decode_state(eng, p.layers, p.n_tokens), r.last, decode)
              for r, p in pairs]  # fmt: skip
        out[d] = {"tokens": toks, "vs_engine_alone": _first_differences(toks, alone),
                  "vs_hf_alone": _first_differences(toks, hf)}  # fmt: skip
        if llama_step.build(eng.model) is not None:
            generic = _engine_tokens(eng, pairs, decode, n, route, fast=False)
            out[d]["vs_generic_path"] = _first_differences(toks, generic)
    for d in engines:
        out[d]["vs_float32"] = _first_differences(out[d]["tokens"], out["float32"]["tokens"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--trace", default="uniform")
    p.add_argument("--scale", type=float, default=1 / 16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per dtype per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--route", default="adaptive")
    p.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="pages' dtype (bfloat16: the AMX kernel, on CPUs with AMX)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--breakdown", action="store_true", help="per-part ms per step")
    p.add_argument("--paths", default="serve", help="of serve,torch-ops,hf (module doc)")
    p.add_argument("--quality", type=int, default=0, help="N prompts: bf16 vs float32 tokens")
    p.add_argument("--decode", type=int, default=32, help="quality: greedy tokens per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    a = p.parse_args(argv)
    dtypes = [d for d in a.dtypes.split(",") if d]
    if not dtypes or any(d not in COMPUTE_DTYPES for d in dtypes):
        p.error(f"--dtypes: of {list(COMPUTE_DTYPES)}")
    if a.quality and "float32" not in dtypes:
        p.error("--quality compares with float32: include it in --dtypes")
    torch.set_num_threads(a.threads)
    lens = traces.lengths(a.trace, a.batch, a.seed, a.scale)
    engines = {d: load(a.model, a.kv_dtype, dtype=d) for d in dtypes}
    paths = [x for x in a.paths.split(",") if x]
    if not paths or any(x not in PATHS for x in paths):
        p.error(f"--paths: of {list(PATHS)}")
    if paths != ["serve"] and llama_step.build(engines[dtypes[0]].model) is None:
        p.error(f"--paths: {a.model} has no llama_step path, it always runs the HF forward")
    labels = {x: "" if i == 0 else f"/{x}" for i, x in enumerate(paths)}
    batches = {d + labels[x]: _Batch(e, lens, a.route, a.seed, x)
               for x in paths for d, e in engines.items()}  # fmt: skip
    load0 = os.getloadavg()[0]
    times = time_steps(batches, a.steps, a.rounds)
    read_bw, copy_bw = read_bandwidth(), copy_bandwidth(256 << 20)
    rec: dict = {"model": a.model, "batch": a.batch, "lens": lens, "threads": a.threads,
                 "kv_dtype": a.kv_dtype, "kernel_isa": kernel.isa() if kernel.AVAILABLE else None,
                 "read_gbps": read_bw / 1e9, "copy_gbps": copy_bw / 1e9, "dtypes": {}}  # fmt: skip
    for d, b in batches.items():
        wb, kv = weight_bytes(b.runner.engine.model), b.kv_bytes()
        fast = b.runner.fast
        path = "HF forward" if fast is None else f"llama_step ({_OPS[fast.compiled]})"
        kv -= (a.rounds * (a.steps + 1) // 2) * (kv // sum(b.positions))  # at the median step
        med = statistics.median(times[d])
        r = rec["dtypes"][d] = {
            "step_ms_median": 1000 * med, "step_ms_min": 1000 * min(times[d]),
            "weight_bytes": wb, "kv_bytes": kv, "route": b.runner.last_route, "path": path,
            "limit_read_ms": 1000 * (wb + kv) / read_bw,
            "limit_copy_ms": 1000 * (wb + kv) / copy_bw,
        }  # fmt: skip
        r["x_read_limit"] = r["step_ms_median"] / r["limit_read_ms"]
        r["x_copy_limit"] = r["step_ms_median"] / r["limit_copy_ms"]
        print(f"{d:>9}: step median {r['step_ms_median']:.1f} ms (min {r['step_ms_min']:.1f}), "
              f"weights {wb / 1e6:.0f} MB + KV {kv / 1e6:.0f} MB; limit {r['limit_read_ms']:.1f} "
              f"ms at read {read_bw / 1e9:.2f} GB/s ({r['x_read_limit']:.2f}x), "
              f"{r['limit_copy_ms']:.1f} ms at copy {copy_bw / 1e9:.2f} GB/s "
              f"({r['x_copy_limit']:.2f}x); route {r['route']}; {path}", flush=True)  # fmt: skip
    med = {d: r["step_ms_median"] for d, r in rec["dtypes"].items()}
    for d in dtypes[1:]:
        print(f"{dtypes[0]} / {d} step time: {med[dtypes[0]] / med[d]:.2f}x")
    for d in dtypes:
        for x in paths[1:]:
            print(f"{d}: {x} / {paths[0]} step time: {med[d + labels[x]] / med[d]:.2f}x")
    if a.breakdown:
        for d, b in batches.items():
            parts = rec["dtypes"][d]["breakdown_ms"] = breakdown(b, a.steps)
            print(f"{d} breakdown (ms per step, exclusive):")
            for k, v in parts.items():
                print(f"  {k:<42} {v:8.1f}")
    rec["loadavg_1m"] = [load0, os.getloadavg()[0]]
    print(f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    del batches
    if a.quality:
        q = rec["quality"] = quality(engines, a.quality, a.decode, a.seed, a.route)
        for d, r in q.items():
            for key, what in (("vs_float32", "float32's"), ("vs_engine_alone", "alone (batch 1)"),
                              ("vs_generic_path", "the runner's generic HF forward"),
                              ("vs_hf_alone", "the HF one-at-a-time path")):  # fmt: skip
                if key not in r:
                    continue
                firsts = r[key]
                same = sum(f is None for f in firsts)
                print(f"{d} batched: {same}/{a.quality} token-identical to {what}; first "
                      f"difference at {firsts}")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rec, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
