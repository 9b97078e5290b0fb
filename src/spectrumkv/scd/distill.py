"""Distillation: the reuse-path decoders trained through frozen B on B's output KL.

The decoders from calibration are fitted for K/V error and then shrunk toward A's own K/V by a
coarse alpha grid (calibrate.py); what matters is B's output. Here, per reuse-path layer i, the
tensors `i.k.dec`, `i.k.mu_b`, `i.v.dec`, `i.v.mu_b` start from the artifact's values and are
trained by AdamW on the PD protocol's chunks of the `calib` split, one chunk a step:

- `distill_windows` "fixed": `distill_chunks` non-overlapping chunks prepared once and cycled;
  "random": a fresh chunk at a random token offset every step, prepared when drawn (each step
  costs a chunk's preparation more; nothing is stored, and every calib token can be a target);
- preparing a chunk (prefix `dev_context - dev_continuation` tokens, then the continuation): A's
  codes of the prefix (`codes.encode`, FP16 codes as on the wire) and B's oracle log-probs of the
  continuation from B's own prefill; patch layers (if any) are rebuilt then, not trained; with a
  refresh (`head_tokens`, `tail_tokens`, `scd.refresh`) A codes all but the prefix's last
  `tail_tokens`, and B's own K/V of the first `head_tokens` is computed then;
- a step rebuilds B's prefix cache from the codes with the same math as `reconstruct_layer`
  (`codes.reuse_flat` + `codes.to_layer`, keeping the autograd graph), splices in the head
  rows, runs B (weights frozen, eval mode, float32) over the refreshed tail and the
  continuation from that cache, and takes the loss mean token KL(B || oracle) over the
  continuation, the quantity `metrics.kl` measures: the cache is trained as the refresh uses it;
- the start and the decoders every `distill_chunks` steps (and after the last step) are
  scored on the dev split with the non-differentiable path (`dev_kl`, i.e. what the workers
  compute); the best one is kept, so the dev KL never rises.

The artifact format, the wire and the workers are unchanged: only tensor values move.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..engines.hf import Engine, decode_state, step
from ..eval.ppl import corpus_chunks
from ..kv import LayerKV
from .artifact import Artifact
from .codes import LayerCode, encode, reconstruct_layer, reuse_flat, to_layer
from .metrics import oracle_score
from .refresh import coded_tokens, head_rows, splice
from .splits import split_text

if TYPE_CHECKING:
    from .calibrate import CalibConfig

#: `engines.hf.step` without its inference mode, so the graph to the cache is kept.
_step = step.__wrapped__

#: Storage dtype of the training chunks' oracle log-probs: a chunk's [t, vocab] log-probs are
#: 67 MB in float16 at Gemma-3's 262,144-token vocabulary and t = 128 (134 MB in float32), so
#: all 96 chunks of Gemma-3's calib split fit (peak RSS 14.7 GB, RESULTS "SCD round 17").
#: Rounding moves a log-prob by at most 2^-11 of itself;
#: the loss weighs it by B's probability, and candidates are scored on dev in float32 anyway.
ORACLE_DTYPE = torch.float16

#: Names of the trained tensors of a reuse-path layer.
TRAINED = ("k.dec", "k.mu_b", "v.dec", "v.mu_b")


@dataclass
class _Chunk:
    """One training chunk: A's codes of the prefix's first `n_tokens` (per layer), patch layers
    already rebuilt, B's own K/V of the head tokens (empty: no head refresh), the prefix tokens B
    recomputes (`fresh`, the tail) and the continuation fed after them, and B's oracle log-probs
    of the continuation [t, vocab] (`ORACLE_DTYPE`)."""

    codes: list[LayerCode]
    fixed: dict[int, object]
    n_tokens: int
    head: list[LayerKV]
    fresh: torch.Tensor
    feed: torch.Tensor
    oracle: torch.Tensor


@dataclass
class Distilled:
    """The result: the artifact with the kept decoders, the training KL of every step (before
    its update, nats/token), dev KL per candidate as (step, KL) with step 0 the start, and the
    step whose decoders were kept (0: the start)."""

    artifact: Artifact
    train_kl: list[float] = field(default_factory=list)
    dev_kl: list[tuple[int, float]] = field(default_factory=list)
    kept_step: int = 0


def kl_loss(logp: torch.Tensor, oracle: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(logp || oracle) in nats, both [t, vocab] log-probs (`oracle`
    in any float dtype, computed in `logp`'s): the formula of `metrics.kl`, as a differentiable
    tensor."""
    return (logp.exp() * (logp - oracle.to(logp.dtype))).sum(-1).mean()


def _prepare(
    engine_a: Engine, engine_b: Engine, art: Artifact, cfg: CalibConfig, chunk: torch.Tensor
) -> _Chunk:
    """One training chunk from `cfg.dev_context` token ids: A's codes of the prefix (all but
    the refreshed tail), patch layers rebuilt, B's own head K/V, B's oracle log-probs of the
    continuation."""
    split = cfg.dev_context - cfg.dev_continuation
    patches = art.manifest.patch_layers
    prefix, feed = chunk[: split - 1], chunk[split - 1 :]
    m = coded_tokens(prefix.numel(), cfg.tail_tokens)
    codes = encode(art, engine_a, prefix[:m])
    fixed = {i: reconstruct_layer(art, engine_b, codes[i]) for i in patches}
    # clones: inference-mode tensors cannot join the autograd graph
    own = head_rows(engine_b, prefix, cfg.head_tokens, m)
    head = [LayerKV(kv.keys.clone(), kv.values.clone(), kv.positions.clone()) for kv in own]
    oracle = oracle_score(engine_b, prefix, feed).logp.to(ORACLE_DTYPE)
    return _Chunk(codes, fixed, m, head, prefix[m:], feed, oracle)


def _fixed_chunks(
    engine_a: Engine, engine_b: Engine, art: Artifact, cfg: CalibConfig
) -> Iterator[_Chunk]:
    """`cfg.distill_chunks` non-overlapping chunks of the calib split, prepared once, then
    yielded in a new random order every pass."""
    text = split_text(cfg.corpus, "calib")
    data = [_prepare(engine_a, engine_b, art, cfg, c)
            for c in tqdm(corpus_chunks(engine_a, text, cfg.dev_context, cfg.distill_chunks),
                          desc="distill prefills", leave=False)]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    while True:
        for i in reversed(torch.randperm(len(data), generator=gen).tolist()):
            yield data[i]


def _random_windows(
    engine_a: Engine, engine_b: Engine, art: Artifact, cfg: CalibConfig
) -> Iterator[_Chunk]:
    """A fresh chunk per step: `cfg.dev_context` tokens at a uniformly random token offset of
    the whole calib split (seeded), prepared when drawn, so every calib token can be a
    continuation target and no chunk's oracle is stored."""
    check_calib(engine_a, cfg)
    ids = engine_a.tokenizer(split_text(cfg.corpus, "calib"), return_tensors="pt")["input_ids"][0]
    gen = torch.Generator().manual_seed(0)
    while True:
        at = int(torch.randint(0, ids.numel() - cfg.dev_context + 1, (1,), generator=gen))
        yield _prepare(engine_a, engine_b, art, cfg, ids[at : at + cfg.dev_context])


#: `CalibConfig.distill_windows` -> the training chunk source.
WINDOWS = {"fixed": _fixed_chunks, "random": _random_windows}


def check_calib(engine_a: Engine, cfg: CalibConfig) -> None:
    """ConfigError unless the calib split can feed `cfg.distill_windows`: `distill_chunks`
    chunks of `dev_context` tokens (fixed), or two chunks' worth of tokens to draw windows
    from (random)."""
    need = cfg.distill_chunks if cfg.distill_windows == "fixed" else 2
    corpus_chunks(engine_a, split_text(cfg.corpus, "calib"), cfg.dev_context, need)


def _loss(engine_b: Engine, params: dict[str, torch.Tensor], c: _Chunk) -> torch.Tensor:
    """Training KL of one chunk with the decoders in `params` (graph kept)."""
    layers = [
        c.fixed[code.layer]
        if code.layer in c.fixed
        else to_layer(engine_b, code.layer, code.positions, *reuse_flat(params, code))
        for code in c.codes
    ]
    if c.head:
        layers = splice(layers, c.head)
    tokens = torch.cat([c.fresh, c.feed[:-1]])
    state = decode_state(engine_b, layers, c.n_tokens)
    logits = _step(engine_b, state, tokens, logits_to_keep=c.feed.numel() - 1)
    return kl_loss(F.log_softmax(logits, dim=-1), c.oracle)


def distill(
    engine_a: Engine,
    engine_b: Engine,
    art: Artifact,
    cfg: CalibConfig,
    dev_kl: Callable[[Artifact], float],
) -> Distilled:
    """Train `art`'s reuse-path decoders for `cfg.distill_steps` steps (module docstring);
    `dev_kl(artifact)` scores a candidate on the dev split. `art` is not modified."""
    m = art.manifest
    names = [f"{i}.{n}" for i in range(len(m.ranks)) if i not in m.patch_layers for n in TRAINED]
    params = {n: art.tensors[n].detach().float().clone().requires_grad_() for n in names}
    result = Distilled(art, dev_kl=[(0, dev_kl(art))])
    if cfg.distill_steps == 0 or not names:
        return result
    data = WINDOWS[cfg.distill_windows](engine_a, engine_b, art, cfg)
    opt = torch.optim.AdamW(params.values(), lr=cfg.distill_lr, weight_decay=0.0)
    every = cfg.distill_chunks  # steps between dev candidates (a pass over fixed chunks)
    frozen = [p for p in engine_b.model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    best = result.dev_kl[0][1]
    try:
        bar = tqdm(range(1, cfg.distill_steps + 1), desc="distill", leave=False)
        for s in bar:
            loss = _loss(engine_b, params, next(data))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            result.train_kl.append(loss.item())
            bar.set_postfix(kl=f"{result.train_kl[-1]:.4f}")
            if s % every and s != cfg.distill_steps:
                continue
            trial = Artifact(m, art.tensors | {n: p.detach().clone() for n, p in params.items()})
            got = dev_kl(trial)
            result.dev_kl.append((s, got))
            tqdm.write(f"distill step {s}: train KL (last pass) "
                       f"{sum(result.train_kl[-every:]) / min(s, every):.4f}, "
                       f"dev KL {got:.4f} (start {result.dev_kl[0][1]:.4f})")  # fmt: skip
            if got < best:
                best, result.artifact, result.kept_step = got, trial, s
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return result
