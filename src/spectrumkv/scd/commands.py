"""`spectrumkv scd ...`: argument parsing and dispatch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _cmd_finetune(args: argparse.Namespace) -> None:
    import torch

    from .finetune import Recipe, finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(
        base=args.base,
        corpus=args.corpus,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        batch=args.batch,
        seq_len=args.seq_len,
        warmup=args.warmup,
        clip=args.clip,
        decay=args.decay,
        train_embeddings=args.train_embeddings,
        attn_lr_scale=args.attn_lr_scale,
        rope_theta=args.rope_theta,
        rope_layers=args.rope_layers,
    )
    print(finetune(recipe, args.out, save_every=args.save_every))


def _threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from ..engines.hf import load
    from .artifact import save
    from .calibrate import CalibConfig, calibrate

    _threads(args.threads)
    cfg = CalibConfig(
        corpus=args.corpus, prompts=args.prompts, prompt_tokens=args.prompt_tokens,
        code_budget=args.code_budget, patch_rank=args.patch_rank, max_patches=args.max_patches,
        eps=args.eps, patch_min_gain=args.patch_min_gain, aligner_steps=args.aligner_steps,
        dev_chunks=args.dev_chunks,
        alpha_grid=args.alpha_grid, alpha_levels=args.alpha_levels,
        distill_steps=args.distill_steps, distill_chunks=args.distill_chunks,
        distill_lr=args.distill_lr, distill_windows=args.distill_windows,
        head_tokens=args.head_tokens, tail_tokens=args.tail_tokens,
        refresh_grid=args.refresh_grid,
    )  # fmt: skip
    a = load(args.producer)
    b = a if args.consumer == args.producer else load(args.consumer)
    art = calibrate(a, b, cfg)
    save(art, args.out)
    m = art.manifest
    print(f"{args.out}: patch layers {m.patch_layers}, KL on dev {m.kl_dev:.4f} (eps {m.eps}; "
          f"identity {m.kl_dev_identity:.4f}), alphas (K, V) {m.alphas}")  # fmt: skip


def _listof(kind: type) -> Callable[[str], tuple]:
    """argparse type: a comma-separated list of `kind`."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None

    return parse


def _refresh(text: str) -> tuple[int, int]:
    """argparse type: HEAD:TAIL token counts."""
    head, sep, tail = text.partition(":")
    try:
        if sep:
            return int(head), int(tail)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected HEAD:TAIL token counts, got {text!r}")


def _cmd_eval(args: argparse.Namespace) -> None:
    import json

    from ..engines.hf import load
    from ..eval.report import vs_raw
    from .artifact import load as load_artifact
    from .evaluate import EvalConfig, rebuild_timing, run_eval
    from .plots import plot_all

    _threads(args.threads)
    cfg = EvalConfig(corpus=args.corpus, chunks=args.chunks, context=args.context,
                     continuation=args.continuation,
                     budgets=args.budgets, quant_budgets=args.quant_budgets,
                     refresh=args.refresh, refreshes=args.refreshes)  # fmt: skip
    a, b = load(args.producer), load(args.consumer)
    art = load_artifact(args.artifact)
    control = load_artifact(args.control) if args.control else None
    result = run_eval(a, b, art, control, cfg)
    if args.timing_tokens:
        result["timing"] = rebuild_timing(
            a, b, art, args.timing_tokens, args.corpus, args.timing_reps, args.refresh
        )
    result["command"] = "spectrumkv " + " ".join(sys.argv[1:])
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    for r in result["records"]:
        print(
            f"{r['method']:>20} bytes {r['bytes_ratio']:.3f}  dPPL {r['delta_pct']:+7.2f}% "
            f"(chunk sd {r['delta_pct_chunk_std']:.2f}; x raw {vs_raw(r, 'delta')})  "
            f"KL {r['kl']:.4f} (x raw {vs_raw(r, 'kl')})  prefix "
            f"{r['exact_prefix']:.1f}  F1 {r['token_f1']:.2f}  rebuild {r['rebuild_s']:.3f}s"
        )
    if "timing" in result:
        print(result["timing"])
    if args.plots:
        for p in plot_all(result, args.plots):
            print(p)


def _cmd_pair(args: argparse.Namespace) -> None:
    import json

    from ..engines.hf import load
    from .evaluate import EvalConfig, pair_check

    _threads(args.threads)
    cfg = EvalConfig(corpus=args.corpus, chunks=args.chunks)
    out = pair_check(load(args.producer), load(args.consumer), cfg)
    print(json.dumps(out, indent=1))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `spectrumkv scd` (finetune, calibrate, eval) to the main parser."""
    from .calibrate import CalibConfig
    from .evaluate import EvalConfig
    from .finetune import Recipe

    scd = sub.add_parser("scd", help="Semantic Cache Distillation: cross-model KV transfer")
    cmds = scd.add_subparsers(dest="scd_cmd", required=True)
    d = Recipe(base="")
    ft = cmds.add_parser("finetune", help="make a model pair: full fine-tune, cached by recipe")
    ft.add_argument("--base", default="smollm2-135m", help="alias, HF directory or hub id")
    ft.add_argument("--corpus", default=d.corpus)
    ft.add_argument("--steps", type=int, default=d.steps)
    ft.add_argument("--lr", type=float, default=d.lr)
    ft.add_argument("--seed", type=int, default=d.seed)
    ft.add_argument("--batch", type=int, default=d.batch)
    ft.add_argument("--seq-len", type=int, default=d.seq_len)
    ft.add_argument("--warmup", type=int, default=d.warmup)
    ft.add_argument("--clip", type=float, default=d.clip, help="gradient norm cap (0: none)")
    ft.add_argument("--decay", default=d.decay, choices=("cosine", "constant"))
    ft.add_argument("--train-embeddings", action="store_true",
                    help="also train the token embeddings (default: frozen)")  # fmt: skip
    ft.add_argument("--attn-lr-scale", type=float, default=d.attn_lr_scale,
                    help="lr multiplier of the attention projections (W_q/k/v/o)")  # fmt: skip
    ft.add_argument("--rope-theta", type=float, default=None,
                    help="RoPE base frequency to train B under (default: the base's)")  # fmt: skip
    ft.add_argument("--rope-layers", default=None,
                    help="only this layer type's RoPE (Gemma-3: full_attention)")  # fmt: skip
    ft.add_argument("--save-every", type=int, default=6, help="checkpoint period (steps)")
    ft.add_argument("--out", default=None, help="output directory (default: the cache)")
    ft.add_argument("--threads", type=int, default=0)
    ft.set_defaults(func=_cmd_finetune)

    c = CalibConfig()
    cal = cmds.add_parser("calibrate", help="fit the low-rank maps and patch layers of a pair")
    cal.add_argument("--producer", required=True, help="model A (prefill side)")
    cal.add_argument("--consumer", required=True, help="model B (decode side)")
    cal.add_argument("--corpus", default=c.corpus)
    cal.add_argument("--prompts", type=int, default=c.prompts)
    cal.add_argument("--prompt-tokens", type=int, default=c.prompt_tokens,
                     help="tokens per calibration prompt: as long as those served")  # fmt: skip
    cal.add_argument("--code-budget", type=float, default=c.code_budget,
                     help="reuse-path code bytes / raw FP16 KV bytes")  # fmt: skip
    cal.add_argument("--patch-rank", type=int, default=c.patch_rank)
    cal.add_argument("--max-patches", type=int, default=c.max_patches)
    cal.add_argument("--eps", type=float, default=c.eps, help="KL target on dev (nats/token)")
    cal.add_argument("--patch-min-gain", type=float, default=c.patch_min_gain,
                     help="fraction of dev KL a patch must remove to join")  # fmt: skip
    cal.add_argument("--aligner-steps", type=int, default=c.aligner_steps)
    cal.add_argument("--dev-chunks", type=int, default=c.dev_chunks)
    cal.add_argument(
        "--alpha-grid",
        type=_listof(float),
        default=c.alpha_grid,
        help="decoder shrinkage values tried (1: cross-model, 0: A's own K/V)",
    )
    cal.add_argument(
        "--alpha-levels",
        type=_listof(int),
        default=c.alpha_levels,
        help="layer groups per shrinkage level, coarse to fine (e.g. 1,6,30)",
    )
    cal.add_argument("--distill-steps", type=int, default=c.distill_steps,
                     help="steps training the decoders on B's output KL (0: off)")  # fmt: skip
    cal.add_argument("--distill-chunks", type=int, default=c.distill_chunks,
                     help="calib-split chunks distillation trains on (random windows: "
                          "steps between dev checks)")  # fmt: skip
    cal.add_argument("--distill-windows", choices=("fixed", "random"), default=c.distill_windows,
                     help="fixed: the chunks prepared once and cycled; random: a fresh window "
                          "of the calib split every step")  # fmt: skip
    cal.add_argument("--distill-lr", type=float, default=c.distill_lr,
                     help="AdamW learning rate of distillation")  # fmt: skip
    cal.add_argument("--head-tokens", type=int, default=c.head_tokens,
                     help="B recomputes each prompt's first this many tokens itself (stored "
                          "in the artifact)")  # fmt: skip
    cal.add_argument("--tail-tokens", type=int, default=c.tail_tokens,
                     help="B recomputes each prompt's last this many tokens itself; A codes "
                          "the rest (stored in the artifact)")  # fmt: skip
    cal.add_argument("--refresh-grid", type=_listof(_refresh), default=c.refresh_grid,
                     metavar="HEAD:TAIL,...",
                     help="refresh candidates: the artifact keeps the cheapest whose dev KL "
                          "<= eps (else the lowest); fit under --head-tokens/--tail-tokens, "
                          "best the grid's largest")  # fmt: skip
    cal.add_argument("--out", required=True, help="artifact directory")
    cal.add_argument("--threads", type=int, default=0)
    cal.set_defaults(func=_cmd_calibrate)

    e = EvalConfig()
    ev = cmds.add_parser("eval", help="SCD vs every baseline under the PD protocol")
    ev.add_argument("--producer", required=True)
    ev.add_argument("--consumer", required=True)
    ev.add_argument("--artifact", required=True)
    ev.add_argument("--control", default=None, help="artifact calibrated with A = B (control)")
    ev.add_argument("--corpus", default=e.corpus)
    ev.add_argument("--chunks", type=int, default=e.chunks)
    ev.add_argument("--context", type=int, default=e.context)
    ev.add_argument("--continuation", type=int, default=e.continuation)
    ev.add_argument("--budgets", type=_listof(float), default=e.budgets,
                    help="budgets of the raw-spectrum methods (A's KV, SpectrumKV)")  # fmt: skip
    ev.add_argument("--quant-budgets", type=_listof(float), default=e.quant_budgets,
                    help="code budgets of the scd-q methods, fractions of raw FP16 KV bytes "
                    "(below all-INT4, ~0.38, tokens are dropped)")  # fmt: skip
    ev.add_argument("--refresh", type=_refresh, default=None, metavar="HEAD:TAIL",
                    help="tokens B recomputes in the scd methods (default: the "
                         "artifact's)")  # fmt: skip
    ev.add_argument("--refreshes", type=_listof(_refresh), default=e.refreshes,
                    metavar="H:T,...",
                    help="also measure raw-hHtT and scd-hHtT for each pair")  # fmt: skip
    ev.add_argument("--timing-tokens", type=int, default=4096, help="0: skip the timing run")
    ev.add_argument("--timing-reps", type=int, default=3, help="timing runs (medians reported)")
    ev.add_argument("--json", required=True)
    ev.add_argument("--plots", default=None, help="path stem of the PNG plots")
    ev.add_argument("--threads", type=int, default=0)
    ev.set_defaults(func=_cmd_eval)

    pr = cmds.add_parser("pair", help="A's and B's own PPL and raw-reuse dPPL/KL of a pair")
    pr.add_argument("--producer", required=True)
    pr.add_argument("--consumer", required=True)
    pr.add_argument("--corpus", default=e.corpus)
    pr.add_argument("--chunks", type=int, default=e.chunks)
    pr.add_argument("--threads", type=int, default=0)
    pr.set_defaults(func=_cmd_pair)
