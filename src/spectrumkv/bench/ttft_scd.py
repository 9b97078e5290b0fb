"""`spectrumkv bench ttft --scd`: SCD through real workers, prompt lengths x emulated links x
method, beside B's own prefill.

Model A's prefill worker (`--scd-artifacts`) and model B's decode worker (`--scd ARTIFACT`) run
as two processes; each request generates one token. Per record: A's prefill, encode, time on the
(emulated) wire, B's reconstruction (`reconstruct_s`, done frame by frame as they arrive), the
transfer phase after A's prefill (exposed send + B's unpack/rebuild tail) and TTFT; the `oracle`
rows are B's own prefill (method recompute: no transfer), measured in the same run.

`projection` scales the measured per-byte (wire) and per-layer-token costs (A's encode, B's
rebuild, B's prefill) to a 7B-class pair; it is labelled as a projection wherever printed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass

from ..assets import load_text
from ..pd.client import complete
from ..pd.launch import Cluster
from .ttft import prompt_of

METHODS = {"raw": {"method": "raw"}, "scd": {"method": "scd"}}


@dataclass
class ScdTtftRecord:
    prompt_tokens: int
    link_gbps: float
    method: str  # oracle (B's own prefill), raw, scd, scd-q<budget>
    wire_bytes: int
    raw_fp16_bytes: int
    prefill_s: float  # A's prefill on the prefill worker (oracle: 0)
    encode_s: float
    wire_s: float
    reconstruct_s: float
    unpack_s: float
    transfer_phase_s: float  # exposed send + decode-side tail after A's prefill
    ttft_s: float


def run_ttft_scd(
    producer: str,
    consumer: str,
    artifact: str,
    lengths: list[int],
    links: list[float],
    code_budget: float | None = 0.3,
) -> list[ScdTtftRecord]:
    from transformers import AutoTokenizer

    from ..assets import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir(consumer))
    text = load_text("wiki")
    methods = dict(METHODS)
    if code_budget is not None:
        methods[f"scd-q{code_budget:g}"] = {"method": "scd", "code_budget": code_budget}
    records = []
    cluster = Cluster(consumer, prefill_model=producer, prefill_args=["--scd-artifacts", artifact],
                      decode_args=["--scd", artifact, "--deadline", "600"])  # fmt: skip
    with cluster:
        complete(cluster.url, "warm up", 1, method="scd")
        for n in lengths:
            prompt = prompt_of(text, tok, n, offset=n * 13)
            r = complete(cluster.url, prompt, 1, method="recompute")
            records.append(_record(r, 0.0, "oracle"))
            print_row(records[-1])
            for gbps in links:
                for name, opts in methods.items():
                    r = complete(cluster.url, prompt, 1, link_gbps=gbps, **opts)
                    records.append(_record(r, gbps, name))
                    print_row(records[-1])
    return records


def _record(r: dict, gbps: float, method: str) -> ScdTtftRecord:
    s = r["spectrumkv"]
    if s["outcome"] != "ok":
        raise RuntimeError(f"{method} at {gbps} Gbps was recomputed: {s.get('reason')}")
    tail = s.get("transfer_exposed_s", 0.0) + s.get("unpack_tail_s", 0.0)
    return ScdTtftRecord(
        prompt_tokens=r["usage"]["prompt_tokens"], link_gbps=gbps, method=method,
        wire_bytes=s.get("wire_bytes", 0), raw_fp16_bytes=s.get("fp16_bytes", 0),
        prefill_s=s.get("prefill_s", 0.0), encode_s=s.get("encode_s", 0.0),
        wire_s=s.get("wire_s", 0.0), reconstruct_s=s.get("reconstruct_s", 0.0),
        unpack_s=s.get("unpack_s", 0.0), transfer_phase_s=tail, ttft_s=s["ttft_s"],
    )  # fmt: skip


def print_header() -> None:
    print(
        f"{'tokens':>6} {'Gbps':>5} {'method':<9} {'wire MB':>8} {'/raw':>6} {'A pref':>7} "
        f"{'encode':>7} {'wire':>7} {'rebuild':>8} {'phase':>7} {'TTFT':>7}"
    )


def print_row(r: ScdTtftRecord) -> None:
    ratio = r.wire_bytes / r.raw_fp16_bytes if r.raw_fp16_bytes else 0.0
    print(
        f"{r.prompt_tokens:>6} {r.link_gbps:>5g} {r.method:<9} {r.wire_bytes / 1e6:>8.3f} "
        f"{ratio:>6.3f} {r.prefill_s:>6.2f}s {r.encode_s:>6.3f}s {r.wire_s:>6.3f}s "
        f"{r.reconstruct_s:>7.3f}s {r.transfer_phase_s:>6.3f}s {r.ttft_s:>6.2f}s",
        flush=True,
    )


def verdict(records: list[ScdTtftRecord], noise: float = 0.05) -> list[str]:
    """Plainly, per length and link: does SCD's TTFT beat B's own prefill (oracle; within
    `noise` relative = a tie), and what B's rebuild costs against B's own prefill."""
    lines = []
    oracle = {r.prompt_tokens: r for r in records if r.method == "oracle"}
    for r in records:
        if not r.method.startswith("scd") or r.prompt_tokens not in oracle:
            continue
        o = oracle[r.prompt_tokens]
        if abs(r.ttft_s - o.ttft_s) <= noise * o.ttft_s:
            word = f"ties with (within {noise:.0%})"
        else:
            word = "beats" if r.ttft_s < o.ttft_s else "does NOT beat"
        lines.append(
            f"{r.prompt_tokens} tokens, {r.link_gbps:g} Gbps, {r.method}: TTFT {r.ttft_s:.2f} s "
            f"{word} B's own prefill ({o.ttft_s:.2f} s); B's rebuild {r.reconstruct_s:.3f} s = "
            f"{r.reconstruct_s / max(o.ttft_s, 1e-9):.0%} of it"
        )
    return lines


#: 7B-class pair shapes for the projection: layers, KV width (heads x head_dim), parameters.
SHAPES_7B = {"Mistral-7B": (32, 8 * 128, 7.2e9), "Qwen2.5-7B": (28, 4 * 128, 7.6e9)}


def projection(
    records: list[ScdTtftRecord], n_layers: int, params: float, tokens: int = 4096
) -> list[str]:
    """PROJECTION to 7B-class pairs from the largest prompt measured here, per method: SCD
    bytes and B's rebuild seconds per (token x layer x KV-width element), medians over the
    links; B's own prefill seconds per (token x parameter); wire = bytes / link rate."""
    n = max(r.prompt_tokens for r in records)
    oracle = next(r for r in records if r.method == "oracle" and r.prompt_tokens == n)
    rows = [r for r in records if r.method.startswith("scd") and r.prompt_tokens == n]
    if not rows:
        return []
    elems_here = n * n_layers * rows[0].raw_fp16_bytes / (n * n_layers * 4)
    prefill_per = oracle.ttft_s / (n * params)
    lines = [
        f"PROJECTION (not a measurement): {tokens}-token prompt, 7B-class pairs, from costs "
        f"measured here at {n} tokens (2-core CPU, under load): B's own prefill "
        f"{prefill_per * 1e12:.1f} s per token per 1e12 parameters; per method, SCD wire bytes "
        "and B's rebuild seconds per token x layer x KV-width element (median over links); "
        "wire = bytes / link rate. A's prefill costs what B's does (same architecture), so "
        "end to end SCD's TTFT = A's prefill + exposed wire + rebuild tail >= B's own prefill "
        "on equal hardware; the columns compare the decode side's work.",
        "",
        "| pair | method | link | SCD MB | wire (s) | B's rebuild (s) | wire + rebuild (s) "
        "| B's own prefill (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    methods = sorted({r.method for r in rows})
    for name, (layers, width, p) in SHAPES_7B.items():
        own = prefill_per * tokens * p
        elems = tokens * layers * width
        for m in methods:
            per_byte = statistics.median(r.wire_bytes / elems_here for r in rows if r.method == m)
            per_rebuild = statistics.median(
                r.reconstruct_s / elems_here for r in rows if r.method == m
            )
            nbytes, rebuild = per_byte * elems, per_rebuild * elems
            for gbps in sorted({r.link_gbps for r in rows}):
                wire = nbytes * 8 / (gbps * 1e9)
                lines.append(
                    f"| {name} | {m} | {gbps:g} Gbps | {nbytes / 1e6:.0f} | {wire:.2f} | "
                    f"{rebuild:.2f} | {wire + rebuild:.2f} | {own:.0f} |"
                )
    return lines


def summary(records: list[ScdTtftRecord]) -> dict:
    """Median rebuild / own-prefill ratio over the SCD rows (for the results JSON)."""
    oracle = {r.prompt_tokens: r.ttft_s for r in records if r.method == "oracle"}
    ratios = [r.reconstruct_s / oracle[r.prompt_tokens] for r in records
              if r.method.startswith("scd") and r.prompt_tokens in oracle]  # fmt: skip
    return {"rebuild_over_own_prefill_median": statistics.median(ratios) if ratios else None}


def load_json(path: str) -> list[ScdTtftRecord]:
    with open(path, encoding="utf-8") as f:
        return [ScdTtftRecord(**r) for r in json.load(f)["records"]]


def write_json(records: list[ScdTtftRecord], path: str, extra: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"records": [asdict(r) for r in records], **extra}, f, indent=1)
