"""Plots of an `scd eval` result: Delta-PPL and KL vs bytes (one point per method) and the
per-layer reconstruction error of B's cache with and without patch layers."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_all(result: dict, stem: str | Path) -> list[Path]:
    """Write `<stem>-pareto.png` and `<stem>-layers.png`; returns their paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    pareto, layers = Path(f"{stem}-pareto.png"), Path(f"{stem}-layers.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "delta_pct", "Delta-PPL vs oracle (%)"),
                           (axes[1], "kl", "mean token KL vs oracle (nats)")):  # fmt: skip
        for r in result["records"]:
            ax.scatter(r["bytes_ratio"], r[key], s=30)
            ax.annotate(r["method"], (r["bytes_ratio"], r[key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_xlabel("bytes / raw FP16 KV bytes")
        ax.set_ylabel(label)
        ax.set_yscale("symlog", linthresh=1.0 if key == "delta_pct" else 0.01)
        ax.grid(alpha=0.3)
    fig.suptitle("SCD and baselines: quality vs bytes (PD protocol, held-out text)")
    fig.tight_layout()
    fig.savefig(pareto, dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    patches = result["manifest"]["patch_layers"]
    for name, errs in result["layer_errors"].items():
        if name == "oracle":
            continue
        for j, ax in enumerate(axes):
            ax.plot(range(len(errs)), [e[j] for e in errs], marker=".", label=name)
    for j, ax in enumerate(axes):
        for p in patches:
            ax.axvline(p, color="grey", alpha=0.3)
        ax.set_yscale("log")
        ax.set_xlabel("layer (grey: SCD patch layers)")
        ax.set_title(["keys", "values"][j] + ": relative squared error vs B's own cache")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(layers, dpi=120)
    plt.close(fig)
    return [pareto, layers]
