"""Prefill with SCD's captures: the engine's own prefill (`engines.hf.prefill`, K/V rounded to
the KV dtype as a serving cache is) and, for the layers asked for, the attention input, i.e. the
normalized hidden state that W_k / W_v consume, taken by a forward pre-hook on each attention
module while that prefill runs. `derotate` / `flat` turn a cached layer into the [n, H*D]
samples the fits use (keys without RoPE); `project_kv` is a layer's own K/V projection of an
attention input (what a patch layer runs on B's side).

Sliding-window layers (Gemma-3) hold only the window's last tokens, as the engine caches them;
their codes cover those tokens and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..engines.hf import Engine, Prefilled, prefill
from ..errors import ConfigError, IncompatiblePayloadError
from ..importance import WindowQueries
from ..kv import LayerKV
from . import rope


@dataclass
class Captured:
    """One prompt's prefill: inputs: layer -> attention input [n, hidden] float32."""

    inputs: dict[int, torch.Tensor]
    pre: Prefilled


def check_supported(engine: Engine) -> None:
    """IncompatiblePayloadError for models SCD does not handle here: it needs a model-level
    rotary embedding module (`rope.rotary`) and attention modules with k_proj / v_proj and, if
    any, a per-head k_norm (`project_kv`)."""
    if not hasattr(engine.model.model, "rotary_emb"):
        raise IncompatiblePayloadError(
            f"{engine.name}: SCD supports decoder models with a model-level rotary embedding"
        )


def check_pair(engine_a: Engine, engine_b: Engine) -> None:
    """Both models supported (`check_supported`) and caching the same rows: ConfigError unless
    they share layers, KV heads, head_dim, which layers slide and the window."""
    for e in (engine_a, engine_b):
        check_supported(e)
    fa, fb = engine_a.fingerprint, engine_b.fingerprint
    shape = ("n_layers", "n_kv_heads", "head_dim", "sliding_layers", "sliding_window")
    if any(getattr(fa, f) != getattr(fb, f) for f in shape):
        raise ConfigError(
            "producer and consumer must share layers, KV heads, head_dim and sliding-window "
            f"layout: {engine_a.name} vs {engine_b.name}"
        )


def flat(kv: torch.Tensor) -> torch.Tensor:
    """[H, n, D] -> [n, H*D] float32."""
    return kv.float().transpose(0, 1).reshape(kv.shape[1], -1)


def unflat(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[n, H*D] -> [H, n, D]."""
    return x.view(x.shape[0], heads, -1).transpose(0, 1)


def derotate(engine: Engine, i: int, layer: LayerKV) -> torch.Tensor:
    """Cached layer `i`'s keys without RoPE, [n, H*D] float32 (the engine's own settings)."""
    cos, sin = rope.rotary(engine.model, i, layer.positions)
    return flat(rope.remove(layer.keys.float(), cos, sin))


def project_kv(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention module's keys (before RoPE, after its per-head key norm where it has one,
    as Gemma-3's) and values, [n, H*D] float32, of attention
    inputs `x` [n, hidden]. The module's weights are used frozen: gradients reach `x` only."""

    def run(module: torch.nn.Module, inp: torch.Tensor) -> torch.Tensor:
        weights = {n: p.detach() for n, p in module.named_parameters()}
        return functional_call(module, weights, (inp,))

    keys, values = run(attn.k_proj, x), run(attn.v_proj, x)
    norm = getattr(attn, "k_norm", None)
    if norm is not None:
        keys = run(norm, keys.view(keys.shape[0], -1, attn.head_dim)).flatten(1)
    return keys.float(), values.float()


def capture(
    engine: Engine,
    ids: torch.Tensor,
    input_layers: Iterable[int] = (),
    on_layer: Callable[[int, LayerKV, torch.Tensor | None, WindowQueries], None] | None = None,
) -> Captured:
    """Prefill 1-D `ids`, capturing the attention inputs of `input_layers`.
    `on_layer(i, kv, attention_input or None, window_queries)` runs as each layer completes."""
    check_supported(engine)
    wanted = set(input_layers)
    inputs: dict[int, torch.Tensor] = {}
    layers = engine.model.model.layers

    def pre_hook(i):
        def hook(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            inputs[i] = hidden[0].detach().float().clone()

        return hook

    hooks = [
        layers[i].self_attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
        for i in sorted(wanted)
    ]

    def layer_done(i, kv, window):
        if on_layer is not None:
            on_layer(i, kv, inputs.get(i), window)

    try:
        pre = prefill(engine, ids, on_layer=layer_done)
    finally:
        for h in hooks:
            h.remove()
    return Captured(inputs, pre)
