"""`spectrumkv report`: markdown tables and PNG plots from result files."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(perplexity records, NIAH records, `scd eval` results) from JSON result files: a list of
    records, or one `scd eval` result (an object with `records` and `layer_errors`)."""
    ppl, niah, scd = [], [], []
    for p in paths:
        data = json.loads(Path(p).read_text(encoding="utf-8"))
        if isinstance(data, dict) and "records" in data and "layer_errors" in data:
            scd.append(data)
            continue
        for r in data:
            (niah if "success" in r else ppl).append(r)
    return ppl, niah, scd


def _fmt_budget(b: float | None) -> str:
    return "fixed" if b is None else f"{b:g}"


def ppl_section(records: list[dict], out: Path) -> list[str]:
    lines = []
    by_model = defaultdict(list)
    for r in records:
        key = (
            r["model"],
            r["corpus"],
            r.get("protocol", "pd"),
            r["context"],
            r["continuation"],
            r["chunks"],
        )
        by_model[key].append(r)
    for (model, corpus, protocol, ctx, cont, chunks), recs in sorted(by_model.items()):
        budgets = sorted({r["budget"] for r in recs if r["budget"] is not None})
        policies = sorted({r["policy"] for r in recs if r["budget"] is not None})
        fixed = sorted({r["policy"] for r in recs if r["budget"] is None})
        cell = {(r["policy"], r["budget"]): r for r in recs}
        base = recs[0]["ppl_fp16"]
        lines += [
            f"### Delta-PPL, {model}, {corpus}, {protocol} protocol "
            f"({chunks} chunks of {ctx} tokens, {cont} scored; FP16 PPL {base:.3f})",
            "",
            "Delta-PPL in % at each wire budget (bytes on the wire / FP16 bytes); "
            "**bold** = best at that budget.",
            "",
            "| policy | " + " | ".join(f"b={b:g}" for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        best = {
            b: min((cell[(p, b)]["delta_pct"] for p in policies if (p, b) in cell), default=None)
            for b in budgets
        }
        for p in policies:
            row = []
            for b in budgets:
                r = cell.get((p, b))
                if r is None:
                    row.append("n/a")
                    continue
                s = f"{r['delta_pct']:+.2f}"
                row.append(f"**{s}**" if r["delta_pct"] == best[b] else s)
            lines.append(f"| {p} | " + " | ".join(row) + " |")
        for p in fixed:
            r = cell[(p, None)]
            lines.append(
                f"| {p} (fixed rate, wire {r['wire_budget']:.3f}) | "
                + f"{r['delta_pct']:+.2f} | "
                + " | ".join("" for _ in budgets[1:])
                + "|"
            )
        png = out / f"ppl_{model.replace('/', '_')}_{protocol}.png"
        _plot_ppl(recs, policies, fixed, png, f"{model} on {corpus}")
        lines += ["", f"![Delta-PPL vs wire budget, {model}]({png.name})", ""]
    return lines


def _plot_ppl(recs, policies, fixed, png: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for p in policies:
        pts = sorted(
            (r["wire_budget"], r["delta_pct"])
            for r in recs
            if r["policy"] == p and r["budget"] is not None
        )
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
    for p in fixed:
        r = next(r for r in recs if r["policy"] == p)
        ax.scatter([r["wire_budget"]], [r["delta_pct"]], marker="*", s=120, label=p, zorder=5)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("wire budget (bytes on the wire / FP16 bytes)")
    ax.set_ylabel("Delta-PPL vs FP16 transfer (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def niah_section(records: list[dict], out: Path) -> list[str]:
    lines = []
    groups = defaultdict(list)
    for r in records:
        groups[(r["model"], r["context"])].append(r)
    for (model, ctx), recs in sorted(groups.items()):
        fp16 = [r["success"] for r in recs if r["policy"] == "fp16"]
        budgets = sorted(
            {r["budget"] for r in recs if r["policy"] != "fp16"},
            key=lambda b: -1 if b is None else b,
        )
        policies = sorted({r["policy"] for r in recs if r["policy"] != "fp16"})
        rate = defaultdict(list)
        for r in recs:
            rate[(r["policy"], r["budget"])].append(r["success"])
        lines += [
            f"### NIAH, {model}, ~{ctx}-token context ({len(fp16)} trials per cell)",
            "",
            f"FP16 transfer: **{100 * sum(fp16) / max(1, len(fp16)):.0f}%** success. "
            "Cells: success % at each budget (`fixed` = fixed-rate policy).",
            "",
            "| policy | " + " | ".join(_fmt_budget(b) for b in budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for p in policies:
            row = [
                f"{100 * sum(v) / len(v):.0f}" if (v := rate.get((p, b))) else "" for b in budgets
            ]
            lines.append(f"| {p} | " + " | ".join(row) + " |")
        png = out / f"niah_{model.replace('/', '_')}_{ctx}.png"
        _plot_niah(recs, policies, png, f"NIAH {model}, ~{ctx} tokens")
        lines += ["", f"![NIAH heatmaps, {model}, {ctx}]({png.name})", ""]
    return lines


def _plot_niah(recs, policies, png: Path, title: str) -> None:
    """One heatmap per policy (needle depth x budget), the FP16 transfer as the first panel."""
    depths = sorted({r["depth"] for r in recs})
    panels = ["fp16"] + [
        p for p in policies if any(r["policy"] == p and r["budget"] is not None for r in recs)
    ]
    if len(panels) == 1:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels) + 1, 3.4), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        budgets = sorted({r["budget"] for r in recs if r["policy"] == p})
        grid = [[0.0] * len(budgets) for _ in depths]
        for i, d in enumerate(depths):
            for j, b in enumerate(budgets):
                v = [
                    r["success"]
                    for r in recs
                    if r["policy"] == p and r["depth"] == d and r["budget"] == b
                ]
                grid[i][j] = sum(v) / len(v) if v else float("nan")
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(budgets)), [f"{b:g}" for b in budgets], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("budget")
        ax.set_title(p, fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="success")
    fig.suptitle(title, fontsize=9)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def scd_section(results: list[dict], out: Path) -> list[str]:
    """Per `scd eval` result: its method table, the quality-vs-bytes plot and the per-layer
    K/V error plot (with and without patch layers), drawn by `scd.plots.plot_all`."""
    from ..scd.plots import plot_all

    lines = []
    for n, res in enumerate(results):
        recs = res["records"]
        r0 = recs[0]
        m = res["manifest"]
        lines += [
            f"### SCD: {r0['chunks']} chunks of {r0['context']} tokens, "
            f"{r0['continuation']} scored; patch layers {m['patch_layers']}, "
            f"KL on dev {m['kl_dev']:.4f} (eps {m['eps']:g})",
            "",
            "| method | bytes / raw FP16 | Delta-PPL vs oracle | x raw's (95 % CI) "
            "| KL (nats/token) | x raw's (95 % CI) | greedy exact prefix | token F1 "
            "| B rebuild s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['bytes_ratio']:.3f} | {r['delta_pct']:+.2f} % "
            f"(sd {r['delta_pct_chunk_std']:.2f}) | {vs_raw(r, 'delta')} "
            f"| {r['kl']:.4f} (sd {r['kl_chunk_std']:.4f}) | {vs_raw(r, 'kl')} "
            f"| {r['exact_prefix']:.1f} | {r['token_f1']:.2f} | {r['rebuild_s']:.3f} |"
            for r in recs
        ]
        pngs = plot_all(res, out / f"scd{n if len(results) > 1 else ''}")
        lines += [""] + [f"![SCD {p.stem}]({p.name})" for p in pngs] + [""]
    return lines


def vs_raw(record: dict, figure: str) -> str:
    """'0.37 [0.12, 0.71]': an `scd eval` record's `delta` or `kl` as a fraction of raw reuse's
    with its paired bootstrap interval ('inf' where the record holds None: unbounded); '-' for
    records written before `scd eval` kept them."""
    if f"{figure}_ratio" not in record:
        return "-"

    def num(x: float | None) -> str:
        return "inf" if x is None else f"{x:.2f}"

    lo, hi = record[f"{figure}_ratio_ci95"]
    return f"{num(record[f'{figure}_ratio'])} [{num(lo)}, {num(hi)}]"


def write_report(paths: list[str], out_dir: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ppl, niah, scd = load(paths)
    lines = ["# SpectrumKV results", ""] + ppl_section(ppl, out) + niah_section(niah, out)
    lines += scd_section(scd, out)
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
