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
