"""Causal prefill attention: engines.flash's kernel (AMX or AVX512-BF16: `flash.isa()`) against
torch's SDPA and vLLM's CPU attention (its `cpu_attention_with_kv_cache` on one prompt), and
SmolLM2-135M's whole bf16 prefill with the kernel on and off.

Part 1, attention alone: SmolLM2's shape (9 query heads over 3 KV heads, head_dim 64; `--shapes
7b-gqa` adds a 7B-class one: 32 over 8, head_dim 128), bf16, one prompt of T tokens; per T, the
three are timed interleaved, `--rounds` times each, best and median printed with TFLOP/s
(2 T^2 d Hq: causal QK^T and PV), the max abs error against a float64
reference, and the roof: a oneDNN bf16 matmul's TFLOP/s measured in the same run (what this
core's AMX or AVX512-BF16 reaches on a plain GEMM). Part 2, the model: `engines.hf.prefill` of T
tokens of `wiki` in bf16, three ways interleaved: `step` (the hand-written Llama forward of
engines.step_prefill with the kernel, the default; with SDPA on a CPU without AVX512-BF16),
`hf-flash` (the HF forward with the kernel; CPUs with AVX512-BF16 only), `hf-sdpa` (the HF
forward with torch's SDPA); best and median seconds, each one's speedup over `hf-sdpa`, the
largest relative difference of any layer's K against `hf-sdpa`, and the roof: the layers' GEMM
and attention flops at the best GEMM rate measured between the rounds.

    .venv/bin/python benchmarks/prefill_attention.py --threads 1 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from spectrumkv.engines import flash, hf, step_prefill

HQ, HKV, D = 9, 3, 64  # SmolLM2-135M's attention (the model of part 2)
SHAPES = {"smollm2-135m": (HQ, HKV, D), "7b-gqa": (32, 8, 128)}  # (q heads, KV heads, head_dim)


def timed(fn, rounds: int) -> list[float]:
    fn()  # warm
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def vllm_prefill(q, k, v):
    """vLLM's CPU attention on one prompt (q [T, Hq, D], k/v [T, Hkv, D] bf16), or None when
    vLLM's ops are not installed. Returns a callable that runs it and its output buffer."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except Exception:  # noqa: BLE001 - no vLLM: no anchor
        return None
    torch._C._cpu._init_amx()  # vLLM's kernel does not ask Linux for the tile state itself
    (t, hq, d), hkv, bs = q.shape, k.shape[1], 32
    isa = _get_attn_isa(q.dtype, bs, d)
    pages = -(-t // bs)
    cache = torch.zeros(pages, hkv, bs, 2 * d, dtype=q.dtype)
    kc, vc = cache.view(pages, hkv, 2 * bs, d).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, torch.arange(t), isa)
    tables = torch.arange(pages, dtype=torch.int32)[None]
    lengths, starts = torch.tensor([t], dtype=torch.int32), torch.tensor([0, t], dtype=torch.int32)
    out = torch.empty_like(q)

    def run():
        meta = ops.cpu_attn_get_scheduler_metadata(
            1, hq, hkv, d, lengths, q.dtype, starts, True, -1, isa, True
        )
        ops.cpu_attention_with_kv_cache(
            q, kc, vc, out, starts, lengths, d**-0.5, True, None, -1, tables, 0.0, meta, None
        )

    return run, out


def attention(t: int, rounds: int, shape: str = "smollm2-135m") -> dict:
    hq, hkv, d = SHAPES[shape]
    g = torch.Generator().manual_seed(t)
    q = torch.randn(t, hq, d, generator=g).to(torch.bfloat16)
    k = torch.randn(t, hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(t, hkv, d, generator=g).to(torch.bfloat16)
    qh, kh, vh = (x.transpose(0, 1) for x in (q, k, v))  # [heads, T, D] views, as models pass
    ref = F.scaled_dot_product_attention(
        qh.double(), kh.double().repeat_interleave(hq // hkv, 0),
        vh.double().repeat_interleave(hq // hkv, 0), is_causal=True,
    ).transpose(0, 1)  # fmt: skip
    runs = {
        "sdpa": lambda: F.scaled_dot_product_attention(
            qh[None], kh[None], vh[None], is_causal=True, enable_gqa=True
        )[0].transpose(0, 1),
    }
    if flash.AVAILABLE:
        runs["flash"] = lambda: flash.causal(qh, kh, vh)
    anchor = vllm_prefill(q, k, v)
    if anchor is not None:
        runs["vllm"] = lambda: (anchor[0](), anchor[1])[1]
    err = {name: (fn().double() - ref).abs().max().item() for name, fn in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved
        for name, fn in runs.items():
            times[name] += timed(fn, 1)
    flop = 2 * t * t * d * hq
    return {
        "shape": shape,
        "tokens": t,
        "flop": flop,
        "routes": {
            name: {
                "best_ms": 1e3 * min(ts),
                "median_ms": 1e3 * statistics.median(ts),
                "tflops": flop / min(ts) / 1e12,
                "max_abs_err": err[name],
            }  # fmt: skip
            for name, ts in times.items()
        },
    }


def gemm_tflops(rounds: int) -> float:
    """A oneDNN bf16 GEMM of prefill's size (2,048 x 576 by 1,536): the GEMM roof here."""
    a = torch.randn(2048, 576).to(torch.bfloat16)
    w = torch.randn(1536, 576).to(torch.bfloat16)
    best = min(timed(lambda: F.linear(a, w), rounds))
    return 2 * 2048 * 576 * 1536 / best / 1e12


#: whole-prefill variants: (hand-written Llama step, flash attention kernel); on a CPU without
#: AVX512-BF16, `step` runs with SDPA and `hf-flash` is left out
VARIANTS = {"step": (True, True), "hf-flash": (False, True), "hf-sdpa": (False, False)}
if not flash.AVAILABLE:
    del VARIANTS["hf-flash"]


def model(tokens: list[int], rounds: int) -> list[dict]:
    from spectrumkv.assets import load_text

    eng = hf.load("smollm2-135m", dtype="bfloat16", kv_dtype="bfloat16")
    ids = torch.tensor(eng.tokenizer(load_text("wiki")[:400_000])["input_ids"])
    cfg = eng.model.config
    hidden = cfg.hidden_size  # weights per layer: q, k, v, o and the gated MLP's three
    body = cfg.num_hidden_layers * (
        hidden * D * (2 * HQ + 2 * HKV) + 3 * hidden * cfg.intermediate_size
    )
    out = []
    for t in tokens:
        x = ids[:t]
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        keys: dict[str, list[torch.Tensor]] = {}
        roof = 0.0
        for _ in range(rounds):
            roof = max(roof, gemm_tflops(1))  # the roof in the same minutes as the variants
            for name, (step_on, flash_on) in VARIANTS.items():
                step_prefill.ENABLED, flash.ENABLED = step_on, flash_on and flash.AVAILABLE
                start = time.perf_counter()
                keys[name] = [layer.keys.float() for layer in hf.prefill(eng, x).layers]
                times[name].append(time.perf_counter() - start)
        step_prefill.ENABLED, flash.ENABLED = True, flash.AVAILABLE
        ref = keys["hf-sdpa"]
        # the roof: the layers' GEMMs (2 flops per weight per token) and causal attention
        # (2 T^2 d Hq per layer) at the best GEMM rate measured between the rounds
        flops = 2 * body * t + cfg.num_hidden_layers * 2 * t * t * D * HQ
        row = {"tokens": t, "gemm_tflops": roof, "roof_s": flops / roof / 1e12}
        for name in VARIANTS:
            row[f"{name}_s"] = min(times[name])
            row[f"{name}_median_s"] = statistics.median(times[name])
            pairs = zip(keys[name], ref, strict=True)
            diff = max(((a - b).norm() / b.norm()).item() for a, b in pairs)
            row[f"{name}_max_key_rel_diff"] = diff
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["smollm2-135m"])
    ap.add_argument("--model-tokens", type=int, nargs="*", default=[512, 2048, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    roof = gemm_tflops(args.rounds)
    print(f"threads {args.threads}; bf16 GEMM roof {roof:.2f} TFLOP/s; flash {flash.isa() or None}")
    rows = []
    for shape in args.shapes:
        for t in args.tokens:
            r = attention(t, args.rounds, shape)
            rows.append(r)
            cells = "  ".join(
                f"{n} {v['best_ms']:.1f} ms ({v['tflops']:.2f} TF/s, err {v['max_abs_err']:.1e})"
                for n, v in r["routes"].items()
            )
            print(f"{shape} T {t:5d}: {cells}")
    models = model(args.model_tokens, args.rounds)
    for m in models:
        cells = "  ".join(
            f"{v} {m[f'{v}_s']:.3f} s ({m['hf-sdpa_s'] / m[f'{v}_s']:.2f}x, K diff "
            f"{m[f'{v}_max_key_rel_diff']:.4f})"
            for v in VARIANTS
        )
        print(f"prefill T {m['tokens']}: {cells}; roof {m['roof_s']:.3f} s "
              f"({m['gemm_tflops']:.2f} TFLOP/s)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "gemm_tflops": roof, "attention": rows,
                       "prefill": models}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
