"""`spectrumkv bench ...`: argument parsing and dispatch for the benchmarks in this package."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .codec import CacheShape


def _cmd_ttft(args: argparse.Namespace) -> None:
    if args.scd:
        return _cmd_ttft_scd(args)
    from . import ttft

    lengths = [int(x) for x in args.lengths.split(",")]
    links = [float(x) for x in args.links.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    overlaps = [False] if args.no_overlap else ([True, False] if args.both else [True])
    ttft.print_header()
    if args.from_json:
        records = ttft.load_json(args.from_json)
        for r in records:
            ttft.print_row(r)
    else:
        records = ttft.run_ttft(args.model, lengths, links, budgets, overlaps, args.score_layers)
    for line in ttft.projection(records, codec_json=args.codec_json):
        print(line)
    if args.json:
        ttft.write_json(records, args.json)
    if args.plot:
        ttft.plot(records, args.plot)


def _cmd_ttft_scd(args: argparse.Namespace) -> None:
    from ..scd.artifact import load
    from . import ttft_scd

    if not args.artifact:
        raise SystemExit("spectrumkv: bench ttft --scd needs --artifact ART (scd calibrate)")
    lengths = [int(x) for x in args.lengths.split(",")]
    links = [float(x) for x in args.links.split(",")]
    ttft_scd.print_header()
    if args.from_json:
        records = ttft_scd.load_json(args.from_json)
        for r in records:
            ttft_scd.print_row(r)
    else:
        records = ttft_scd.run_ttft_scd(args.producer, args.model, args.artifact, lengths, links,
                                        args.code_budget)  # fmt: skip
    for line in ttft_scd.verdict(records):
        print(line)
    m = load(args.artifact).manifest.consumer
    params = sum(p.numel() for p in _model_params(args.model))
    lines = ttft_scd.projection(records, m.n_layers, params)
    print("\n".join(lines))
    if args.json:
        ttft_scd.write_json(records, args.json, ttft_scd.summary(records) | {"projection": lines})


def _model_params(model: str):
    from ..engines.hf import load

    return load(model).model.parameters()


def _cache_shape(args: argparse.Namespace, q_heads: int) -> tuple[CacheShape, int]:
    """The synthetic cache shape and timed repeats of `bench codec` and `bench push`
    (--quick: 4 layers x 256 tokens, one pass)."""
    from .codec import CacheShape

    quick = (4, 256, 1)
    layers, tokens, repeats = quick if args.quick else (args.layers, args.tokens, args.repeats)
    return CacheShape(layers, args.kv_heads, args.head_dim, tokens, q_heads), repeats


def _add_cache_args(p: argparse.ArgumentParser, quick: str) -> None:
    """--layers/--kv-heads/--head-dim/--tokens (default: SmolLM2-135M at 4096 tokens), --quick."""
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help=quick)


def _cmd_codec(args: argparse.Namespace) -> None:
    from . import codec

    shape, repeats = _cache_shape(args, args.q_heads)
    policies = [codec.parse_policy(x) for x in args.policies.split(",")]
    codecs = ["fused", "reference"] if args.reference else ["fused"]
    if not codec.fused.AVAILABLE:
        print("spectrumkv: warning: the fused codec is not built; measuring the reference only")
        codecs = ["reference"]
    codec.print_header(shape, args.pause_ms)
    records = codec.run_codec(
        shape, args.dtypes.split(","), policies, repeats, codecs, args.threads, args.fresh,
        args.pause_ms,
    )  # fmt: skip
    if args.json:
        codec.write_json(records, args.json)


def _cmd_push(args: argparse.Namespace) -> None:
    from . import codec, push

    shape, repeats = _cache_shape(args, q_heads=args.kv_heads)  # push scores by key norm
    push.print_header(shape, args.dtype)
    policies = [codec.parse_policy(x) for x in args.policies.split(",")]
    records = push.run_push(shape, args.dtype, policies, repeats)
    if args.json:
        push.write_json(records, args.json)


def _cmd_scoring(args: argparse.Namespace) -> None:
    from ..config import PolicyConfig
    from . import scoring

    lengths = [int(x) for x in args.lengths.split(",")]
    policy = PolicyConfig(args.policy, budget=args.budget)
    records = scoring.run_scoring(args.model, lengths, args.corpus, policy)
    if args.json:
        scoring.write_json(records, args.json)


def _cmd_fuzz(args: argparse.Namespace) -> None:
    from . import fuzz

    def progress(done: int, counts) -> None:
        if done % 10000 == 0 or done == args.cases:
            print(f"{done:>8} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()))

    report = fuzz.run_fuzz(args.cases, args.seed, args.samples, progress=progress)
    print(f"{report.cases} cases in {report.seconds:.1f} s")
    for name, counts in report.by_mutation.items():
        print(f"  {name:>15}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for key in fuzz.OUTCOMES:
        print(f"{key:>18}: {report.counts[key]}")
    if args.json:
        fuzz.write_json(report, args.json)
    if report.bad:
        raise SystemExit(f"spectrumkv: {report.bad} cases ended badly; see --json for examples")


def _cmd_faults(args: argparse.Namespace) -> None:
    from . import faults

    records, summary = faults.run_faults(args.model, args.rounds, args.seed, args.deadline)
    print(json.dumps(summary, indent=1))
    if args.json:
        faults.write_json(records, summary, args.json)
    if not faults.is_clean(summary):
        raise SystemExit("spectrumkv: some faults were not survived cleanly")


def _cmd_load(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from . import load

    report = load.run_load(args.model, args.clients, args.duration, max_tokens=args.max_tokens,
                           kv_pool_mb=args.kv_pool_mb)  # fmt: skip
    summary = {k: v for k, v in asdict(report).items() if k != "memory"}
    print(json.dumps(summary, indent=1))
    if args.json:
        load.write_json(report, args.json)
    if args.plot:
        load.plot(report, args.plot)


def register(bench: argparse._SubParsersAction) -> None:
    """Add the benchmarks to `spectrumkv bench`."""
    bt = bench.add_parser("ttft", help="TTFT through real workers over emulated links")
    bt.add_argument("--model", default="smollm2-135m")
    bt.add_argument("--lengths", default="512,2048,4096", help="prompt lengths (tokens)")
    bt.add_argument("--links", default="1,10,25", help="emulated link rates (Gbps)")
    bt.add_argument("--budgets", default="1.0,0.5,0.3")
    bt.add_argument("--score-layers", type=int, default=4)
    bt.add_argument("--no-overlap", action="store_true", help="transfer after prefill only")
    bt.add_argument("--both", action="store_true", help="measure streamed and after-prefill")
    bt.add_argument("--json", help="write records to this path")
    bt.add_argument("--plot", help="write a PNG of TTFT and transfer phase vs link rate")
    bt.add_argument("--from-json", help="re-print and re-plot earlier records, run nothing")
    bt.add_argument("--codec-json", help="project 7B models from `bench codec --json` figures")
    bt.add_argument("--scd", action="store_true", help="SCD: --producer's prefill worker, "
                    "--model's decode worker; methods oracle, raw, scd, scd-q")  # fmt: skip
    bt.add_argument("--producer", default="smollm2-135m", help="--scd: model A (prefill)")
    bt.add_argument("--artifact", help="--scd: the SCD artifact for --producer -> --model")
    bt.add_argument("--code-budget", type=float, default=0.3, help="--scd: quantized codes")
    bt.set_defaults(func=_cmd_ttft)

    bc = bench.add_parser("codec", help="encode/decode throughput vs a plain copy of the cache")
    _add_cache_args(bc, quick="4 layers x 256 tokens, one pass (CI)")
    bc.add_argument("--q-heads", type=int, default=9, help="query heads (window queries)")
    bc.add_argument("--dtypes", default="bfloat16,float16")
    bc.add_argument(
        "--policies",
        default="uniform-int8,uniform-int4,spectrum@0.5,spectrum@0.3",
        help="comma-separated policy[@budget]",
    )
    bc.add_argument("--repeats", type=int, default=5, help="timed passes; the best is reported")
    bc.add_argument("--threads", type=int, help="torch and codec threads (default: torch's)")
    bc.add_argument("--reference", action="store_true", help="also time the torch reference")
    bc.add_argument(
        "--fresh", action="store_true", help="allocate every frame and output anew (no reuse)"
    )
    bc.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="idle time before each frame, as between the layers of a streamed prefill",
    )
    bc.add_argument("--json", help="write records to this path")
    bc.set_defaults(func=_cmd_codec)

    bp = bench.add_parser("push", help="push transfers over loopback vs raw TCP")
    _add_cache_args(bp, quick="4 layers x 256 tokens, one run (CI)")
    bp.add_argument("--dtype", default="bfloat16")
    bp.add_argument("--policies", default="uniform-int8,spectrum@0.5,spectrum@0.3")
    bp.add_argument("--repeats", type=int, default=5, help="timed runs; the best is reported")
    bp.add_argument("--json", help="write records to this path")
    bp.set_defaults(func=_cmd_push)

    bs = bench.add_parser("scoring", help="scoring + planning time beside prefill time")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--corpus", default="wiki")
    bs.add_argument("--lengths", default="2048,8192,32768", help="prompt lengths (tokens)")
    bs.add_argument("--policy", default="spectrum")
    bs.add_argument("--budget", type=float, default=0.3)
    bs.add_argument("--json", help="write records to this path")
    bs.set_defaults(func=_cmd_scoring)

    bf = bench.add_parser("fuzz", help="mutated payloads against the decoder")
    bf.add_argument("--cases", type=int, default=100_000)
    bf.add_argument("--seed", type=int, default=0)
    bf.add_argument("--samples", type=int, default=64, help="valid payloads to mutate")
    bf.add_argument("--json", help="write outcome counts (and bad examples) to this path")
    bf.set_defaults(func=_cmd_fuzz)

    bx = bench.add_parser("faults", help="fault injection into real workers")
    bx.add_argument("--model", default="smollm2-135m")
    bx.add_argument("--rounds", type=int, default=100)
    bx.add_argument("--seed", type=int, default=0)
    bx.add_argument("--deadline", type=float, default=8.0, help="decode worker's KV deadline, s")
    bx.add_argument("--json", help="write records and the summary to this path")
    bx.set_defaults(func=_cmd_faults)

    bl = bench.add_parser("load", help="concurrent clients through the HTTP front")
    bl.add_argument("--model", default="smollm2-135m")
    bl.add_argument("--clients", type=int, default=32)
    bl.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    bl.add_argument("--max-tokens", type=int, default=4)
    bl.add_argument("--kv-pool-mb", type=float, default=0.0,
                    help="the decode engine's page pool, MiB (0 = its default)")  # fmt: skip
    bl.add_argument("--json", help="write the report (memory samples included) here")
    bl.add_argument("--plot", help="write a PNG of both workers' memory over time")
    bl.set_defaults(func=_cmd_load)
