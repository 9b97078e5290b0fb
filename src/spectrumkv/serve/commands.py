"""`spectrumkv bench decode`: argument parsing and dispatch.

`--via http` (default): every engine behind its real server, driven over the OpenAI endpoint
(serve.http_bench); `--via process`: the engines called in process on prefilled prompts
(serve.bench; it also reports the full-batch step against its bandwidth limit)."""

from __future__ import annotations

import argparse

VIA = {"http": ("batched", "sequential", "vllm", "hf-cb"),
       "process": ("batched", "sequential", "hf-cb")}  # fmt: skip


def _bench_config(args: argparse.Namespace, concurrencies: tuple[int, ...]):
    from . import bench

    if args.quick:
        return bench.DecodeBench(n=4, concurrency=4, decode=4, scale=1 / 128, route=args.route,
                                 pool_mb=64, seed=args.seed), (4,)  # fmt: skip
    return bench.DecodeBench(
        n=args.requests, concurrency=max(concurrencies), decode=args.decode, trace=args.trace,
        scale=args.scale, trace_file=args.trace_file, seed=args.seed, route=args.route,
        pool_mb=args.kv_pool_mb, corpus=args.corpus,
    ), concurrencies  # fmt: skip


def _cmd_decode(args: argparse.Namespace) -> None:
    from . import bench

    engines = tuple(e for e in args.engines.split(",") if e)
    for e in engines:
        if e not in VIA[args.via]:
            raise SystemExit(f"spectrumkv: unknown engine {e!r} for --via {args.via}; choose "
                             f"from {VIA[args.via]}")  # fmt: skip
    b, concurrencies = _bench_config(args, tuple(int(c) for c in args.concurrency.split(",") if c))
    bench.print_header()
    if args.via == "http":
        from .http_bench import HttpSetup, run_http

        setup = HttpSetup(args.model, args.threads or 1, args.vllm_cpus, args.vllm_dtype,
                          args.hf_cb_decode, args.dtype, args.kv_dtype,
                          args.prefill_threads, args.decode_nice)  # fmt: skip
        records = run_http(setup, b, engines, concurrencies)
    else:
        from ..engines.hf import load

        engine = load(args.model, args.kv_dtype, threads=args.threads, dtype=args.dtype)
        records = bench.run(engine, b, engines, args.rounds, concurrencies)
    _summary(records)
    if args.plot:
        bench.plot(records, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        bench.write_json(records, args.json)
        print(f"wrote {args.json}")


def _summary(records) -> None:
    from . import bench

    for r in records:
        x = r.extra
        load = "/".join(f"{v:.1f}" for v in x.get("loadavg_1m", ()))
        print(f"{r.engine} at {r.concurrency}: {r.dtype}; load average {load or '-'}")
        if "limit_ms" in x:  # in process: the full-batch step against its bandwidth limit
            step = x["full_batch_step_ms"]
            step_txt = f"{step:.1f} ms" if step is not None else "-"
            print(f"  {x['steps']} steps, mean batch {x['mean_batch']:.1f}, routes {x['routes']}; "
                  f"full-batch step {step_txt} vs limit {x['limit_ms']:.1f} ms (copy "
                  f"{x['copy_gbps']:.1f} GB/s), {x['limit_read_ms']:.1f} ms (read "
                  f"{x['read_gbps']:.1f} GB/s)")  # fmt: skip
        elif "mean_batch" in x:  # through the worker: its engine metrics
            print(f"  worker engine: {x['engine_steps']:.0f} steps, mean batch "
                  f"{x['mean_batch']:.1f}, mean step {x['mean_step_ms']:.1f} ms, "
                  f"{x['engine_tokens_per_step_s']:.2f} tokens per step-second")  # fmt: skip
        if "e2e_tokens_per_s" in x:
            print(f"  end to end {x['e2e_tokens_per_s']:.2f} tokens/s over {x['wall_s']:.1f} s; "
                  f"errors {x['errors'] or 'none'}")  # fmt: skip
    for (name, c), rs in bench.ratios(records).items():
        per = ", ".join(f"{x:.2f}" for x in rs)
        print(f"batched at {c} / {name}: decode tokens/s ratio per round {per}")
    for c, same, total in bench.identical(records):
        print(f"batch invariance at {c}: {same} of {total} requests' greedy tokens identical "
              "to sequential")  # fmt: skip
    if "prefill_s" in records[0].extra:
        prefill_s = records[0].extra["prefill_s"]
        print(f"prefill (all prompts, once; not in the decode figures): {prefill_s:.1f} s")


def register(bench: argparse._SubParsersAction) -> None:
    """Add `bench decode` to `spectrumkv bench`."""
    p = bench.add_parser("decode", help="continuous-batching decode engine vs baselines")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--via", choices=sorted(VIA), default="http",
                   help="http: real servers over the OpenAI endpoint; process: engines in "
                   "process on prefilled prompts")  # fmt: skip
    p.add_argument("--engines", default="batched,sequential,vllm,hf-cb",
                   help=f"http: of {VIA['http']} (hf-cb runs in process); process: of "
                   f"{VIA['process']}")  # fmt: skip
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", default="16", help="requests in flight; a list sweeps")
    p.add_argument("--decode", type=int, default=32, help="new tokens per request")
    p.add_argument("--trace", default="uniform", help="paged.traces mix")
    p.add_argument("--scale", type=float, default=1 / 16, help="context length scale of --trace")
    p.add_argument("--trace-file", help='JSON list of {"context": n, "decode": m}')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--route", default="adaptive", help="decode-attention route of `batched`")
    p.add_argument("--kv-pool-mb", type=float, default=512.0)
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (http: per worker process, default 1)")  # fmt: skip
    p.add_argument("--prefill-threads", type=int, default=0,
                   help="http: torch threads of the prefill worker (0 = --threads)")  # fmt: skip
    p.add_argument("--decode-nice", type=int, default=0, choices=range(20), metavar="0-19",
                   help="http: the decode worker's nice increment under the prefill worker on "
                        "this shared host (0: equal; 10: prefill first)")  # fmt: skip
    p.add_argument(
        "--vllm-cpus",
        default="",
        help="http: CPUs for vLLM's OpenMP threads (default: as many as --threads)",
    )
    p.add_argument("--vllm-dtype", default="bfloat16", help="http: vLLM's model dtype")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of SpectrumKV's decode model (batched and sequential)",
    )
    p.add_argument(
        "--kv-dtype",
        default="float16",
        choices=["float16", "bfloat16"],
        help="SpectrumKV's KV dtype, sent and paged (vLLM's KV is --vllm-dtype)",
    )
    p.add_argument("--hf-cb-decode", type=int, default=0,
                   help="http: new tokens per request for hf-cb (0 = --decode)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="process: engines alternate this often")
    p.add_argument("--quick", action="store_true", help="4 short requests x 4 tokens, at 4")
    p.add_argument("--json", help="write records to this path")
    p.add_argument("--plot", help="PNG: tokens/s vs concurrency per engine")
    p.set_defaults(func=_cmd_decode)
