"""The `spectrumkv` command."""

from __future__ import annotations

import argparse
import contextlib
import sys

from .bench.commands import register as register_bench
from .config import POLICIES
from .errors import SpectrumKVError


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


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from .transport.auth import secret_from_env
    from .transport.tls import require_tls_off_loopback

    if args.role == "prefill":
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("spectrumkv: --tls-cert and --tls-key go together")
        require_tls_off_loopback(
            args.host, bool(args.tls_cert), args.insecure, f"--host {args.host}"
        )
        from .pd.batcher import check_batch

        check_batch(args.prefill_batch)  # before the model loads
    else:
        from .pd.openai import ServerDefaults, validate_defaults
        from .pd.protocol import TransferOptions

        host, _, port = args.prefill.rpartition(":")
        if not host or not port.isdigit():
            raise SystemExit(f"spectrumkv: --prefill must be host:port, got {args.prefill!r}")
        require_tls_off_loopback(host, bool(args.tls_ca), args.insecure, f"--prefill {host}")
        defaults = ServerDefaults(
            transfer=TransferOptions(
                policy=args.policy,
                budget=args.budget,
                score_layers=args.score_layers,
                link_gbps=args.link_gbps,
                link_latency_s=args.link_latency_s,
                overlap=not args.no_overlap,
            ),
            budget=args.budget,
            on_failure=args.on_failure,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )
        validate_defaults(defaults)  # before the model loads
    secret = secret_from_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from .engines.hf import load

    engine = load(args.model, args.kv_dtype, threads=args.threads or None, dtype=args.dtype)
    if args.role == "prefill":
        from .pd.prefill_worker import serve_prefill
        from .transport.tls import server_context

        tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        coro = serve_prefill(
            engine, args.host, args.port, secret, tls, args.scd_artifacts, args.prefill_batch
        )
    else:
        from .pd.decode_worker import DecodeConfig, serve_decode

        cfg = DecodeConfig(
            prefill_host=host,
            prefill_port=int(port),
            secret=secret,
            deadline_s=args.deadline,
            defaults=defaults,
            tls_ca=args.tls_ca,
            breaker_threshold=args.breaker_threshold,
            breaker_cooldown_s=args.breaker_cooldown,
            engine=args.engine,
            kv_pool_mb=args.kv_pool_mb,
            attention_route=args.attention_route,
            scd_artifact=args.scd,
        )
        coro = serve_decode(engine, cfg, args.host, args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


def _add_serve(sub) -> None:
    """`serve prefill` and `serve decode`, each with its own flags (defaults shown in --help)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sv = sub.add_parser(
        "serve", help="run a prefill or decode worker (secret: $SPECTRUMKV_SECRET)"
    ).add_subparsers(dest="role", required=True)
    pf = sv.add_parser("prefill", formatter_class=fmt, help="the prefill worker (KV over TCP)")
    dc = sv.add_parser(
        "decode", formatter_class=fmt, help="the decode worker (OpenAI-compatible HTTP front)"
    )
    for p, port_help in ((pf, "KV channel port"), (dc, "HTTP port")):
        p.add_argument("--model", default="smollm2-135m", help="alias, HF directory or hub id")
        p.add_argument("--host", default="127.0.0.1", help="bind address")
        p.add_argument("--port", type=int, default=0, help=f"{port_help}; 0 = any free port")
        p.add_argument(
            "--insecure",
            action="store_true",
            help="allow a KV channel off loopback without TLS (no integrity on the wire)",
        )
        p.add_argument(
            "--dtype",
            default="float32",
            choices=["float32", "bfloat16"],
            help="compute dtype of the model (weights, activations; the KV sent and paged is "
            "--kv-dtype); workers of either dtype accept each other's payloads",
        )
        p.add_argument(
            "--kv-dtype",
            default="float16",
            choices=["float16", "bfloat16"],
            help="dtype of the KV cache sent and paged (bfloat16 with --dtype bfloat16 keeps "
            "the model's own K/V bits and lets the paged kernel use AMX); the prefill and "
            "decode workers must agree: a payload of the other dtype is refused",
        )
        p.add_argument(
            "--threads",
            type=int,
            default=0,
            help="torch threads (0 = torch's default); 1 where cores are shared: on 2 loaded "
            "cores a batch-16 decode step took ~10x longer with 2 threads than with 1",
        )
    pf.add_argument("--tls-cert", help="PEM certificate: serve the KV channel over TLS")
    pf.add_argument("--tls-key", help="PEM private key of --tls-cert")
    pf.add_argument("--scd-artifacts", help="directory of SCD artifacts to serve SCD codes with")
    pf.add_argument(
        "--prefill-batch",
        type=int,
        default=16,
        help="KV requests queued together are prefilled in one forward, at most this many "
        "and 512 tokens (1 = one at a time; models with sliding-window layers: always 1)",
    )
    pf.set_defaults(func=_cmd_serve)

    dc.add_argument("--prefill", default="127.0.0.1:7100", help="the prefill worker, host:port")
    dc.add_argument("--tls-ca", help="PEM CA/certificate the prefill worker's TLS must chain to")
    dc.add_argument("--scd", help="SCD artifact: rebuild this model's cache from the prefill "
                    "model's codes (default method scd)")  # fmt: skip
    dc.add_argument("--deadline", type=float, default=60.0, help="KV transfer deadline, seconds")
    dc.add_argument(
        "--on-failure",
        default="recompute",
        choices=["recompute", "fail"],
        help="after a failed transfer: prefill locally, or answer HTTP 502",
    )
    dc.add_argument(
        "--policy",
        default="spectrum",
        help=f"default policy per request; one of {', '.join(POLICIES)}",
    )
    dc.add_argument(
        "--budget",
        type=float,
        default=0.5,
        help="default budget of budgeted policies: wire bytes / FP16 bytes, in (0, 1]; "
        "fixed-rate policies (uniform-*, fp16, kivi2) run at their own rate unless a request "
        "gives one",
    )
    dc.add_argument(
        "--score-layers",
        type=int,
        default=4,
        help="plan from the first N layers that see the whole prompt, so frames stream "
        "during prefill (0 = all layers, no overlap)",
    )
    dc.add_argument(
        "--link-gbps", type=float, default=0.0, help="emulated link rate, Gbit/s (0 = off)"
    )
    dc.add_argument(
        "--link-latency-s", type=float, default=0.0, help="emulated one-way latency, seconds"
    )
    dc.add_argument("--no-overlap", action="store_true", help="send after prefill, not streamed")
    dc.add_argument(
        "--max-tokens", type=int, default=16, help="tokens generated when a request says null"
    )
    dc.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="default sampling temperature (0 = greedy; OpenAI's default is 1)",
    )
    dc.add_argument(
        "--breaker-threshold",
        type=int,
        default=3,
        help="consecutive prefill-peer failures that open the circuit breaker (0 = never)",
    )
    dc.add_argument(
        "--breaker-cooldown",
        type=float,
        default=10.0,
        help="seconds the open breaker skips the peer (requests recompute or fail at once)",
    )
    dc.add_argument(
        "--engine",
        default="batched",
        choices=["batched", "sequential"],
        help="batched: continuous batching over a paged KV cache; sequential: one at a time "
        "(the previous path, kept for comparison)",
    )
    dc.add_argument(
        "--kv-pool-mb", type=float, default=0.0, help="batched: KV page pool, MiB (0 = RAM/8)"
    )
    dc.add_argument(
        "--attention-route",
        default="adaptive",
        choices=["adaptive", "per-request", "split", "workqueue", "padded"],
        help="batched: paged decode-attention route",
    )
    dc.set_defaults(func=_cmd_serve)


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
    d.add_argument("--corpus", default="wiki", help="--scd: prompts from its eval split")
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

    _add_serve(sub)

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
