"""`spectrumkv bench decode`: argument parsing and dispatch."""

from __future__ import annotations

import argparse


def _cmd_decode(args: argparse.Namespace) -> None:
    from ..engines.hf import load
    from . import bench

    engines = tuple(e for e in args.engines.split(",") if e)
    for e in engines:
        if e not in bench.ENGINES:
            raise SystemExit(f"spectrumkv: unknown engine {e!r}; choose from {bench.ENGINES}")
    concurrencies = tuple(int(c) for c in args.concurrency.split(",") if c)
    if args.quick:
        b = bench.DecodeBench(n=4, concurrency=4, decode=4, scale=1 / 128, route=args.route,
                              pool_mb=64, seed=args.seed)  # fmt: skip
        concurrencies = ()
    else:
        b = bench.DecodeBench(
            n=args.requests, concurrency=concurrencies[-1], decode=args.decode,
            trace=args.trace, scale=args.scale, trace_file=args.trace_file, seed=args.seed,
            route=args.route, pool_mb=args.kv_pool_mb, corpus=args.corpus,
        )  # fmt: skip
    engine = load(args.model, threads=args.threads)
    bench.print_header()
    records = bench.run(engine, b, engines, args.rounds, concurrencies)
    for r in records:
        if r.engine == "batched":
            x = r.extra
            step = x["full_batch_step_ms"]
            step_txt = f"{step:.1f} ms" if step is not None else "-"
            print(f"batched at {r.concurrency}: {x['steps']} steps, mean batch "
                  f"{x['mean_batch']:.1f}, routes {x['routes']}; full-batch step {step_txt} vs "
                  f"limit {x['limit_ms']:.1f} ms (copy {x['copy_gbps']:.1f} GB/s)")  # fmt: skip
    for (name, c), rs in bench.ratios(records).items():
        per = ", ".join(f"{x:.2f}" for x in rs)
        print(f"batched at {c} / {name}: decode tokens/s ratio per round {per}")
    for c, same, total in bench.identical(records):
        print(f"batch invariance at {c}: {same} of {total} requests' greedy tokens identical "
              "to sequential")  # fmt: skip
    prefill_s = records[0].extra["prefill_s"]
    print(f"prefill (all prompts, once; not in the decode figures): {prefill_s:.1f} s")
    if args.plot:
        bench.plot(records, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        bench.write_json(records, args.json)
        print(f"wrote {args.json}")


def register(bench: argparse._SubParsersAction) -> None:
    """Add `bench decode` to `spectrumkv bench`."""
    from .bench import ENGINES

    p = bench.add_parser("decode", help="continuous-batching decode engine vs baselines")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--engines", default="batched,sequential,hf-cb", help=f"of {ENGINES}")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", default="16", help="requests per step; a list sweeps")
    p.add_argument("--decode", type=int, default=32, help="new tokens per request")
    p.add_argument("--trace", default="uniform", help="paged.traces mix")
    p.add_argument("--scale", type=float, default=1 / 16, help="context length scale of --trace")
    p.add_argument("--trace-file", help='JSON list of {"context": n, "decode": m}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route", default="adaptive", help="decode-attention route of `batched`")
    p.add_argument("--kv-pool-mb", type=float, default=512.0)
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1, help="engines alternate this many times")
    p.add_argument("--quick", action="store_true", help="4 short requests x 4 tokens")
    p.add_argument("--json", help="write records to this path")
    p.add_argument("--plot", help="PNG: tokens/s vs concurrency per engine")
    p.set_defaults(func=_cmd_decode)
