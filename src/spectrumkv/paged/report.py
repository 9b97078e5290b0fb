"""Tables, target checks and the plot of `bench attention` records (bench.py)."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

FIXED = ("per-request", "split", "workqueue", "padded")
MIXED = ("bimodal", "uniform", "zipf", "bucketed", "file")


def _cases(records: list[dict]) -> dict:
    """(shape, page_size, trace, batch) -> seed -> route -> record."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in records:
        out[(r["shape"], r["page_size"], r["trace"], r["batch"])][r["seed"]][r["route"]] = r
    return out


def _ratio(seeds: dict, a: str, b) -> list[float]:
    """Per seed: tokens/s of route a over route b (b: a name, or a function of the seed's
    records giving the baseline's tokens/s)."""
    out = []
    for recs in seeds.values():
        base = b(recs) if callable(b) else recs.get(b, {}).get("tokens_per_s")
        if a in recs and base:
            out.append(recs[a]["tokens_per_s"] / base)
    return out


def _best_fixed(recs: dict) -> float | None:
    vals = [recs[r]["tokens_per_s"] for r in FIXED if r in recs]
    return max(vals) if vals else None


def table(records: list[dict]) -> str:
    """One line per case and route: median step time over seeds [min-max], tokens/s, limit."""
    lines = [
        f"{'shape':13} {'pg':>3} {'trace':9} {'B':>3} {'route':12} {'step ms':>8} "
        f"{'[min-max]':>15} {'tok/s':>9} {'limit ms':>8} {'x limit':>7} {'disp':>4} "
        f"{'waste MB':>8} {'merge KB':>8} {'max err':>8}  chosen"
    ]
    for (shape, ps, trace, batch), seeds in sorted(_cases(records).items()):
        routes = list(next(iter(seeds.values())))
        for route in routes:
            rs = [s[route] for s in seeds.values() if route in s]
            step = statistics.median(r["step_ms"] for r in rs)
            limit = statistics.median(r["limit_ms"] for r in rs)
            chosen = Counter(r["chosen"] for r in rs if r["chosen"])
            lines.append(
                f"{shape:13} {ps:>3} {trace:9} {batch:>3} {route:12} {step:8.2f} "
                f"{min(r['step_ms'] for r in rs):7.2f}-{max(r['step_ms'] for r in rs):<7.2f} "
                f"{statistics.median(r['tokens_per_s'] for r in rs):9.0f} {limit:8.2f} "
                f"{step / limit:7.2f} {rs[0]['dispatches_per_step']:>4} "
                f"{max(r['padded_bytes'] for r in rs) / 1e6:8.1f} "
                f"{max(r['merge_bytes'] for r in rs) / 1e3:8.1f} "
                f"{max(r['max_abs_err'] for r in rs):8.1e}  "
                + " ".join(f"{k}:{v}" for k, v in chosen.items())
            )  # fmt: skip
    return "\n".join(lines)


def pivot(records: list[dict]) -> str:
    """Markdown: one row per case, median step ms over seeds per route, the limit, adaptive's
    ratio to the best fixed route / padded / vLLM (median of per-seed ratios) and its choices."""
    cases = _cases(records)
    routes = [r for r in (*FIXED, "adaptive", "sdpa", "vllm")
              if any(r in s for seeds in cases.values() for s in seeds.values())]  # fmt: skip
    head = ["shape", "page", "trace", "B", *routes, "limit", "ad/best", "ad/padded", "ad/vLLM",
            "adaptive chose"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (shape, ps, trace, batch), seeds in sorted(cases.items()):
        cells = [shape, str(ps), trace, str(batch)]
        for r in routes:
            vals = [s[r]["step_ms"] for s in seeds.values() if r in s]
            cells.append(f"{statistics.median(vals):.2f}" if vals else "-")
        cells.append(
            f"{statistics.median(r['limit_ms'] for s in seeds.values() for r in s.values()):.2f}"
        )
        for base in (_best_fixed, "padded", "vllm"):
            x = _ratio(seeds, "adaptive", base)
            cells.append(f"{statistics.median(x):.2f}" if x else "-")
        chosen = Counter(s["adaptive"]["chosen"] for s in seeds.values() if "adaptive" in s)
        cells.append(" ".join(f"{k}:{v}" for k, v in sorted(chosen.items())))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(records: list[dict]) -> list[dict]:
    """The issue's targets, per case where they apply: value (worst seed / median) and met."""
    out = []
    for (shape, ps, trace, batch), seeds in sorted(_cases(records).items()):
        case = {"shape": shape, "page_size": ps, "trace": trace, "batch": batch}
        best = _ratio(seeds, "adaptive", _best_fixed)
        if best:
            out.append({**case, "target": "adaptive >= 0.97x best fixed (median over seeds)",
                        "median": statistics.median(best), "worst": min(best),
                        "met": statistics.median(best) >= 0.97})  # fmt: skip
        pad = _ratio(seeds, "adaptive", "padded")
        if pad and batch == 8 and trace in MIXED:
            out.append({**case, "target": "adaptive >= 1.2x padded at batch 8",
                        "median": statistics.median(pad), "worst": min(pad),
                        "met": statistics.median(pad) >= 1.2})  # fmt: skip
        vl = _ratio(seeds, "adaptive", "vllm")
        if vl and batch >= 4 and trace in MIXED:
            out.append({**case, "target": "adaptive >= 1.0x vLLM CPU at batch >= 4",
                        "median": statistics.median(vl), "worst": min(vl),
                        "met": statistics.median(vl) >= 1.0})  # fmt: skip
        long = [s["adaptive"] for s in seeds.values()
                if "adaptive" in s and min(s["adaptive"]["lengths"]) >= 8192]  # fmt: skip
        if long:
            x = [r["step_ms"] / r["limit_ms"] for r in long]
            out.append({**case, "target": "step <= 1.5x limit (every request >= 8K tokens)",
                        "median": statistics.median(x), "worst": max(x),
                        "met": statistics.median(x) <= 1.5})  # fmt: skip
    return out


def targets_text(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(
            f"{'MET   ' if r['met'] else 'MISSED'} {r['target']:52} {r['shape']} p{r['page_size']} "
            f"{r['trace']} B{r['batch']}: median {r['median']:.2f} worst {r['worst']:.2f}"
        )
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Tokens/s (median over seeds) per route against batch, one panel per shape x trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases(records)
    panels = sorted({(k[0], k[1], k[2]) for k in cases})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (shape, ps, trace) in zip(axes[0], panels, strict=True):
        series: dict = defaultdict(list)
        for (s, p, t, batch), seeds in sorted(cases.items()):
            if (s, p, t) != (shape, ps, trace):
                continue
            for route in {r for recs in seeds.values() for r in recs}:
                vals = [recs[route]["tokens_per_s"] for recs in seeds.values() if route in recs]
                series[route].append((batch, statistics.median(vals)))
        for route, pts in sorted(series.items()):
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=route,
                    linewidth=2.5 if route == "adaptive" else 1)  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel="batch", title=f"{shape} p{ps} {trace}")
        ax.set_ylabel("decode tokens/s (one layer)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
