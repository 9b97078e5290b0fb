"""The `spectrumkv` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING

from .errors import SpectrumKVError

if TYPE_CHECKING:
    from .bench.codec import CacheShape


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DEFAULT_PROMPTS, print_table, run_demo, write_json

    prompts = tuple(args.prompt) if args.prompt else DEFAULT_PROMPTS
    print(f"starting a prefill and a decode worker ({args.model}) on loopback ...", flush=True)
    rows = run_demo(args.model, prompts, max_new_tokens=args.max_new_tokens)
    print(
        "each prompt: HTTP -> decode worker -> prefill worker (KV over TCP) -> generate; "
        "'match' = leading tokens equal to the uncompressed (FP16) transfer\n"
    )
    print_table(rows, prompts)
    if args.json:
        write_json(rows, args.json)
        print(f"\nwrote {len(rows)} records to {args.json}")


def _cmd_eval_ppl(args: argparse.Namespace) -> None:
    from .assets import load_text
    from .engines.hf import load
    from .eval.ppl import run_ppl
    from .eval.runs import parse_runs

    engine = load(args.model)
    runs = parse_runs(args.policies, args.budgets)
    text = load_text(args.corpus)
    records = run_ppl(
        engine,
        args.corpus,
        text,
        runs,
        args.context,
        args.continuation,
        args.chunks,
        args.json,
        args.protocol,
    )
    print(f"{'policy':<24} {'budget':>6} {'wire':>6} {'nominal':>7} {'ppl':>9} {'dPPL %':>8}")
    for r in records:
        b = "-" if r.budget is None else f"{r.budget:.2f}"
        print(
            f"{r.policy:<24} {b:>6} {r.wire_budget:>6.3f} {r.nominal_budget:>7.3f} "
            f"{r.ppl:>9.4f} {r.delta_pct:>+8.2f}"
        )
    if records:
        print(f"FP16 reference ppl {records[0].ppl_fp16:.4f}")
    if args.json:
        print(f"records in {args.json} (re-running resumes: finished runs are skipped)")


def _cmd_eval_agreement(args: argparse.Namespace) -> None:
    from .eval.agreement import run_agreement, write_json

    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    records = run_agreement(args.model, args.corpus, lengths, args.prompts, methods, args.keep)
    if args.json:
        write_json(records, args.json)


def _cmd_eval_niah(args: argparse.Namespace) -> None:
    from .assets import load_text
    from .engines.hf import load
    from .eval.niah import run_niah
    from .eval.runs import parse_runs

    engine = load(args.model)
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    records = run_niah(
        engine,
        args.corpus,
        load_text(args.corpus),
        parse_runs(args.policies, args.budgets),
        contexts,
        depths,
        args.needles,
        json_path=args.json,
    )
    totals: dict[tuple[str, float | None], list[bool]] = {}
    for r in records:
        totals.setdefault((r.policy, r.budget), []).append(r.success)
    print(f"{'policy':<24} {'budget':>6} {'success':>8}")
    for (policy, budget), ok in totals.items():
        b = "-" if budget is None else f"{budget:.2f}"
        print(f"{policy:<24} {b:>6} {100 * sum(ok) / len(ok):>7.0f}%")


def _cmd_probe(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .assets import load_text
    from .engines.hf import load
    from .probe import default_profile_path, run_probe
    from .profile import save_profile

    engine = load(args.model)
    profile = run_probe(engine, load_text(args.corpus), args.kind, args.context, args.trials)
    path = Path(args.out) if args.out else default_profile_path(engine)
    save_profile(profile, path)
    verdict = "tolerates INT4" if profile["int4_tolerated"] else "does NOT tolerate INT4"
    print(f"{args.model}: {verdict} ({args.kind} probe); evidence {profile['evidence']}")
    print(f"profile written to {path}; use it with --policies adaptive@profile={path}")


def _cmd_report(args: argparse.Namespace) -> None:
    from .eval.report import write_report

    print(f"wrote {write_report(args.results, args.out)}")


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from .engines.hf import load

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from .transport.auth import secret_from_env

    secret = secret_from_env()
    engine = load(args.model)
    if args.role == "prefill":
        from .pd.prefill_worker import serve_prefill
        from .transport.tls import server_context

        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("spectrumkv: --tls-cert and --tls-key go together")
        tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        coro = serve_prefill(engine, args.host, args.port, secret, tls)
    else:
        from .pd.decode_worker import DecodeConfig, serve_decode
        from .pd.protocol import TransferOptions

        host, _, port = args.prefill.rpartition(":")
        transfer = TransferOptions(
            policy=args.policy,
            budget=args.budget,
            score_layers=args.score_layers,
            link_gbps=args.link_gbps,
            link_latency_s=args.link_latency_ms / 1000,
            overlap=not args.no_overlap,
        )
        cfg = DecodeConfig(
            host, int(port), secret, args.deadline, args.on_failure, transfer, args.tls_ca
        )
        coro = serve_decode(engine, cfg, args.host, args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


def _cmd_bench_ttft(args: argparse.Namespace) -> None:
    from .bench import ttft

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


def _bench_cache(args: argparse.Namespace, q_heads: int) -> tuple[CacheShape, int]:
    """The synthetic cache shape and timed repeats of `bench codec` and `bench push`
    (--quick: 4 layers x 256 tokens, one pass)."""
    from .bench.codec import CacheShape

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


def _cmd_bench_codec(args: argparse.Namespace) -> None:
    from .bench import codec

    shape, repeats = _bench_cache(args, args.q_heads)
    policies = [codec.parse_policy(x) for x in args.policies.split(",")]
    codecs = ["fused", "reference"] if args.reference else ["fused"]
    if not codec.fused.AVAILABLE:
        print("spectrumkv: warning: the fused codec is not built; measuring the reference only")
        codecs = ["reference"]
    codec.print_header(shape)
    records = codec.run_codec(
        shape, args.dtypes.split(","), policies, repeats, codecs, args.threads, args.fresh
    )
    if args.json:
        codec.write_json(records, args.json)


def _cmd_bench_push(args: argparse.Namespace) -> None:
    from .bench import codec, push

    shape, repeats = _bench_cache(args, q_heads=args.kv_heads)  # push scores by key norm
    push.print_header(shape, args.dtype)
    policies = [codec.parse_policy(x) for x in args.policies.split(",")]
    records = push.run_push(shape, args.dtype, policies, repeats)
    if args.json:
        push.write_json(records, args.json)


def _cmd_bench_scoring(args: argparse.Namespace) -> None:
    from .bench import scoring
    from .config import PolicyConfig

    lengths = [int(x) for x in args.lengths.split(",")]
    policy = PolicyConfig(args.policy, budget=args.budget)
    records = scoring.run_scoring(args.model, lengths, args.corpus, policy)
    if args.json:
        scoring.write_json(records, args.json)


def _cmd_bench_fuzz(args: argparse.Namespace) -> None:
    from .bench import fuzz

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


def _cmd_bench_faults(args: argparse.Namespace) -> None:
    from .bench import faults

    records, summary = faults.run_faults(args.model, args.rounds, args.seed, args.deadline)
    print(json.dumps(summary, indent=1))
    if args.json:
        faults.write_json(records, summary, args.json)
    if not faults.is_clean(summary):
        raise SystemExit("spectrumkv: some faults were not survived cleanly")


def _cmd_bench_load(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .bench import load

    report = load.run_load(args.model, args.clients, args.duration, max_tokens=args.max_tokens)
    summary = {k: v for k, v in asdict(report).items() if k != "memory"}
    print(json.dumps(summary, indent=1))
    if args.json:
        load.write_json(report, args.json)
    if args.plot:
        load.plot(report, args.plot)


def _cmd_fetch(args: argparse.Namespace) -> None:
    from .assets import model_dir

    for name in args.models:
        print(f"{name}: {model_dir(name)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spectrumkv", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run prompts through the compressed transfer path")
    d.add_argument("--model", default="smollm2-135m", help="alias, local HF directory or hub id")
    d.add_argument("--prompt", action="append", help="a prompt (repeatable); default: built-in set")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--json", help="write the table's rows as JSON records to this path")
    d.set_defaults(func=_cmd_demo)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(
        dest="kind", required=True
    )
    pp = ev.add_parser("ppl", help="perplexity under the PD protocol")
    pp.add_argument("--model", default="smollm2-135m")
    pp.add_argument("--corpus", default="wiki", help="alias (wiki) or a text file path")
    pp.add_argument("--context", type=int, default=1024, help="tokens per chunk")
    pp.add_argument("--continuation", type=int, default=128, help="scored tokens per chunk")
    pp.add_argument("--chunks", type=int, default=4)
    pp.add_argument("--budgets", default="0.3,0.5")
    pp.add_argument(
        "--policies",
        default="spectrum,pdtrim,uniform-int8,uniform-int4",
        help="comma-separated run specs policy[@key=value+...], e.g. pdtrim@fr=0.25, "
        "spectrum@importance=positional (options: fr importance sinks group rotate scheme mode)",
    )
    pp.add_argument(
        "--protocol",
        default="pd",
        choices=["pd", "paper"],
        help="pd: transfer then score on the decode side; paper: K/V through the "
        "codec inside one full forward, as the SpectrumKV paper measured",
    )
    pp.add_argument("--json", help="results file: written after every run, resumed if present")
    pp.set_defaults(func=_cmd_eval_ppl)

    nh = ev.add_parser("niah", help="needle in a haystack through the transfer path")
    nh.add_argument("--model", default="smollm2-135m")
    nh.add_argument("--corpus", default="wiki", help="haystack: alias (wiki) or a text file")
    nh.add_argument("--contexts", default="1024", help="comma-separated prompt lengths (tokens)")
    nh.add_argument("--depths", type=int, default=10, help="needle depths, evenly from 0 to 1")
    nh.add_argument("--needles", type=int, default=5, help="different key/value needles (<= 7)")
    nh.add_argument("--budgets", default="0.3,0.5")
    nh.add_argument("--policies", default="spectrum,pdtrim", help="run specs, as for eval ppl")
    nh.add_argument("--json", help="results file: written after every trial, resumed if present")
    nh.set_defaults(func=_cmd_eval_niah)

    ag = ev.add_parser("agreement", help="importance proxies vs window-attention ranking")
    ag.add_argument("--model", default="smollm2-135m")
    ag.add_argument("--corpus", default="wiki")
    ag.add_argument("--lengths", default="512,2048", help="prompt lengths (tokens)")
    ag.add_argument("--prompts", type=int, default=4, help="prompts per length")
    ag.add_argument("--methods", default="keynorm,positional,random")
    ag.add_argument("--keep", type=float, default=0.3, help="top fraction compared")
    ag.add_argument("--json", help="write records to this path")
    ag.set_defaults(func=_cmd_eval_agreement)

    pr = sub.add_parser("probe", help="deployment-time INT4 tolerance probe -> model profile")
    pr.add_argument("--model", default="smollm2-135m")
    pr.add_argument("--corpus", default="wiki")
    pr.add_argument("--kind", default="ppl+niah", choices=["paper", "ppl+niah"])
    pr.add_argument("--context", type=int, default=1024)
    pr.add_argument("--trials", type=int, default=3)
    pr.add_argument("--out", help="profile path (default: in the cache, per model)")
    pr.set_defaults(func=_cmd_probe)

    rp = sub.add_parser("report", help="markdown tables and PNG plots from result files")
    rp.add_argument("results", nargs="+", help="JSON files from eval ppl / eval niah")
    rp.add_argument("--out", required=True, help="output directory")
    rp.set_defaults(func=_cmd_report)

    sv = sub.add_parser("serve", help="run a prefill or decode worker (secret: $SPECTRUMKV_SECRET)")
    sv.add_argument("role", choices=["prefill", "decode"])
    sv.add_argument("--model", default="smollm2-135m")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    sv.add_argument("--port", type=int, default=0, help="0 = any free port (printed as READY)")
    sv.add_argument("--prefill", default="127.0.0.1:7100", help="decode: prefill worker host:port")
    sv.add_argument("--deadline", type=float, default=60.0, help="decode: KV transfer deadline, s")
    sv.add_argument("--on-failure", default="recompute", choices=["recompute", "fail"])
    sv.add_argument("--policy", default="spectrum", help="decode: default policy per request")
    sv.add_argument("--budget", type=float, default=0.5, help="decode: default budget")
    sv.add_argument(
        "--score-layers",
        type=int,
        default=4,
        help="plan from the first N layers' attention so frames stream during prefill "
        "(0 = all layers, no overlap)",
    )
    sv.add_argument("--link-gbps", type=float, default=0.0, help="emulated link rate (0 = off)")
    sv.add_argument("--link-latency-ms", type=float, default=0.0)
    sv.add_argument("--no-overlap", action="store_true", help="send after prefill, not streamed")
    sv.add_argument("--tls-cert", help="prefill: PEM certificate, serve the KV channel over TLS")
    sv.add_argument("--tls-key", help="prefill: PEM private key of --tls-cert")
    sv.add_argument("--tls-ca", help="decode: PEM CA/certificate to verify the prefill worker")
    sv.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="kind", required=True)
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
    bt.set_defaults(func=_cmd_bench_ttft)

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
    bc.add_argument("--json", help="write records to this path")
    bc.set_defaults(func=_cmd_bench_codec)

    bp = bench.add_parser("push", help="push transfers over loopback vs raw TCP")
    _add_cache_args(bp, quick="4 layers x 256 tokens, one run (CI)")
    bp.add_argument("--dtype", default="bfloat16")
    bp.add_argument("--policies", default="uniform-int8,spectrum@0.5,spectrum@0.3")
    bp.add_argument("--repeats", type=int, default=5, help="timed runs; the best is reported")
    bp.add_argument("--json", help="write records to this path")
    bp.set_defaults(func=_cmd_bench_push)

    bs = bench.add_parser("scoring", help="scoring + planning time beside prefill time")
    bs.add_argument("--model", default="smollm2-135m")
    bs.add_argument("--corpus", default="wiki")
    bs.add_argument("--lengths", default="2048,8192,32768", help="prompt lengths (tokens)")
    bs.add_argument("--policy", default="spectrum")
    bs.add_argument("--budget", type=float, default=0.3)
    bs.add_argument("--json", help="write records to this path")
    bs.set_defaults(func=_cmd_bench_scoring)

    bf = bench.add_parser("fuzz", help="mutated payloads against the decoder")
    bf.add_argument("--cases", type=int, default=100_000)
    bf.add_argument("--seed", type=int, default=0)
    bf.add_argument("--samples", type=int, default=64, help="valid payloads to mutate")
    bf.add_argument("--json", help="write outcome counts (and bad examples) to this path")
    bf.set_defaults(func=_cmd_bench_fuzz)

    bx = bench.add_parser("faults", help="fault injection into real workers")
    bx.add_argument("--model", default="smollm2-135m")
    bx.add_argument("--rounds", type=int, default=100)
    bx.add_argument("--seed", type=int, default=0)
    bx.add_argument("--deadline", type=float, default=8.0, help="decode worker's KV deadline, s")
    bx.add_argument("--json", help="write records and the summary to this path")
    bx.set_defaults(func=_cmd_bench_faults)

    bl = bench.add_parser("load", help="concurrent clients through the HTTP front")
    bl.add_argument("--model", default="smollm2-135m")
    bl.add_argument("--clients", type=int, default=32)
    bl.add_argument("--duration", type=float, default=150.0, help="seconds of load")
    bl.add_argument("--max-tokens", type=int, default=4)
    bl.add_argument("--json", help="write the report (memory samples included) here")
    bl.add_argument("--plot", help="write a PNG of both workers' memory over time")
    bl.set_defaults(func=_cmd_bench_load)

    from .integrations.vllm.commands import register as register_vllm

    register_vllm(sub, bench)

    f = sub.add_parser("fetch", help="fetch and convert built-in models once (shows progress)")
    f.add_argument("models", nargs="+", help="model aliases, e.g. smollm2-135m gemma3-270m")
    f.set_defaults(func=_cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SpectrumKVError as e:
        print(f"spectrumkv: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
