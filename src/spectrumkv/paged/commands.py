"""`spectrumkv bench attention` / `bench calibrate`: argument parsing and dispatch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path


def _csv(kind):
    return lambda s: tuple(kind(x) for x in s.split(","))


def _profile(path: str | None, dtype: str):
    """The machine profile for `dtype` pages (cost.profile_for), or the uncalibrated defaults
    with a note; SystemExit when `path` is missing, malformed or of another dtype."""
    from .cost import MachineProfile, default_profile_path, profile_for
    from .errors import PagedInputError

    try:
        profile = profile_for(dtype, path)
    except PagedInputError as e:
        raise SystemExit(str(e)) from None
    if profile is None:
        print(f"note: no machine profile at {default_profile_path(dtype)}: adaptive uses "
              f"uncalibrated defaults", file=sys.stderr)  # fmt: skip
        return MachineProfile(dtype=dtype)
    return profile


def _machine() -> dict:
    import torch

    return {"load_average": os.getloadavg(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine()}  # fmt: skip


def _print_report(records: list[dict]) -> list[dict]:
    from . import report

    rows = report.targets(records)
    timing = {r.get("adaptive_timing") or "per-layer" for r in records if r["route"] == "adaptive"}
    print(f"adaptive timed: {', '.join(sorted(timing)) or '-'} (bench.py's module doc)")
    print(report.table(records))
    print(report.pivot(records))
    print(report.targets_text(rows))
    return rows


def _cmd_attention(args: argparse.Namespace) -> None:
    from . import report, traces
    from .bench import BenchConfig, run

    if args.from_json:
        records = []
        for path in args.from_json:
            try:
                records += json.loads(Path(path).read_text())["records"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SystemExit(f"cannot read bench attention records from {path}: {e}") from None
        _print_report(records)
        if args.plot:
            report.plot(records, args.plot)
        return
    profile = _profile(args.profile, args.dtype)
    cfg = BenchConfig(
        shapes=args.shapes, traces=args.traces, batches=args.batches, seeds=args.seeds,
        page_sizes=args.page_sizes, routes=args.routes, dtype=args.dtype, scale=args.scale,
        ring_bytes=int(args.ring_mb * 2**20), reps=args.reps, slow_reps=args.slow_reps,
        trace_records=tuple(traces.load_trace(args.trace)) if args.trace else (),
        adaptive_timing=args.adaptive_timing,
    )  # fmt: skip
    if args.quick:
        cfg = BenchConfig(
            shapes=("smollm2-135m",), traces=("bimodal",), batches=(1, 4), seeds=(100,),
            page_sizes=(32,), routes=args.routes, dtype=args.dtype, scale=0.05,
            ring_bytes=8 << 20, max_layers=2, reps=1, trace_records=cfg.trace_records,
            adaptive_timing=args.adaptive_timing,
        )  # fmt: skip
    machine = _machine()
    print(f"load average before: {machine['load_average']}; adaptive timed {cfg.adaptive_timing}"
          " (see bench.py)", flush=True)  # fmt: skip

    def save(records: list[dict], rows: list[dict] | None) -> None:
        """The JSON document; "complete": false while the run is still going."""
        if args.json:
            doc = {"config": {k: v for k, v in vars(args).items() if k != "func"},
                   "machine": machine, "load_average_after": os.getloadavg(),
                   "profile": dataclasses.asdict(profile), "complete": rows is not None,
                   "records": records, "targets": rows or []}  # fmt: skip
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")

    records = run(cfg, profile, lambda s: print(s, flush=True), lambda r: save(r, None))
    rows = _print_report(records)
    print(f"load average after: {os.getloadavg()}")
    save(records, rows)
    if args.plot:
        report.plot(records, args.plot)


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import torch

    from .calibrate import calibrate
    from .cost import default_profile_path

    profile = calibrate(
        args.shape, args.page_size, getattr(torch, args.dtype), int(args.ring_mb * 2**20),
        args.rounds, progress=lambda s: print(s, flush=True),
    )  # fmt: skip
    out = Path(args.out or default_profile_path(args.dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    print(f"wrote {out}: {profile}")


def register(bench: argparse._SubParsersAction) -> None:
    """Add the paged-attention benchmarks to `spectrumkv bench`."""
    from .bench import ADAPTIVE_TIMING, ANCHORS, SHAPES
    from .routes import ROUTES
    from .traces import TRACES

    p = bench.add_parser("attention", help="paged decode attention: routes vs anchors per step")
    p.add_argument("--shapes", type=_csv(str), default=("smollm2-135m",),
                   help=f"comma list of {', '.join(SHAPES)}")  # fmt: skip
    p.add_argument("--traces", type=_csv(str), default=TRACES)
    p.add_argument("--trace", help='JSON list of {"context": n, "decode": m} to replay')
    p.add_argument("--batches", type=_csv(int), default=(1, 2, 4, 8, 16, 32))
    p.add_argument("--seeds", type=_csv(int), default=(100, 101, 102, 103, 104),
                   help="held-out seeds (calibration uses 0 and 1)")  # fmt: skip
    p.add_argument("--page-sizes", type=_csv(int), default=(32,))
    p.add_argument("--routes", type=_csv(str), default=(*ROUTES, *ANCHORS))
    p.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every trace length")
    p.add_argument("--ring-mb", type=float, default=1024, help="KV read per ring pass (>> L3)")
    p.add_argument(
        "--reps",
        type=int,
        default=5,
        help="interleaved rounds per case (step = the least; ratios and spreads from all)",
    )
    p.add_argument(
        "--slow-reps",
        type=int,
        default=2,
        help="rounds that also time the slow torch routes (padded, sdpa)",
    )
    p.add_argument(
        "--adaptive-timing",
        choices=ADAPTIVE_TIMING,
        default="per-step",
        help="per-step: plan once per timed pass, the route passed to every layer (as the "
        "engine does); per-layer: route='adaptive' on every layer call",
    )
    p.add_argument("--profile", help="machine profile JSON, calibrated on --dtype pages "
                   "(default: `bench calibrate`'s for that dtype, if there is one)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--json", help="write config, machine, records and targets here")
    p.add_argument("--from-json", type=_csv(str),
                   help="comma list of --json files: print their tables and targets (and --plot)"
                   " without running")  # fmt: skip
    p.add_argument("--plot", help="write a PNG of tokens/s per route against batch")
    p.set_defaults(func=_cmd_attention)

    c = bench.add_parser("calibrate", help="measure the attention cost model's constants")
    c.add_argument("--shape", choices=tuple(SHAPES), default="smollm2-135m")
    c.add_argument("--page-size", type=int, default=32)
    c.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    c.add_argument("--ring-mb", type=float, default=256)
    c.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    c.add_argument("--out", help="profile JSON to write (default ~/.cache/spectrumkv/"
                   "attention-profile-<dtype>.json, where the decode engine and `bench "
                   "attention` look for it)")  # fmt: skip
    c.set_defaults(func=_cmd_calibrate)
