"""`spectrumkv demo --scd`: model A's prefill worker serves model B's decode worker through SCD.

Starts `serve prefill --model A --scd-artifacts ART` and `serve decode --model B --scd ART` as
two processes on loopback, sends each prompt once per method, one request at a time, and shows
per method the bytes on the wire (and their ratio to B's raw FP16 KV cache), TTFT, B's
reconstruction time and how many leading generated tokens equal the oracle's (B's own prefill):

- oracle: `recompute`, B prefills the prompt itself (no transfer);
- raw: A's FP16 KV cache used by B as-is (the baseline SCD must beat; asked for by name);
- scd: FP16 SCD codes; scd-q: codes quantized to `code_budget` of the raw FP16 bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..demo import matched_prefix
from ..pd.client import complete, token_ids
from ..pd.launch import Cluster
from .splits import DEFAULT_CORPUS, split_text


def default_prompts(
    model: str, corpus: str = DEFAULT_CORPUS, n: int = 3, tokens: int = 160
) -> tuple[str, ...]:
    """`n` passages of `corpus`' eval split (text no fine-tune or calibration read), each cut
    to `tokens` tokens of `model`'s tokenizer: paragraphs that long, else (long prompts)
    consecutive `tokens`-token windows of the split."""
    from transformers import AutoTokenizer

    from ..assets import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir(model))
    text = split_text(corpus, "eval")
    paragraphs = [p for p in text.split("\n\n") if len(p) > 4 * tokens]
    if len(paragraphs) >= n:
        cut = [tok(p, add_special_tokens=False)["input_ids"][:tokens] for p in paragraphs[:n]]
    else:
        ids = tok(text[: 8 * tokens * n], add_special_tokens=False)["input_ids"]
        cut = [ids[i * tokens : (i + 1) * tokens] for i in range(n)]
    return tuple(tok.decode(ids) for ids in cut)


@dataclass
class ScdDemoRow:
    prompt: int
    method: str
    outcome: str
    wire_bytes: int
    raw_fp16_bytes: int
    wire_ratio: float
    ttft_s: float
    reconstruct_s: float
    matched_tokens: int
    generated_tokens: int
    text: str
    reason: str = ""  # why it was recomputed, if it was


def methods(code_budget: float) -> dict[str, dict]:
    """Method name -> the request's `spectrumkv` options."""
    return {
        "oracle": {"method": "recompute"},
        "raw": {"method": "raw"},
        "scd": {"method": "scd"},
        f"scd-q{code_budget:g}": {"method": "scd", "code_budget": code_budget},
    }


def run_scd_demo(
    producer: str,
    consumer: str,
    artifact: str,
    prompts: tuple[str, ...],
    max_new_tokens: int = 24,
    code_budget: float = 0.3,
    dtype: str = "float32",
) -> list[ScdDemoRow]:
    """Every prompt through every method (`methods`), the oracle first; both workers compute
    in `dtype` (float32 or bfloat16; the KV and codes on the wire are the same either way)."""
    rows: list[ScdDemoRow] = []
    cluster = Cluster(consumer, prefill_model=producer,
                      prefill_args=["--scd-artifacts", artifact, "--dtype", dtype],
                      decode_args=["--scd", artifact, "--dtype", dtype])  # fmt: skip
    with cluster:
        complete(cluster.url, prompts[0], 2, method="recompute")  # warm-up, not shown
        for i, prompt in enumerate(prompts):
            ref: list[int] = []
            for name, opts in methods(code_budget).items():
                r = complete(cluster.url, prompt, max_new_tokens, **opts)
                s, ids = r["spectrumkv"], token_ids(r)
                ref = ref or ids
                rows.append(ScdDemoRow(
                    prompt=i, method=name, outcome=s["outcome"],
                    wire_bytes=s.get("wire_bytes", 0), raw_fp16_bytes=s.get("fp16_bytes", 0),
                    wire_ratio=s.get("wire_ratio") or 0.0, ttft_s=s["ttft_s"],
                    reconstruct_s=s.get("reconstruct_s", 0.0),
                    matched_tokens=matched_prefix(ids, ref), generated_tokens=len(ids),
                    text=r["choices"][0]["text"].replace("\n", " "), reason=s.get("reason", ""),
                ))  # fmt: skip
    return rows


def print_table(rows: list[ScdDemoRow]) -> None:
    head = f"{'#':>2} {'method':<9} {'outcome':<10} {'wire bytes':>10} {'wire/raw':>8} "
    head += f"{'TTFT':>7} {'rebuild':>8} {'match':>6}  text"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.prompt:>2} {r.method:<9} {r.outcome:<10} {r.wire_bytes:>10,} "
            f"{r.wire_ratio:>8.3f} {r.ttft_s:>6.2f}s {r.reconstruct_s:>7.3f}s "
            f"{r.matched_tokens:>2}/{r.generated_tokens:<3}  {r.text[:40]!r}"
        )
    for r in rows:
        if r.reason:
            print(f"prompt {r.prompt} {r.method} recomputed: {r.reason}")


def write_json(rows: list[ScdDemoRow], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)


def main(args) -> None:
    """`spectrumkv demo --scd` (cli.py's arguments)."""
    if not args.artifact:
        raise SystemExit(
            "spectrumkv: demo --scd needs --artifact ART, made e.g. by: spectrumkv scd "
            f"calibrate --producer {args.producer} --consumer {args.model} --out ART"
        )
    if not 0 < args.code_budget <= 1:
        raise SystemExit(f"spectrumkv: --code-budget must be in (0, 1], got {args.code_budget}")
    if args.prompt_tokens < 1:
        raise SystemExit(f"spectrumkv: --prompt-tokens must be >= 1, got {args.prompt_tokens}")
    prompts = (
        tuple(args.prompt)
        if args.prompt
        else default_prompts(args.model, args.corpus, tokens=args.prompt_tokens)
    )
    print(f"starting {args.producer}'s prefill worker and {args.model}'s decode worker ...")
    rows = run_scd_demo(args.producer, args.model, args.artifact, prompts, args.max_new_tokens,
                        args.code_budget, args.dtype)  # fmt: skip
    print("each prompt: HTTP -> B's decode worker -> A's prefill worker (SCD codes or A's KV "
          "over TCP) -> B rebuilds its cache -> generate; 'match' = leading tokens equal to the "
          "oracle (B's own prefill)\n")  # fmt: skip
    print_table(rows)
    if args.json:
        write_json(rows, args.json)
        print(f"\nwrote {len(rows)} records to {args.json}")
