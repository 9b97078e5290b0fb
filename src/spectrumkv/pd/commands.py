"""`spectrumkv serve prefill|decode`: the two PD workers' command lines."""

from __future__ import annotations

import argparse
import contextlib

from ..config import POLICIES


def _cmd_serve(args: argparse.Namespace) -> None:
    import asyncio
    import logging

    from ..transport.auth import secret_from_env
    from ..transport.tls import require_tls_off_loopback

    if args.role == "prefill":
        if bool(args.tls_cert) != bool(args.tls_key):
            raise SystemExit("spectrumkv: --tls-cert and --tls-key go together")
        require_tls_off_loopback(
            args.host, bool(args.tls_cert), args.insecure, f"--host {args.host}"
        )
        from .batcher import check_batch

        check_batch(args.prefill_batch)  # before the model loads
    else:
        from .openai import ServerDefaults, validate_defaults
        from .protocol import TransferOptions

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
    from ..engines.hf import load

    engine = load(args.model, args.kv_dtype, threads=args.threads or None, dtype=args.dtype)
    if args.role == "prefill":
        from ..transport.tls import server_context
        from .prefill_worker import serve_prefill

        tls = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
        coro = serve_prefill(
            engine, args.host, args.port, secret, tls, args.scd_artifacts, args.prefill_batch
        )
    else:
        from .decode_worker import DecodeConfig, serve_decode

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
            attention_profile=args.attention_profile,
            scd_artifact=args.scd,
        )
        coro = serve_decode(engine, cfg, args.host, args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)


def register(sub: argparse._SubParsersAction) -> None:
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
        "and 1,024 tokens (1 = one at a time; models with sliding-window layers: always 1)",
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
    dc.add_argument(
        "--attention-profile",
        help="batched: machine profile JSON that the adaptive route reads (`spectrumkv bench "
        "calibrate --dtype <KV dtype>`; default: this machine's for the KV dtype, if any)",
    )
    dc.set_defaults(func=_cmd_serve)
