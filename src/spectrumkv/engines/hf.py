"""HF transformers engine: prefill with KV + window-query capture, and decoding from a cache
rebuilt out of (possibly partial) per-layer KV with original positions.

KV dtype: serving engines keep their KV cache in 16 bits. When the model computes in float32 (the
CPU default here), the prompt's cache is rounded to `kv_dtype` right after prefill, in the
reference path and the transfer path alike, so "FP16" on the wire is bit exact.

Decoding from a cache with dropped tokens: each step passes explicit position ids (original
positions) and explicit attention masks built from the real positions of every cache slot, per
layer type (full / sliding window), so nothing depends on slot indices matching positions.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ..assets import model_dir
from ..errors import AssetError, ConfigError, IncompatiblePayloadError
from ..importance import WindowQueries
from ..kv import LayerKV, first_slot
from ..wire import KV_DTYPES, Fingerprint
from . import flash, step_prefill
from .llama_step import LlamaStep
from .packed import pack_linears
from .segments import segments
from .step_prefill import LayerHook

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Engine:
    """A loaded model, its tokenizer, and what a payload must match."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    fingerprint: Fingerprint

    @property
    def kv_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.fingerprint.kv_dtype]

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (its weights'; `load`'s `dtype`)."""
        return next(self.model.parameters()).dtype

    def layer_window(self, layer: int) -> int:
        fp = self.fingerprint
        return fp.sliding_window if fp.is_sliding(layer) else 0


@dataclass
class Prefilled:
    """What the prefill worker holds after computing a context's cache."""

    n_tokens: int
    layers: list[LayerKV]
    window: list[WindowQueries]
    prefill_s: float


def load(
    name: str, kv_dtype: str = "float16", threads: int | None = None, dtype: str = "float32"
) -> Engine:
    """Load a model by alias, local directory or hub id, in eval mode, computing in `dtype`
    (COMPUTE_DTYPES: "float32", the default, or "bfloat16": weights and activations in bf16,
    as vLLM runs on CPU, with the linear layers' weights prepacked: engines.packed; the KV
    stays in `kv_dtype`). The fingerprint digests layer 0's key projection as saved on disk,
    so it does not depend on `dtype`: a bf16 decode worker accepts an fp32 prefill's payloads.
    `threads`: torch threads (None or 0: torch's default)."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}")
    if threads is not None and threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 or None: torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
    src = model_dir(name)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=COMPUTE_DTYPES[dtype])
    except OSError as e:
        raise AssetError(f"could not load model {name!r}: {e}") from None
    model.eval()
    k0 = _saved_k0(src) if Path(src).is_dir() else None
    if k0 is None:
        if dtype != "float32":
            raise AssetError(f"{name!r}: no safetensors to fingerprint a {dtype} model from")
        k0 = _attn(model, 0).k_proj.weight
    if dtype == "bfloat16":
        pack_linears(model)  # weights packed once for oneDNN (see engines.packed)
    return Engine(name, model, tok, config_fingerprint(model.config, k0, kv_dtype))


def fingerprint(model: torch.nn.Module, kv_dtype: str = "float16") -> Fingerprint:
    """Shape, positional encoding and a digest of layer 0's key projection, of a model that
    computes in float32 (its weight is then the saved one). `load` digests the weight as saved
    on disk instead, whatever the compute dtype."""
    return config_fingerprint(model.config, _attn(model, 0).k_proj.weight, kv_dtype)


def dir_fingerprint(path: str | Path, kv_dtype: str) -> Fingerprint:
    """The fingerprint of a local HF model directory, without loading the model: its config and
    layer 0's key projection read from the safetensors files (for engines that load weights
    their own way, e.g. vLLM, which fuses the projections)."""
    path = Path(path)
    k0 = _saved_k0(path)
    if k0 is None:
        raise AssetError(f"no *{_K0_SUFFIX} tensor in the safetensors files of {path}")
    return config_fingerprint(AutoConfig.from_pretrained(path), k0, kv_dtype)


def _saved_k0(path: str | Path) -> torch.Tensor | None:
    """Layer 0's key projection weight as saved in a model directory's safetensors (None if
    there is none)."""
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            name = next((k for k in st.keys() if k.endswith(_K0_SUFFIX)), None)  # noqa: SIM118
            if name is not None:
                return st.get_tensor(name)
    return None


_K0_SUFFIX = "layers.0.self_attn.k_proj.weight"


def config_fingerprint(cfg, k0: torch.Tensor, kv_dtype: str) -> Fingerprint:
    """Fingerprint from a transformers config and layer 0's key projection weight."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
    cfg = cfg.get_text_config()
    sliding = sliding_layers(cfg)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 0)}
    k0 = k0.detach().float().contiguous()
    return Fingerprint(
        arch=cfg.model_type,
        n_layers=cfg.num_hidden_layers,
        n_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim,
        kv_dtype=kv_dtype,
        rope=repr(sorted(rope.items())),
        sliding_window=int(getattr(cfg, "sliding_window", 0) or 0) if sliding else 0,
        sliding_layers=sliding,
        weights_digest=xxhash.xxh3_64_hexdigest(k0.numpy().tobytes()),
    )


def sliding_layers(cfg) -> tuple[int, ...]:
    """The sliding-window layers of a transformers text config, as transformers' own caches
    see them: its `layer_types` where it has them (Gemma-3, Qwen2 with `use_sliding_window`),
    else every layer when it sets a `sliding_window` (Mistral-style: one window for all)."""
    types = getattr(cfg, "layer_types", None)
    if types is None:
        every = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
        types = [every] * cfg.num_hidden_layers
    return tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def _model_mask(fp: Fingerprint, masks: dict[str, torch.Tensor]) -> torch.Tensor | dict:
    """The attention_mask a model's forward takes: one mask when every layer is of one type
    (a Mistral-style model takes only a tensor), else one per layer type."""
    if not fp.sliding_layers:
        return masks["full_attention"]
    if len(fp.sliding_layers) == fp.n_layers:
        return masks["sliding_attention"]
    return masks


def _attn(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    return model.model.layers[layer].self_attn


@torch.inference_mode()
def prefill(
    engine: Engine,
    context_ids: torch.Tensor,
    window: int = 32,
    on_layer: Callable[[int, LayerKV, WindowQueries], None] | None = None,
) -> Prefilled:
    """Run the context (1-D token ids) through the model; return its per-layer KV (rounded to
    the KV dtype) and the post-RoPE queries of the last `window` tokens of every layer.

    `on_layer(i, kv, window_queries)` is called as soon as layer i is computed, while later
    layers are still running (layer-wise streaming hooks in here). Models `step_prefill`
    serves run through the hand-written Llama forward, the rest through the HF one."""
    model, fp = engine.model, engine.fingerprint
    n = int(context_ids.numel())
    if n == 0:
        raise ValueError("context must hold at least one token")
    if (step := step_prefill.step_for(engine)) is not None:
        return _step_prefill(engine, step, context_ids, window, on_layer)
    w = min(window, n)
    captured: list[list[WindowQueries] | None] = [None] * fp.n_layers
    hooks = _window_hooks(engine, [(n - w, n)], captured)
    cache = DynamicCache(config=model.config)
    layers: list[LayerKV] = []

    def layer_done(module, args, output) -> None:
        i = len(layers)
        layers.append(layer_kv(engine, cache, i, n))
        if on_layer is not None:
            on_layer(i, layers[i], captured[i][0])

    hooks += [layer.register_forward_hook(layer_done) for layer in model.model.layers]
    # bf16 models of head_dim 64 or 128 attend through engines.flash's kernel (segments of one span)
    attend = (
        segments(model, [(0, n)])
        if not fp.sliding_layers and flash.serves(model)
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    try:
        with attend:
            # only the KV is needed: skip the vocabulary projection of all but the last position
            model(
                input_ids=context_ids.view(1, -1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    finally:
        for h in hooks:
            h.remove()
    prefill_s = time.perf_counter() - t0
    return Prefilled(n, layers, [c[0] for c in captured if c is not None], prefill_s)


def _step_prefill(engine: Engine, step: LlamaStep, context_ids: torch.Tensor, window: int,
                  on_layer: LayerHook | None) -> Prefilled:  # fmt: skip
    """`prefill` through `step_prefill.run` (one context): a hook's exception propagates."""
    layers: list[LayerKV] = []
    queries: list[WindowQueries] = []

    def keep(i: int, kv: LayerKV, wq: WindowQueries) -> None:
        layers.append(kv)
        queries.append(wq)
        if on_layer is not None:
            on_layer(i, kv, wq)

    t0 = time.perf_counter()
    (error,) = step_prefill.run(engine, step, [context_ids.view(-1)], [keep], window)
    if error is not None:
        raise error
    return Prefilled(int(context_ids.numel()), layers, queries, time.perf_counter() - t0)


@torch.inference_mode()
def prefill_batch(
    engine: Engine,
    contexts: list[torch.Tensor],
    on_layer: list[LayerHook],
    window: int = 32,
) -> list[Exception | None]:
    """Prefill several contexts (1-D token ids each) in ONE forward: packed into one sequence,
    each attending only to itself (one causal SDPA per context: engines.segments) at its own
    positions 0..n-1, so each gets the KV and window queries `prefill` would give it alone, up
    to the float rounding of larger GEMMs. `on_layer[j](i, kv, window_queries)` is called once
    per layer for context j, as `prefill`'s hook. A hook that raises stops only its own
    context: its later layers are not reported and the exception is returned in its slot
    (None: every layer was reported); the forward stops early once every hook has raised. An
    error of the forward itself raises.

    Full-attention models only (ConfigError otherwise): a sliding-window layer would need a
    per-context window mask and keeps only the window's slots, which the packed cache's layout
    does not (Gemma-3 prefills one context per forward)."""
    model, fp = engine.model, engine.fingerprint
    if fp.sliding_layers:
        raise ConfigError(f"{engine.name}: batched prefill needs full attention in every layer")
    if len(on_layer) != len(contexts) or not contexts:
        raise ValueError(f"{len(contexts)} contexts and {len(on_layer)} hooks (need >= 1, equal)")
    sizes = [int(c.numel()) for c in contexts]
    if min(sizes) == 0:
        raise ValueError("every context must hold at least one token")
    if (step := step_prefill.step_for(engine)) is not None:
        return step_prefill.run(engine, step, [c.view(-1) for c in contexts], on_layer, window)
    ends = torch.tensor(sizes).cumsum(0).tolist()
    spans = [(e - n, e) for n, e in zip(sizes, ends, strict=True)]
    pos = torch.cat([torch.arange(n) for n in sizes])
    captured: list[list[WindowQueries] | None] = [None] * fp.n_layers
    hooks = _window_hooks(
        engine, [(e - min(window, n), e) for n, e in zip(sizes, ends, strict=True)], captured
    )
    cache = DynamicCache(config=model.config)
    errors: list[Exception | None] = [None] * len(contexts)
    done = [0]

    def layer_done(module, args, output) -> None:
        i = done[0]
        done[0] += 1
        # the whole packed layer rounded to the KV dtype once, then cut per context
        keys = cache.layers[i].keys[0].to(engine.kv_dtype)
        values = cache.layers[i].values[0].to(engine.kv_dtype)
        for j, (a, b) in enumerate(spans):
            if errors[j] is not None:
                continue
            kv = LayerKV(
                keys[:, a:b].contiguous(), values[:, a:b].contiguous(), torch.arange(b - a)
            )
            try:
                on_layer[j](i, kv, captured[i][j])
            except Exception as e:  # isolated: the other contexts go on
                errors[j] = e
        if all(e is not None for e in errors):
            raise _AllStopped

    hooks += [layer.register_forward_hook(layer_done) for layer in model.model.layers]
    try:
        with segments(model, spans):
            model(
                input_ids=torch.cat(contexts).view(1, -1),
                position_ids=pos.view(1, -1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    except _AllStopped:
        pass
    finally:
        for h in hooks:
            h.remove()
    return errors


class _AllStopped(Exception):
    """Raised inside `prefill_batch`'s forward once every context's hook has failed."""


def layer_kv(engine: Engine, cache: DynamicCache, i: int, n: int) -> LayerKV:
    """Layer i's cached slots, rounded to the KV dtype."""
    fp = engine.fingerprint
    keys, values = cache.layers[i].keys[0], cache.layers[i].values[0]
    first = first_slot(fp.is_sliding(i), fp.sliding_window, n)
    if keys.shape[1] != n - first:
        raise IncompatiblePayloadError(
            f"layer {i} cached {keys.shape[1]} slots, expected {n - first}: unsupported cache"
        )
    return LayerKV(keys.to(engine.kv_dtype), values.to(engine.kv_dtype), torch.arange(first, n))


def _window_hooks(engine: Engine, spans: list[tuple[int, int]], out: list) -> list:
    """Pre-hooks on every attention module that store in `out[layer]` one WindowQueries per
    span `(start, end)` of the (packed) sequence: the post-RoPE queries of its tokens, computed
    in one projection for all spans. Returns the hook handles (remove them after the forward)."""
    idx = torch.cat([torch.arange(a, b) for a, b in spans])
    sizes = [b - a for a, b in spans]
    head_dim = engine.fingerprint.head_dim

    def make(layer: int):
        attn = _attn(engine.model, layer)
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb

        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            q = module.q_proj(hidden[:, idx]).view(1, idx.numel(), -1, head_dim).transpose(1, 2)
            if hasattr(module, "q_norm"):
                q = module.q_norm(q)
            q, _ = rotary(q, q, cos[:, idx], sin[:, idx])
            scale, win = float(module.scaling), engine.layer_window(layer)
            out[layer] = [
                WindowQueries(p.float().contiguous(), scale, win) for p in q[0].split(sizes, 1)
            ]

        return attn.register_forward_pre_hook(hook, with_kwargs=True)

    return [make(i) for i in range(engine.fingerprint.n_layers)]


@dataclass
class DecodeState:
    """A decode-side cache and the original positions of its slots, per layer type."""

    cache: DynamicCache
    full_positions: torch.Tensor
    sliding_positions: torch.Tensor
    next_position: int


def decode_state(engine: Engine, layers: list[LayerKV], n_tokens: int) -> DecodeState:
    """Build a decode cache from per-layer KV (dropped tokens absent, original positions kept).

    All full-attention layers must hold the same positions (and all sliding layers the same)."""
    fp = engine.fingerprint
    if len(layers) != fp.n_layers:
        raise IncompatiblePayloadError(f"got {len(layers)} layers, model has {fp.n_layers}")
    cache = DynamicCache(config=engine.model.config)
    dtype = engine.compute_dtype
    full = sliding = None
    for i, kv in enumerate(layers):
        cache.layers[i].update(kv.keys[None].to(dtype), kv.values[None].to(dtype))
        ref = sliding if fp.is_sliding(i) else full
        if ref is not None and not torch.equal(ref, kv.positions):
            raise IncompatiblePayloadError(f"layer {i} holds positions unlike its layer type")
        if fp.is_sliding(i):
            sliding = kv.positions
        else:
            full = kv.positions
    empty = torch.empty(0, dtype=torch.long)
    return DecodeState(
        cache,
        full if full is not None else empty,
        sliding if sliding is not None else empty,
        n_tokens,
    )


def _mask(
    kpos: torch.Tensor,
    qpos: torch.Tensor,
    window: int,
    dtype: torch.dtype,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive 4-D mask: key slot k is visible to query q if it is causal, inside the sliding
    window (if any) and not `hidden` (a bool per key slot)."""
    visible = kpos[None, :] <= qpos[:, None]
    if window > 0:
        visible &= (qpos[:, None] - kpos[None, :]) < window
    if hidden is not None:
        visible &= ~hidden[None, :]
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def causal_masks(
    engine: Engine, pos: torch.Tensor, hidden: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per layer type ("full_attention", and "sliding_attention" where the model has such
    layers), the additive 4-D mask of a prefill of the tokens at 1-D `pos`, in the compute
    dtype; key slots marked `hidden` (bool per slot) are invisible to every query."""
    fp, dtype = engine.fingerprint, engine.compute_dtype
    masks = {"full_attention": _mask(pos, pos, 0, dtype, hidden)}
    if fp.sliding_layers:
        masks["sliding_attention"] = _mask(pos, pos, fp.sliding_window, dtype, hidden)
    return masks


@torch.inference_mode()
def forward_with_kv_transform(
    engine: Engine,
    ids: torch.Tensor,
    transform: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    hidden: torch.Tensor,
) -> torch.Tensor:
    """One full forward over 1-D `ids` in which every layer's K/V pass through
    `transform(layer, keys [H, n, D], values)` before attention, and key slots marked `hidden`
    are invisible to every query: the SpectrumKV paper's in-forward (fake) quantization protocol.
    Returns logits [n, vocab]."""
    fp = engine.fingerprint
    cache = DynamicCache(config=engine.model.config)
    for i, layer in enumerate(cache.layers):
        original = layer.update

        def update(k, v, *args, _i=i, _orig=original, **kwargs):
            k2, v2 = transform(_i, k[0], v[0])
            return _orig(k2[None], v2[None], *args, **kwargs)

        layer.update = update
    pos = torch.arange(ids.numel())
    masks = causal_masks(engine, pos, hidden)
    out = engine.model(
        input_ids=ids.view(1, -1),
        position_ids=pos.view(1, -1),
        attention_mask=_model_mask(fp, masks),
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[0].float()


@torch.inference_mode()
def step(
    engine: Engine, state: DecodeState, input_ids: torch.Tensor, logits_to_keep: int = 0
) -> torch.Tensor:
    """Feed 1-D `input_ids` at the next positions; return logits [t, vocab] (float32), or with
    `logits_to_keep` = k > 0 those of the last k positions only [k, vocab]. A caller that wants
    the cache, or the logits of a few positions, skips the vocabulary projection of the others:
    on Gemma-3's 262K vocabulary that projection of 256 tokens costs more than all its layers."""
    fp = engine.fingerprint
    t = int(input_ids.numel())
    qpos = torch.arange(state.next_position, state.next_position + t)
    dtype = engine.compute_dtype
    kfull = torch.cat([state.full_positions, qpos])
    masks = {"full_attention": _mask(kfull, qpos, 0, dtype)}
    if fp.sliding_layers:
        kslide = torch.cat([state.sliding_positions, qpos])
        masks["sliding_attention"] = _mask(kslide, qpos, fp.sliding_window, dtype)
        state.sliding_positions = kslide[-(fp.sliding_window - 1) :]
    out = engine.model(
        input_ids=input_ids.view(1, -1),
        position_ids=qpos.view(1, -1),
        attention_mask=_model_mask(fp, masks),
        past_key_values=state.cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    state.full_positions = kfull
    state.next_position += t
    return out.logits[0].float()


def generate(
    engine: Engine,
    state: DecodeState,
    first_input: int,
    max_new_tokens: int,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Greedy decoding: feed `first_input` (the prompt's last token), return new token ids;
    `on_token` is called with each token as soon as it exists (for streaming)."""
    eos = engine.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    tok, out = first_input, []
    for _ in range(max_new_tokens):
        tok = int(step(engine, state, torch.tensor([tok])).argmax(-1)[-1])
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if tok in eos_ids:
            break
    return out


def chat_ids(engine: Engine, prompt: str) -> torch.Tensor:
    """Token ids of `prompt` wrapped in the model's chat template (plain text if it has none)."""
    tok = engine.tokenizer
    if getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    return ids.view(-1)
