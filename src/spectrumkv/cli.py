"""The `spectrumkv` command."""

from __future__ import annotations

import argparse
import sys

from .errors import SpectrumKVError


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DEFAULT_PROMPTS, print_table, run_demo, write_json
    from .engines.hf import load

    engine = load(args.model)
    prompts = tuple(args.prompt) if args.prompt else DEFAULT_PROMPTS
    print(
        f"model {args.model}: {engine.fingerprint.n_layers} layers, "
        f"{engine.fingerprint.n_kv_heads} KV heads x {engine.fingerprint.head_dim} dims, "
        f"KV dtype {engine.fingerprint.kv_dtype}"
    )
    print(
        "one process: prefill -> score -> plan -> encode -> bytes -> decode -> generate; "
        "'match' = leading tokens equal to generation without any transfer\n"
    )
    rows = run_demo(engine, prompts, max_new_tokens=args.max_new_tokens)
    print_table(rows, prompts)
    if args.json:
        write_json(rows, args.json)
        print(f"\nwrote {len(rows)} records to {args.json}")


def _parse_runs(policies: str, budgets: str) -> list[tuple[str, float | None]]:
    """Every policy at every budget; fixed-rate policies once, at their own rate."""
    from .config import PolicyConfig

    runs: list[tuple[str, float | None]] = []
    values = [float(b) for b in budgets.split(",") if b.strip()]
    for name in (p.strip() for p in policies.split(",") if p.strip()):
        if PolicyConfig(name, budget=1.0).fixed_rate:
            runs.append((name, None))
        else:
            runs.extend((name, b) for b in values)
    return runs


def _cmd_eval_ppl(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict

    from .assets import load_text
    from .config import ScoreConfig
    from .engines.hf import load
    from .eval.ppl import run_ppl

    engine = load(args.model)
    runs = _parse_runs(args.policies, args.budgets)
    records = run_ppl(
        engine,
        args.corpus,
        load_text(args.corpus),
        runs,
        args.context,
        args.continuation,
        args.chunks,
        ScoreConfig(method=args.importance),
    )
    print(f"{'policy':<14} {'budget':>6} {'wire':>6} {'nominal':>7} {'ppl':>9} {'dPPL %':>8}")
    for r in records:
        b = "-" if r.budget is None else f"{r.budget:.2f}"
        print(
            f"{r.policy:<14} {b:>6} {r.wire_budget:>6.3f} {r.nominal_budget:>7.3f} "
            f"{r.ppl:>9.4f} {r.delta_pct:>+8.2f}"
        )
    if records:
        print(f"FP16 reference ppl {records[0].ppl_fp16:.4f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([asdict(r) for r in records], f, indent=1)


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
    pp.add_argument("--policies", default="spectrum,pdtrim,uniform-int8,uniform-int4")
    pp.add_argument(
        "--importance",
        default="attention",
        choices=["attention", "positional", "keynorm", "random"],
    )
    pp.add_argument("--json", help="write records to this path")
    pp.set_defaults(func=_cmd_eval_ppl)

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
