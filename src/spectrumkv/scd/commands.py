"""`spectrumkv scd ...`: argument parsing and dispatch."""

from __future__ import annotations

import argparse


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
    )
    print(finetune(recipe, args.out, save_every=args.save_every))


def register(sub: argparse._SubParsersAction) -> None:
    """Add `spectrumkv scd` (finetune, calibrate, eval) to the main parser."""
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
    ft.add_argument("--save-every", type=int, default=25, help="checkpoint period (steps)")
    ft.add_argument("--out", default=None, help="output directory (default: the cache)")
    ft.add_argument("--threads", type=int, default=0)
    ft.set_defaults(func=_cmd_finetune)
