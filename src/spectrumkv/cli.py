"""The `spectrumkv` command."""

from __future__ import annotations

import argparse
import sys

from .bench.commands import register as register_bench
from .errors import SpectrumKVError
from .pd.commands import register as register_pd
from .scd.splits import DEFAULT_CORPUS


def _cmd_demo(args: argparse.Namespace) -> None:
    if args.scd:
        from .scd.demo import main as scd_demo

        return scd_demo(args)
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


def _cmd_fetch(args: argparse.Namespace) -> None:
    from .assets import model_dir

    for name in args.models:
        print(f"{name}: {model_dir(name)}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spectrumkv")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spectrumkv", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run prompts through the compressed transfer path")
    d.add_argument("--model", default="smollm2-135m", help="alias, local HF directory or hub id")
    d.add_argument("--prompt", action="append", help="a prompt (repeatable); default: built-in set")
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--json", help="write the table's rows as JSON records to this path")
    d.add_argument("--scd", action="store_true", help="SCD: --producer's prefill worker serves "
                   "--model's decode worker (oracle, raw reuse, SCD, quantized SCD)")  # fmt: skip
    d.add_argument("--producer", default="smollm2-135m", help="--scd: model A (prefill)")
    d.add_argument("--artifact", help="--scd: the SCD artifact for --producer -> --model")
    d.add_argument("--corpus", default=DEFAULT_CORPUS, help="--scd: prompts from its eval split")
    d.add_argument("--prompt-tokens", type=int, default=160,
                   help="--scd: tokens per built-in prompt")  # fmt: skip
    d.add_argument("--code-budget", type=float, default=0.3, help="--scd: quantized codes' "
                   "budget, wire bytes / B's raw FP16 KV bytes")  # fmt: skip
    d.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="--scd: compute dtype of both workers")  # fmt: skip
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
    rp.add_argument("results", nargs="+", help="JSON files from eval ppl / eval niah / scd eval")
    rp.add_argument("--out", required=True, help="output directory")
    rp.set_defaults(func=_cmd_report)

    register_pd(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="kind", required=True)
    register_bench(bench)
    from .integrations.vllm.commands import register as register_vllm

    register_vllm(sub, bench)
    from .paged.commands import register as register_paged
    from .scd.commands import register as register_scd
    from .serve.commands import register as register_serve

    register_paged(bench)
    register_scd(sub)
    register_serve(bench)

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
