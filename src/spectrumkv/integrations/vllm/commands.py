"""`spectrumkv vllm-proxy`, `spectrumkv vllm-demo` and `spectrumkv bench vllm`."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

DEMO_PROMPTS = (
    "The Amazon rainforest covers much of the Amazon basin of South America. It is home to",
    "A compiler translates a program written in one language into another. Its first stage",
    "The Treaty of Westphalia in 1648 ended the Thirty Years' War and established",
)


def _model_path(name: str) -> str:
    from ...assets import model_dir

    return str(model_dir(name))


def cmd_proxy(args: argparse.Namespace) -> None:
    import asyncio

    from .proxy import ProxyConfig, serve_proxy

    cfg = ProxyConfig(args.prefill, args.decode, transfer=not args.no_transfer)
    asyncio.run(serve_proxy(cfg, args.host, args.port))


def cmd_demo(args: argparse.Namespace) -> None:
    from .client import ask
    from .launch import PDSetup, VllmPD

    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="spectrumkv-vllm-"))
    setup = PDSetup(_model_path(args.model), logs, budget=args.budget)
    print(f"starting prefill + decode vLLM instances (logs in {logs}) ...", flush=True)
    t0 = time.perf_counter()
    with VllmPD(setup) as pd:
        print(f"ready in {time.perf_counter() - t0:.0f} s; proxy at {pd.proxy_url}\n")
        print(f"{'TTFT s':>7} {'wire MB':>8} {'wire/16-bit':>11}  answer")
        for i, prompt in enumerate(args.prompt or DEMO_PROMPTS):
            a = ask(pd, prompt, args.max_tokens, salt=f"demo-{i}-{time.time()}")
            ratio = a.wire_bytes / a.fp16_bytes if a.fp16_bytes else 0.0
            note = f"  [fallback: {a.fallback}]" if a.fallback else ""
            print(
                f"{a.ttft_s:7.2f} {a.wire_bytes / 1e6:8.3f} {ratio:11.3f}  "
                f"{prompt!r} -> {a.text!r}{note}"
            )
    print("\nboth instances stopped")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import markdown, run_bench

    records = run_bench(
        _model_path(args.model),
        budgets=[float(b) for b in args.budgets.split(",")],
        links=[float(x) for x in args.links.split(",")],
        n_prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        example=not args.no_example,
        log_dir=Path(args.log_dir or tempfile.mkdtemp(prefix="spectrumkv-vllm-bench-")),
    )
    print(markdown(records))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in records], indent=1))


def register(sub: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Add the vLLM commands to the main parser and to `spectrumkv bench`."""
    px = sub.add_parser("vllm-proxy", help="OpenAI-compatible proxy for a 1P1D vLLM pair")
    px.add_argument("--prefill", required=True, help="base URL of the prefill vLLM server")
    px.add_argument("--decode", required=True, help="base URL of the decode vLLM server")
    px.add_argument("--host", default="127.0.0.1")
    px.add_argument("--port", type=int, default=8000)
    px.add_argument(
        "--no-transfer", action="store_true", help="send no SpectrumKV kv_transfer_params"
    )
    px.set_defaults(func=cmd_proxy)

    dm = sub.add_parser("vllm-demo", help="two vLLM instances + proxy on loopback, a few prompts")
    dm.add_argument("--model", default="smollm2-135m", help="alias or local HF directory")
    dm.add_argument("--budget", type=float, default=0.5)
    dm.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    dm.add_argument("--max-tokens", type=int, default=24)
    dm.add_argument("--log-dir", help="where the instances' logs go (default: a temp dir)")
    dm.set_defaults(func=cmd_demo)

    bv = bench.add_parser("vllm", help="1P1D vLLM: TTFT and bytes, SpectrumKV vs ExampleConnector")
    bv.add_argument("--model", default="smollm2-135m")
    bv.add_argument("--budgets", default="1.0,0.5,0.3")
    bv.add_argument("--links", default="0,1", help="emulated link rates in Gbps (0 = loopback)")
    bv.add_argument("--prompts", type=int, default=6)
    bv.add_argument("--prompt-tokens", type=int, default=1024)
    bv.add_argument("--max-tokens", type=int, default=8)
    bv.add_argument("--no-example", action="store_true", help="skip vLLM's ExampleConnector")
    bv.add_argument("--log-dir")
    bv.add_argument("--json", help="write records to this path")
    bv.set_defaults(func=cmd_bench)
