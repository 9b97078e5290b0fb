"""The model pair for SCD: a real full fine-tune of a base model (all weights, AdamW) on the
corpus' `finetune` split, saved as a plain HF model directory and cached by a digest of its
recipe, so it runs once.

Resumable: every `save_every` steps the weights (safetensors, via `save_pretrained`), AdamW's
moments (safetensors) and the step count (JSON) are written to `<out>.partial/`; a rerun of
the same recipe continues from there. The batch of step s depends only on (seed, s), so a
resumed run trains on exactly the batches an uninterrupted one would. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..assets import cache_dir, model_dir
from ..errors import AssetError, ConfigError
from .splits import DEFAULT_CORPUS, split_text


@dataclass(frozen=True)
class Recipe:
    """A fine-tune: base model, corpus, optimizer steps, peak learning rate `lr` (AdamW; linear
    warmup over `warmup` steps, then `decay` "cosine" to 0 at `steps` or "constant"), gradient
    norm clipped to `clip` (0: no clipping), seed, and batches of `batch` x `seq_len` tokens.
    `train_embeddings` False freezes the token embeddings (and an output head tied to them):
    with batches this small, AdamW keeps moving the rows of tokens seen once for many steps
    after their gradient is gone, which damages the softmax of every other token.
    `attn_lr_scale` multiplies the learning rate of the attention projections (parameters under
    a `self_attn` module: W_q, W_k, W_v, W_o), the weights that make the KV cache: a fine-tune
    that moves them further than the rest gives a pair whose caches differ more.
    `seq_len` 512 by default: fine-tuned on 128-token windows, B's own cache of a long prompt
    was barely better for B than A's (raw reuse +0.18 % PPL on 896-token prefixes), while
    512-token windows gave +3.4 % after 96 steps (benchmarks/results/scd-recipes.json).
    `rope_theta` (None: the base model's) trains B under another RoPE base frequency, as
    MistralLite was made from Mistral-7B: every rope_theta of the base's config is replaced
    before training, and B's saved config keeps it. SCD and the raw baseline re-rotate A's keys
    with B's settings, so what the pair differs in is the weights that adapted to the new base.
    `rope_layers` (None: every layer) replaces only one layer type's base, for models with one
    RoPE per layer type (Gemma-3: "full_attention" or "sliding_attention")."""

    base: str
    corpus: str = DEFAULT_CORPUS
    steps: int = 96
    lr: float = 2e-4
    seed: int = 0
    batch: int = 2
    seq_len: int = 512
    warmup: int = 3
    weight_decay: float = 0.0
    clip: float = 1.0
    decay: str = "cosine"
    train_embeddings: bool = False
    attn_lr_scale: float = 1.0
    rope_theta: float | None = None
    rope_layers: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2 or self.warmup < 0:
            raise ConfigError("steps and batch must be >= 1, seq_len >= 2, warmup >= 0")
        if not 0 < self.lr < 1 or self.weight_decay < 0 or self.clip < 0:
            raise ConfigError(f"lr must be in (0, 1), weight_decay and clip >= 0, got {self.lr}")
        if self.decay not in ("cosine", "constant"):
            raise ConfigError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")
        if not isinstance(self.train_embeddings, bool):
            raise ConfigError("train_embeddings must be a bool")
        if not 0 < self.attn_lr_scale * self.lr < 1:
            raise ConfigError(f"attn_lr_scale x lr must be in (0, 1), got {self.attn_lr_scale}")
        if self.rope_theta is not None and not self.rope_theta > 1:
            raise ConfigError(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.rope_layers is not None and self.rope_theta is None:
            raise ConfigError("rope_layers needs rope_theta")

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based step `step`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.lr
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1 + math.cos(math.pi * done))

    def digest(self) -> str:
        """12 hex digits of the recipe (the cache key). A field added after the cache existed
        is left out while it has its default, so older recipes keep their digests."""
        fields = asdict(self)
        for name in ("rope_theta", "rope_layers"):
            if fields[name] is None:
                del fields[name]
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: Built-in aliases of fine-tuned models (built on first use, then cached).
ALIASES = {
    # trained under RoPE base 3e3 (SmolLM2's is 1e5), the paper's kind of pair: raw reuse +10.9 %
    # [5.8, 16.7] on 24 held-out chunks; +5.41 % under 1e4, +3.83 % at 1e5 (RESULTS, SCD round 14)
    "smollm2-135m-wiki": Recipe(base="smollm2-135m", rope_theta=3e3),
    # Gemma-3 already knows Spanish: at lr 2e-4 its fine-tune doubled its PPL on the domain.
    # Its 3 full-attention layers trained under RoPE base 1e3 (its own 1e6): raw reuse +31.8 %
    # [26.5, 36.9] on 24 held-out chunks, B 21.85 vs A 22.85 PPL; the sliding layers' base
    # changed too (3e3, 5e3) damaged B (PPL 171, 61); the old recipe (48 steps, lr 2e-5, no
    # RoPE change) gave +0.95 %, under 1e4 +1.87 % (RESULTS, SCD round 16)
    "gemma3-270m-wiki": Recipe(
        base="gemma3-270m", steps=64, lr=3e-5, rope_theta=1e3, rope_layers="full_attention"
    ),
}


def alias_dir(name: str) -> Path:
    """Directory of a built-in fine-tuned alias, fine-tuning it first if not cached."""
    return finetune(ALIASES[name])


def default_out(recipe: Recipe) -> Path:
    """Where a recipe's model is cached."""
    base = Path(recipe.base).name
    return cache_dir() / "models" / f"ft-{base}-{recipe.digest()}"


def finetune(recipe: Recipe, out: Path | None = None, save_every: int = 6) -> Path:
    """Fine-tune (or resume, or return the cached result of) `recipe`; returns the model
    directory. `out/.complete` records the recipe and the digest of the text trained on; an
    `out` holding another recipe, or trained on text the corpus no longer holds (an edited
    file), is an AssetError rather than being overwritten or silently reused."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out) if out is not None else default_out(recipe)
    text = split_text(recipe.corpus, "finetune")
    seen = text_digest(text)
    done = out / ".complete"
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("digest") != recipe.digest():
            raise AssetError(f"{out} holds another fine-tune recipe; choose another --out")
        _check_text(out, record, seen, recipe.corpus)
        return out
    if out.exists():
        raise AssetError(f"{out} exists but is not a finished fine-tune; remove it")
    partial = out.with_name(out.name + ".partial")
    src = model_dir(recipe.base)
    state = _read_progress(partial, recipe, seen)
    load_from = partial if state else src
    tok = AutoTokenizer.from_pretrained(src)
    config = AutoConfig.from_pretrained(load_from)
    if recipe.rope_theta is not None:
        _set_rope_theta(config, recipe.rope_theta, recipe.rope_layers)
    model = AutoModelForCausalLM.from_pretrained(load_from, config=config, dtype=torch.float32)
    model.train()
    if not recipe.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    if ids.numel() <= recipe.seq_len + 1:
        raise AssetError(f"the corpus' finetune split has only {ids.numel()} tokens")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    attn = [p for n, p in named if ".self_attn." in n]
    rest = [p for n, p in named if ".self_attn." not in n]
    params = attn + rest  # the order the optimizer checkpoint indexes
    groups = [{"params": attn, "scale": recipe.attn_lr_scale}, {"params": rest, "scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    start = 0
    if state:
        start = state["step"]
        _load_optimizer(opt, params, partial / "optimizer.safetensors", start)
    bar = tqdm(range(start, recipe.steps), desc=f"finetune {out.name}", initial=start,
               total=recipe.steps)  # fmt: skip
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step) * group["scale"]
        batch = _batch(ids, recipe, step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.clip)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % save_every == 0 and step + 1 < recipe.steps:
            _checkpoint(model, opt, params, partial, recipe, step + 1, seen)
    model.eval()
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tok.save_pretrained(staging)
    (staging / ".complete").write_text(
        json.dumps(
            {"digest": recipe.digest(), "text_digest": seen, "recipe": asdict(recipe)}, indent=1
        )
    )
    staging.rename(out)
    shutil.rmtree(partial, ignore_errors=True)
    return out


def text_digest(text: str) -> str:
    """16 hex digits of the text a fine-tune trains on (its corpus' `finetune` split)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _check_text(where: Path, record: dict, seen: str, corpus: str) -> None:
    """AssetError if `record` (a finished model's `.complete` or a checkpoint's progress)
    names other training text than `seen`: the corpus file was edited, or its split moved,
    after `where` was trained. The recipe digest names the corpus by path or alias only.
    Records written before text digests existed are not checked."""
    trained = record.get("text_digest")
    if trained is not None and trained != seen:
        raise AssetError(f"{where} was fine-tuned on other text than the corpus {corpus!r} "
                         f"holds now (finetune split digest {trained}, now {seen}); remove it "
                         "or choose another --out")  # fmt: skip


def _set_rope_theta(config, theta: float, layer_type: str | None = None) -> None:
    """Replace every RoPE base frequency of an HF config (one dict, or one per layer type as
    in Gemma-3) by `theta`, or only `layer_type`'s; ConfigError if the model has none (or no
    RoPE of that layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None:
        if not isinstance(params.get(layer_type), dict):
            types = [k for k, v in params.items() if isinstance(v, dict)]
            raise ConfigError(f"{config.model_type}: no RoPE of layer type {layer_type!r} "
                              f"(it has {types or 'one RoPE for all layers'})")  # fmt: skip
        params = {layer_type: params[layer_type]}
    nested = [d for d in params.values() if isinstance(d, dict)]
    dicts = [params] if "rope_theta" in params else nested
    if not any("rope_theta" in d for d in dicts):
        raise ConfigError(f"{config.model_type}: no rope_theta in the config to change")
    for d in dicts:
        if "rope_theta" in d:
            d["rope_theta"] = theta


def _batch(ids: torch.Tensor, recipe: Recipe, step: int) -> torch.Tensor:
    """Step `step`'s batch: `batch` random windows of `seq_len` tokens, a function of
    (seed, step) only."""
    g = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - recipe.seq_len, (recipe.batch,), generator=g)
    return torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])


def _read_progress(partial: Path, recipe: Recipe, text: str) -> dict | None:
    """The checkpoint's progress (None: no checkpoint); AssetError if it belongs to another
    recipe or other training text (`text`: its digest)."""
    f = partial / "progress.json"
    if not f.is_file():
        return None
    state = json.loads(f.read_text())
    if state.get("digest") != recipe.digest():
        raise AssetError(f"{partial} holds a checkpoint of another recipe; remove it")
    _check_text(partial, state, text, recipe.corpus)
    return state


def _checkpoint(model, opt, params, partial: Path, recipe: Recipe, step: int, text: str) -> None:
    """Weights, AdamW moments and the step, written so a crash mid-write loses nothing."""
    tmp = partial.with_name(partial.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    moments = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            moments[f"{i}.exp_avg"] = st["exp_avg"].contiguous()
            moments[f"{i}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
    save_file(moments, str(tmp / "optimizer.safetensors"))
    progress = {"digest": recipe.digest(), "text_digest": text, "step": step}
    (tmp / "progress.json").write_text(json.dumps(progress))
    shutil.rmtree(partial, ignore_errors=True)
    tmp.rename(partial)


def _load_optimizer(opt, params, path: Path, step: int) -> None:
    moments = load_file(str(path))
    for i, p in enumerate(params):
        if f"{i}.exp_avg" in moments:
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": moments[f"{i}.exp_avg"],
                "exp_avg_sq": moments[f"{i}.exp_avg_sq"],
            }
