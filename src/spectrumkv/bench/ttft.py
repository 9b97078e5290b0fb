"""`spectrumkv bench ttft`: TTFT and the transfer phase through real worker processes.

For each prompt length x emulated link x budget (x overlap on/off) one request with max_tokens=1
goes through the decode worker; the prefill worker reports its stage times. `limit_s` is the
physical floor of the transfer: wire bytes / link rate. The transfer phase is what the transfer
adds after prefill: the exposed send time (prefill end -> last byte sent) plus the decode-side
unpack left after the last byte arrived (`unpack_tail_s`; frames are unpacked as they arrive, so
the rest of `unpack_s` overlaps with the wire).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..assets import load_text  # noqa: E402
from ..pd.client import complete  # noqa: E402
from ..pd.launch import Cluster  # noqa: E402

#: FP16 KV bytes per token (K and V, all layers) of 7B-class models, for the projection.
KV_BYTES_PER_TOKEN = {
    "Qwen2.5-7B": 28 * 4 * 128 * 2 * 2,  # 28 layers, 4 KV heads, head_dim 128
    "Mistral-7B": 32 * 8 * 128 * 2 * 2,  # 32 layers, 8 KV heads, head_dim 128
}


@dataclass
class TtftRecord:
    model: str
    prompt_tokens: int
    link_gbps: float
    budget: float
    overlap: bool
    wire_bytes: int
    fp16_bytes: int
    prefill_s: float
    encode_s: float
    wire_s: float
    unpack_s: float
    transfer_exposed_s: float
    transfer_phase_s: float
    ttft_s: float
    limit_s: float
    unpack_tail_s: float = 0.0  # decode-side work left after the last byte (records before v2: 0)


def prompt_of(text: str, tokenizer, n_tokens: int, offset: int) -> str:
    ids = tokenizer(text[offset : offset + n_tokens * 8], add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids[: n_tokens - 1])


def run_ttft(
    model: str,
    lengths: list[int],
    links: list[float],
    budgets: list[float],
    overlaps: list[bool],
    score_layers: int = 4,
) -> list[TtftRecord]:
    from transformers import AutoTokenizer

    from ..assets import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir(model))
    text = load_text("wiki")
    records = []
    with Cluster(model) as cluster:
        complete(cluster.url, "warm up", 1)
        for n in lengths:
            prompt = prompt_of(text, tok, n, offset=n * 13)
            for gbps in links:
                for budget in budgets:
                    for overlap in overlaps:
                        r = complete(
                            cluster.url,
                            prompt,
                            1,
                            policy="spectrum",
                            budget=budget,
                            link_gbps=gbps,
                            overlap=overlap,
                            score_layers=score_layers,
                        )
                        s = r["spectrumkv"]
                        exposed = s["transfer_exposed_s"]
                        records.append(
                            TtftRecord(
                                model=model,
                                prompt_tokens=r["usage"]["prompt_tokens"],
                                link_gbps=gbps,
                                budget=budget,
                                overlap=overlap,
                                wire_bytes=s["wire_bytes"],
                                fp16_bytes=s["fp16_bytes"],
                                prefill_s=s["prefill_s"],
                                encode_s=s["encode_s"],
                                wire_s=s["wire_s"],
                                unpack_s=s["unpack_s"],
                                unpack_tail_s=s["unpack_tail_s"],
                                transfer_exposed_s=exposed,
                                transfer_phase_s=exposed + s["unpack_tail_s"],
                                ttft_s=s["ttft_s"],
                                limit_s=s["wire_bytes"] * 8 / (gbps * 1e9),
                            )
                        )
                        print_row(records[-1])
    return records


def print_header() -> None:
    print(
        f"{'tokens':>6} {'Gbps':>5} {'budget':>6} {'ovl':>3} {'wire MB':>8} {'prefill':>8} "
        f"{'encode':>7} {'wire':>7} {'exposed':>8} {'unpack':>7} {'tail':>7} {'phase':>7} "
        f"{'TTFT':>7} {'limit':>7}"
    )


def print_row(r: TtftRecord) -> None:
    print(
        f"{r.prompt_tokens:>6} {r.link_gbps:>5g} {r.budget:>6.2f} "
        f"{'on' if r.overlap else 'off':>3} "
        f"{r.wire_bytes / 1e6:>8.2f} {r.prefill_s:>7.2f}s {r.encode_s:>6.3f}s {r.wire_s:>6.3f}s "
        f"{r.transfer_exposed_s:>7.3f}s {r.unpack_s:>6.3f}s {r.unpack_tail_s:>6.3f}s "
        f"{r.transfer_phase_s:>6.3f}s {r.ttft_s:>6.2f}s {r.limit_s:>6.3f}s",
        flush=True,
    )


def projection(
    records: list[TtftRecord], tokens: int = 4096, codec_json: str | None = None
) -> list[str]:
    """Paper-style projection for 7B-class models from codec throughput measured here: from the
    records of `bench codec --json` when given (the codec alone), else from the workers' stage
    times (which also include scoring, planning and framing)."""
    if codec_json:
        with open(codec_json) as f:
            rows = [r for r in json.load(f) if r["codec"] == "fused" and r["budget"]]
        enc = [r["encode_gbps"] * 1e9 for r in rows]
        dec = [r["decode_gbps"] * 1e9 for r in rows]
        source = f"codec throughput from {codec_json}"
    else:
        enc = [r.fp16_bytes / r.encode_s for r in records if r.encode_s > 0 and r.budget < 1.0]
        dec = [r.fp16_bytes / r.unpack_s for r in records if r.unpack_s > 0 and r.budget < 1.0]
        source = "the workers' measured encode and unpack stage times"
    if not enc or not dec:
        return []
    enc_bps, dec_bps = statistics.median(enc), statistics.median(dec)
    lines = [
        f"PROJECTION (not a measurement): {tokens}-token prompt, transfer phase without overlap "
        f"= encode + wire + unpack, using {source} on this machine "
        f"(median encode {enc_bps / 1e9:.2f} GB/s, unpack {dec_bps / 1e9:.2f} GB/s of FP16 input; "
        "raw FP16 needs no codec).",
        "",
        "| model | link | raw FP16 (s) | b=0.5 (s) | b=0.3 (s) |",
        "|---|---|---|---|---|",
    ]
    for name, per_tok in KV_BYTES_PER_TOKEN.items():
        raw = tokens * per_tok
        for gbps in (1, 10, 25, 100):
            rate = gbps * 1e9 / 8
            cells = [raw / rate]
            for b in (0.5, 0.3):
                cells.append(raw / enc_bps + b * raw / rate + raw / dec_bps)
            lines.append(
                f"| {name} | {gbps} Gbps | " + " | ".join(f"{c:.3f}" for c in cells) + " |"
            )
    return lines


def plot(records: list[TtftRecord], png: str) -> None:
    """Top row: TTFT; bottom row: the transfer phase (exposed send + decode-side unpack tail)."""
    lengths = sorted({r.prompt_tokens for r in records})
    fig, axes = plt.subplots(2, len(lengths), figsize=(4.2 * len(lengths), 6.6), squeeze=False)
    for col, n in enumerate(lengths):
        for row, (field, label) in enumerate(
            (("ttft_s", "TTFT (s)"), ("transfer_phase_s", "transfer phase (s)"))
        ):
            ax = axes[row][col]
            for budget in sorted({r.budget for r in records}):
                for overlap in (False, True):
                    pts = sorted(
                        (r.link_gbps, getattr(r, field))
                        for r in records
                        if r.prompt_tokens == n and r.budget == budget and r.overlap == overlap
                    )
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            [p[1] for p in pts],
                            marker="o",
                            ls="-" if overlap else "--",
                            label=f"b={budget:g} {'stream' if overlap else 'after'}",
                        )
            ax.set_xscale("log")
            ax.set_xlabel("link (Gbps)")
            ax.set_ylabel(label)
            ax.set_title(f"{n} prompt tokens", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def load_json(path: str) -> list[TtftRecord]:
    with open(path, encoding="utf-8") as f:
        return [TtftRecord(**r) for r in json.load(f)]


def write_json(records: list[TtftRecord], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump([asdict(r) for r in records], f, indent=1)
