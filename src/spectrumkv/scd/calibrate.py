"""Calibration: paired prefills of A and B on the corpus' `calib` split, low-rank K/V maps with
ranks under a byte budget, patch aligners, and patch layers chosen on the `dev` split.

Decoder shrinkage (before patches): every reuse-path decoder is a blend
alpha * cross-model + (1 - alpha) * A's own K/V (fit.py). Starting from alpha = 0 everywhere (raw
reuse through the codes: KL_id on dev), alphas are chosen greedily from `alpha_grid` on the dev
split by measured KL, coarse to fine: at each level of `alpha_levels` the layers are cut into
that many contiguous groups, and per group and per K/V the grid value with the lowest dev KL is
kept if it lowers the KL. So the reuse path never does worse than raw reuse on dev.

Distillation (optional, `distill_steps` > 0): the reuse-path decoders are then trained through
frozen B on B's output KL on `calib` chunks, keeping the candidate best on dev (distill.py).

Layer choice: with no patches, B's mean token KL against its own prefill on the dev chunks is
KL_0. Each layer alone patched (affine aligner) gives KL_l; layers are ranked by KL gain per
extra byte (a patch cheaper than the reuse codes it replaces ranks first, by gain), then added
in that order while each lowers KL by a gain the dev split resolves, until KL <= eps or
`max_patches`. Resolved (metrics.resolved_gain): per dev chunk, the paired KL gain's mean is at
least `patch_min_gain` of the current KL and its one-sided 95 % Student-t lower bound is above
0, so a gain carried by one chunk does not count. The chosen layers' aligners then get their MLP
trained and KL on dev is measured once more; if the trained MLPs do worse on dev than the affine
aligners the selection admitted, the affine ones are kept. Why: with 3 dev chunks and a mean
rule, patches were admitted on gains that held-out text did not show (round 14: patch layer 9
lowered dev KL 0.0277 -> 0.0264, one chunk of 3 carrying it; over 8 dev chunks it was 0.0277 ->
0.0277, and over 24 held-out chunks it raised KL 0.0249 -> 0.0275; benchmarks/RESULTS.md).

Refresh (`head_tokens`, `tail_tokens`; `scd.refresh`): every dev KL above is measured with B
recomputing each prompt's first and last tokens itself, as B does where the artifact is used,
and so is distillation's training loss (distill.py). With a `refresh_grid`, the finished artifact is
scored on dev under every (head, tail) candidate, and keeps the cheapest (fewest tokens B
recomputes) whose dev KL is <= eps, else the one with the lowest dev KL; the alphas, distillation
and patches stay those fitted under (`head_tokens`, `tail_tokens`), which should be the grid's
largest. Every candidate's dev KL goes into the manifest (`refresh_dev`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean

import msgspec
import torch
from tqdm import tqdm

from ..engines.hf import Engine, decode_state
from ..errors import ConfigError
from ..eval.ppl import corpus_chunks
from .artifact import VERSION, Artifact, Manifest
from .capture import Captured, capture, check_pair, derotate, flat, project_kv
from .codes import encode_layer, reconstruct_layer
from .distill import check_calib, distill
from .fit import RANK_STEP, allocate_ranks, fit_aligner, fit_low_rank, fit_pca
from .metrics import kl, oracle_score, resolved_gain, score
from .refresh import coded_tokens, refresh
from .splits import DEFAULT_CORPUS, split_text


@dataclass(frozen=True)
class CalibConfig:
    """Calibration settings. `code_budget`: reuse-path code bytes as a fraction of raw FP16 KV
    bytes; `patch_rank`: r_H (elements of A's attention-input code per token at a patch layer);
    `dev_context`/`dev_continuation`: the PD protocol's chunk on the dev split (and on the
    `calib` split for distillation); `distill_steps` (0: off) AdamW steps of `distill_lr`, one
    chunk each, over `distill_chunks` training chunks (`distill_windows` "fixed"), or a fresh
    random window each step, dev-scored every `distill_chunks` steps ("random"; distill.py);
    `patch_min_gain`: the fraction of the current dev KL a patch must remove to join (module
    doc); `head_tokens` / `tail_tokens`: B recomputes each prompt's first / last this many
    tokens (`scd.refresh`), in every dev KL measured here and wherever the artifact is used;
    `refresh_grid`: (head, tail) candidates the artifact's refresh is chosen from at the end
    (module doc; empty: keep `head_tokens` / `tail_tokens`). `prompt_tokens`: the length of
    each calibration prompt the maps are fitted on, by default 1,024 (the dev chunks' and the
    PD protocol's length; keep it as long as the prompts served): maps fitted on shorter
    prompts never see the later positions, nor, in a model with sliding-window layers, a window
    cut short (on the Gemma-3 alias pair, window 512, fitting on 1,024-token prompts instead of
    512 lowered held-out KL from 0.0318 to 0.0218 on 8 chunks, paired -0.0100 +- 0.0042;
    RESULTS, session 28)."""

    corpus: str = DEFAULT_CORPUS
    prompts: int = 8
    prompt_tokens: int = 1024
    code_budget: float = 0.55
    patch_rank: int = 128
    max_patches: int = 6
    eps: float = 0.02
    patch_min_gain: float = 0.02
    aligner_width: int = 128
    aligner_steps: int = 100
    dev_chunks: int = 6
    dev_context: int = 1024
    dev_continuation: int = 128
    ridge: float = 1e-4
    alpha_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    alpha_levels: tuple[int, ...] = (1, 6)
    distill_steps: int = 0
    distill_chunks: int = 40
    distill_lr: float = 3e-5
    distill_windows: str = "fixed"
    head_tokens: int = 0
    tail_tokens: int = 0
    refresh_grid: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.prompt_tokens < 16 or self.dev_chunks < 1:
            raise ConfigError("need prompts >= 1, prompt_tokens >= 16, dev_chunks >= 1")
        if not 0 < self.code_budget <= 1 or self.eps < 0 or self.max_patches < 0:
            raise ConfigError("code_budget must be in (0, 1], eps and max_patches >= 0")
        if not 0 <= self.patch_min_gain < 1:
            raise ConfigError("patch_min_gain must be in [0, 1)")
        if self.patch_rank < RANK_STEP or self.patch_rank % RANK_STEP:
            raise ConfigError(f"patch_rank must be a positive multiple of {RANK_STEP}")
        if not 2 <= self.dev_continuation < self.dev_context:
            raise ConfigError("need 2 <= dev_continuation < dev_context")
        if not self.alpha_grid or not all(0 <= x <= 1 for x in self.alpha_grid):
            raise ConfigError("alpha_grid must be a non-empty list of values in [0, 1]")
        if not all(n >= 1 for n in self.alpha_levels):
            raise ConfigError("alpha_levels must be group counts >= 1")
        if self.distill_steps < 0 or self.distill_chunks < 1 or not self.distill_lr > 0:
            raise ConfigError("need distill_steps >= 0, distill_chunks >= 1, distill_lr > 0")
        pairs = [(self.head_tokens, self.tail_tokens), *self.refresh_grid]
        if any(len(p) != 2 or min(p) < 0 for p in pairs):
            raise ConfigError("refresh head and tail tokens must be pairs of counts >= 0")
        if any(h + t >= self.dev_context - self.dev_continuation - 1 for h, t in pairs):
            raise ConfigError("a refresh's head + tail tokens must leave dev prompt tokens to code")
        if self.distill_windows not in ("fixed", "random"):
            raise ConfigError(f"distill_windows must be 'fixed' or 'random', "
                              f"got {self.distill_windows!r}")  # fmt: skip


def _paired(engine_a: Engine, engine_b: Engine, cfg: CalibConfig) -> tuple[list, list]:
    """Per layer, stacked calibration samples (K, V, attention input) of A and of B."""
    n_layers = engine_a.fingerprint.n_layers
    text = split_text(cfg.corpus, "calib")
    chunks = corpus_chunks(engine_a, text, cfg.prompt_tokens, cfg.prompts)
    per: dict[str, list[list[torch.Tensor]]] = {
        k: [[] for _ in range(n_layers)] for k in ("ka", "va", "xa", "kb", "vb", "xb")
    }
    for ids in tqdm(chunks, desc="calibration prefills", leave=False):
        for eng, tag in ((engine_a, "a"), (engine_b, "b")):
            c = capture(eng, ids, input_layers=range(n_layers))
            for i, kv in enumerate(c.pre.layers):
                per["k" + tag][i].append(derotate(eng, i, kv))
                per["v" + tag][i].append(flat(kv.values))
                per["x" + tag][i].append(c.inputs[i])
    cat = {k: [torch.cat(v) for v in lists] for k, lists in per.items()}
    a = list(zip(cat["ka"], cat["va"], cat["xa"], strict=True))
    b = list(zip(cat["kb"], cat["vb"], cat["xb"], strict=True))
    return a, b


class _Dev:
    """The dev split's chunks: B's oracle scores, A's captures of the tokens it codes under the
    refresh in use (`use`), and KL of a candidate."""

    def __init__(self, engine_a: Engine, engine_b: Engine, cfg: CalibConfig) -> None:
        self.a, self.b = engine_a, engine_b
        split = cfg.dev_context - cfg.dev_continuation
        chunks = corpus_chunks(engine_a, split_text(cfg.corpus, "dev"), cfg.dev_context,
                               cfg.dev_chunks)  # fmt: skip
        self.prompts = [chunk[: split - 1] for chunk in chunks]
        self.feeds = [chunk[split - 1 :] for chunk in chunks]
        pairs = tqdm(list(zip(self.prompts, self.feeds, strict=True)), desc="dev oracle",
                     leave=False)  # fmt: skip
        self.oracles = [oracle_score(engine_b, p, f) for p, f in pairs]
        self.use(cfg.head_tokens, cfg.tail_tokens)

    def use(self, head: int, tail: int) -> None:
        """Score with B refreshing each prompt's first `head` and last `tail` tokens: A captures
        the tokens it codes."""
        self.head = head
        n_layers = self.a.fingerprint.n_layers
        self.caps: list[Captured] = [
            capture(self.a, p[: coded_tokens(p.numel(), tail)], input_layers=range(n_layers))
            for p in tqdm(self.prompts, desc=f"dev captures h{head} t{tail}", leave=False)
        ]

    def layers(self, art: Artifact, item: int, only: list[int] | None = None) -> list:
        """B's reconstructed layers of one dev chunk (or just the layers in `only`)."""
        cap = self.caps[item]
        todo = range(len(cap.pre.layers)) if only is None else only
        return [
            reconstruct_layer(
                art, self.b, encode_layer(art, self.a, i, cap.pre.layers[i], cap.inputs[i])
            )
            for i in todo
        ]

    def kls(
        self, art: Artifact, base: list[list] | None = None, swap: list[int] = ()
    ) -> list[float]:
        """KL per dev chunk; with `base` (per chunk, all layers) only `swap` layers are
        reconstructed again."""
        out = []
        scored = zip(self.caps, self.feeds, self.oracles, strict=True)
        for j, (cap, feed, oracle) in enumerate(scored):
            if base is None:
                layers = self.layers(art, j)
            else:
                layers = list(base[j])
                for i, kv in zip(swap, self.layers(art, j, list(swap)), strict=True):
                    layers[i] = kv
            prompt = self.prompts[j]
            layers = refresh(self.b, layers, cap.pre.n_tokens, prompt, self.head)
            got = score(self.b, decode_state(self.b, layers, prompt.numel()), feed)
            out.append(kl(got, oracle))
        return out

    def kl(self, art: Artifact, base: list[list] | None = None, swap: list[int] = ()) -> float:
        """Mean KL over dev chunks (`kls`)."""
        return fmean(self.kls(art, base, swap))


def calibrate(engine_a: Engine, engine_b: Engine, cfg: CalibConfig) -> Artifact:
    """Fit everything (module docstring); returns the artifact (save it with artifact.save)."""
    check_pair(engine_a, engine_b)
    if cfg.distill_steps:  # the distillation data exists: fail now, not after the fits
        check_calib(engine_a, cfg)
    fa, fb = engine_a.fingerprint, engine_b.fingerprint
    a, b = _paired(engine_a, engine_b, cfg)
    fits = [
        (fit_low_rank(a[i][0], b[i][0], cfg.ridge), fit_low_rank(a[i][1], b[i][1], cfg.ridge))
        for i in tqdm(range(fa.n_layers), desc="low-rank fits", leave=False)
    ]
    width = fb.n_kv_heads * fb.head_dim
    ranks = allocate_ranks(fits, int(cfg.code_budget * fa.n_layers * 2 * width))
    tensors: dict[str, torch.Tensor] = {}
    for i, (rk, rv) in enumerate(ranks):
        for kv, fit, r in (("k", fits[i][0], rk), ("v", fits[i][1], rv)):
            tensors.update({f"{i}.{kv}.{n}": t for n, t in fit.truncated(r, 0.0).items()})

    def bake(layers: list[int], j: int, alpha: float) -> dict[str, torch.Tensor]:
        """Decoder tensors of `layers`' K (j = 0) or V (j = 1) at `alpha`."""
        out = {}
        for i in layers:
            t = fits[i][j].truncated(ranks[i][j], alpha)
            out |= {f"{i}.{'kv'[j]}.{n}": t[n] for n in ("dec", "mu_b")}
        return out

    candidates = range(fa.n_layers) if cfg.max_patches else ()  # 0: the reuse path only
    for i in tqdm(candidates, desc="patch candidates", leave=False):
        mu, basis = fit_pca(a[i][2], cfg.patch_rank)
        al = fit_aligner((a[i][2] - mu) @ basis, b[i][2], width=cfg.aligner_width)
        tensors |= {f"{i}.h.mu": mu, f"{i}.h.basis": basis}
        tensors |= {f"{i}.al.{k}": v.detach() for k, v in al.state_dict().items()}
    manifest = Manifest(
        version=VERSION, producer=fa, consumer=fb, ranks=ranks, patch_layers=[],
        patch_rank=cfg.patch_rank, aligner_width=cfg.aligner_width, eps=cfg.eps, kl_dev=0.0,
        code_budget=cfg.code_budget, corpus=cfg.corpus, split="calib", prompts=cfg.prompts,
        prompt_tokens=cfg.prompt_tokens, head_tokens=cfg.head_tokens,
        tail_tokens=cfg.tail_tokens,
    )  # fmt: skip
    art = Artifact(manifest, tensors)
    dev = _Dev(engine_a, engine_b, cfg)
    alphas, kl_id = _choose_alphas(art, dev, cfg, bake)
    art.manifest = msgspec.structs.replace(art.manifest, alphas=alphas, kl_dev_identity=kl_id)
    if cfg.distill_steps:
        art = distill(engine_a, engine_b, art, cfg, dev.kl).artifact
    tensors = art.tensors
    chosen, kl_chosen = _select(art, dev, cfg)
    affine = {k: v for k, v in tensors.items() if k.startswith(tuple(f"{i}.al." for i in chosen))}
    for i in tqdm(chosen, desc="train aligners", leave=False):
        mu, basis = tensors[f"{i}.h.mu"], tensors[f"{i}.h.basis"]
        attn = engine_b.model.model.layers[i].self_attn
        proj = _Frozen(attn)
        al = fit_aligner((a[i][2] - mu) @ basis, b[i][2], proj, cfg.aligner_width,
                         cfg.aligner_steps)  # fmt: skip
        tensors |= {f"{i}.al.{k}": v.detach() for k, v in al.state_dict().items()}
    unused = [f"{i}.{p}." for i in range(fa.n_layers) if i not in chosen for p in ("h", "al")]
    tensors = {k: v for k, v in tensors.items() if not k.startswith(tuple(unused))}
    art = Artifact(_with(art.manifest, chosen, 0.0), tensors)
    kl_now = fmean(kl_chosen)
    if chosen:
        trained = dev.kl(art)
        if trained > kl_now:  # the trained MLPs do worse on dev than the aligners it admitted
            tqdm.write(f"trained aligners: dev KL {trained:.4f} > {kl_now:.4f}; kept affine")
            art = Artifact(art.manifest, tensors | affine)  # a fresh aligner cache
        else:
            kl_now = trained
    art.manifest = _with(art.manifest, chosen, kl_now)
    if cfg.refresh_grid:
        art.manifest = _choose_refresh(art, dev, cfg)
    return art


def _choose_refresh(art: Artifact, dev: _Dev, cfg: CalibConfig) -> Manifest:
    """The artifact's manifest with the refresh of `cfg.refresh_grid` chosen on dev (module
    docstring) and every candidate's dev KL recorded."""
    scored = []
    for head, tail in sorted(set(cfg.refresh_grid), key=lambda p: (sum(p), p)):
        dev.use(head, tail)
        scored.append((head, tail, dev.kl(art)))
        tqdm.write(f"refresh h{head} t{tail}: dev KL {scored[-1][2]:.4f}")
    within = [s for s in scored if s[2] <= cfg.eps]
    head, tail, kl_dev = within[0] if within else min(scored, key=lambda s: s[2])
    return msgspec.structs.replace(art.manifest, head_tokens=head, tail_tokens=tail,
                                   kl_dev=kl_dev, refresh_dev=scored)  # fmt: skip


class _Frozen(torch.nn.Module):
    """B's K/V projections of a layer (`capture.project_kv`), concatenated, weights frozen."""

    def __init__(self, attn: torch.nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(project_kv(self.attn, x), -1)


def _with(m: Manifest, patch_layers: list[int], kl_dev: float) -> Manifest:
    return msgspec.structs.replace(m, patch_layers=sorted(patch_layers), kl_dev=kl_dev)


def _select(art: Artifact, dev: _Dev, cfg: CalibConfig) -> tuple[list[int], list[float]]:
    """Patch layers by KL gain per byte on dev (module docstring); returns (layers, KL per dev
    chunk with them)."""
    m = art.manifest
    base = [dev.layers(art, j) for j in range(len(dev.caps))]
    kl0 = dev.kls(art, base)
    if cfg.max_patches == 0 or fmean(kl0) <= cfg.eps:
        return [], kl0
    candidates = []
    all_patch = _with(m, list(range(len(m.ranks))), 0.0)
    trial = Artifact(all_patch, art.tensors)
    for i in tqdm(range(len(m.ranks)), desc="patch gains", leave=False):
        gain = fmean(kl0) - dev.kl(trial, base, [i])
        extra = 2 * (m.patch_rank - sum(m.ranks[i]))
        key = -gain / extra if extra > 0 else -1e9 - gain
        candidates.append((key, i, gain))
    chosen: list[int] = []
    best = kl0
    for _, i, gain in sorted(candidates):
        if (len(chosen) >= cfg.max_patches or fmean(best) <= cfg.eps
                or gain <= cfg.patch_min_gain * fmean(kl0)):  # fmt: skip
            break
        trial = Artifact(_with(m, [*chosen, i], 0.0), art.tensors)
        got = dev.kls(trial, base, [*chosen, i])
        if resolved_gain(best, got, cfg.patch_min_gain):
            chosen, best = [*chosen, i], got
    return chosen, best


def _choose_alphas(
    art: Artifact, dev: _Dev, cfg: CalibConfig, bake: Callable[[list[int], int, float], dict]
) -> tuple[list[tuple[float, float]], float]:
    """Decoder shrinkage by dev KL (module docstring). `art` holds every decoder at alpha 0 and
    no patches; its tensors are updated to the chosen alphas. Returns (alphas, KL_id)."""
    n = len(art.manifest.ranks)
    alphas = [[0.0, 0.0] for _ in range(n)]
    base = [dev.layers(art, c) for c in range(len(dev.caps))]
    kl_id = best = dev.kl(art, base)
    levels = [[list(range(n * g // k, n * (g + 1) // k)) for g in range(min(k, n))]
              for k in cfg.alpha_levels]  # fmt: skip
    bar = tqdm(total=sum(2 * len(gs) * len(cfg.alpha_grid) for gs in levels), desc="alphas",
               leave=False)  # fmt: skip
    for groups in levels:
        for g in groups:
            for j in (0, 1):
                tried = {}
                for x in cfg.alpha_grid:
                    bar.update()
                    if any(alphas[i][j] != x for i in g):
                        tried[x] = dev.kl(Artifact(art.manifest, art.tensors | bake(g, j, x)),
                                          base, g)  # fmt: skip
                x = min(tried, key=tried.get, default=None)
                if x is None or tried[x] >= best:
                    continue
                best = tried[x]
                art.tensors |= bake(g, j, x)
                for i in g:
                    alphas[i][j] = x
                for c in range(len(base)):
                    for i, kv in zip(g, dev.layers(art, c, g), strict=True):
                        base[c][i] = kv
        tqdm.write(f"alphas over {len(groups)} groups: dev KL {best:.4f} (identity {kl_id:.4f})")
    bar.close()
    return [(k, v) for k, v in alphas], kl_id
