"""Encode (model A's side) and reconstruct (model B's side), one layer at a time.

A layer's code is either reuse-path codes of its keys and values ([n, r_K], [n, r_V], from A's
de-rotated keys and values) or, at a patch layer, a code of A's attention input ([n, r_H]), for
the n tokens the layer caches (all of the prompt's, or a sliding-window layer's last ones).
Codes travel as FP16 (2 bytes an element), or quantized by the project's asym-group quantizer
(`quantize_codes`). B decodes keys/values with its decoders and re-applies its own RoPE, or at a
patch layer maps the code through the aligner to its attention input and runs its own K/V
projections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..config import QuantConfig
from ..engines.hf import DecodeState, Engine, decode_state
from ..kv import LayerKV
from ..quant import dequantize, quantize
from ..tiers import STORED_TIERS, Tier
from . import rope
from .artifact import Artifact
from .capture import capture, derotate, flat, project_kv, unflat

#: Group size of quantized codes along the code dimension (a width it does not divide takes the
#: largest power of two that does, `QuantConfig.group_for`). 64 rather than 16: INT4 codes at
#: 0.28 of raw FP16 bytes instead of 0.375, for the same KL at 0.5 (`scd10` in RESULTS.md).
CODE_GROUP = 64


@dataclass
class LayerCode:
    """One layer's codes for n tokens at `positions`; `nbytes` is what the wire would carry for
    the code elements and quantization parameters (FP16: 2 bytes an element)."""

    layer: int
    positions: torch.Tensor
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    h: torch.Tensor | None = None
    nbytes: int = 0


def encode_layer(
    art: Artifact, engine_a: Engine, layer: int, kv: LayerKV, attn_input: torch.Tensor | None
) -> LayerCode:
    """A's codes of one layer: from its cached K/V, or at a patch layer its attention input
    `attn_input` [n, hidden] of the prefill's n tokens (only the rows of the tokens the layer
    caches, at `kv.positions`, are coded: a sliding-window layer's last ones)."""
    t = art.tensors
    if layer in art.manifest.patch_layers:
        if attn_input is None:
            raise ValueError(f"layer {layer} is a patch layer: its attention input is needed")
        x = attn_input[kv.positions].float()
        h = ((x - t[f"{layer}.h.mu"]) @ t[f"{layer}.h.basis"]).half()
        return LayerCode(layer, kv.positions, h=h, nbytes=2 * h.numel())
    k = _enc(t, f"{layer}.k", derotate(engine_a, layer, kv))
    v = _enc(t, f"{layer}.v", flat(kv.values))
    return LayerCode(layer, kv.positions, k=k, v=v, nbytes=2 * (k.numel() + v.numel()))


def _enc(t: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return ((x - t[f"{name}.mu_a"]) @ t[f"{name}.enc"]).half()


def encode(art: Artifact, engine_a: Engine, ids: torch.Tensor) -> list[LayerCode]:
    """A's prefill of 1-D `ids` -> per-layer codes, each produced as soon as its layer is done."""
    codes: list[LayerCode] = []
    capture(
        engine_a,
        ids,
        input_layers=art.manifest.patch_layers,
        on_layer=lambda i, kv, x, _w: codes.append(encode_layer(art, engine_a, i, kv, x)),
    )
    return codes


def reuse_flat(t: Mapping[str, torch.Tensor], code: LayerCode) -> tuple[torch.Tensor, torch.Tensor]:
    """B's keys (without RoPE) and values [n, H*D] float32 from a reuse-path code and the
    decoders `t[f"{i}.k.dec"]`, `t[f"{i}.k.mu_b"]` (and `.v.`): code @ dec + mu_b. Plain torch
    ops, so gradients reach the decoders when they require them (`distill.py`)."""
    i = code.layer
    keys = code.k.float() @ t[f"{i}.k.dec"] + t[f"{i}.k.mu_b"]
    values = code.v.float() @ t[f"{i}.v.dec"] + t[f"{i}.v.mu_b"]
    return keys, values


def to_layer(
    engine_b: Engine, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
) -> LayerKV:
    """B's cached layer `layer` from keys without RoPE and values [n, H*D]: [H, n, D], keys
    rotated with B's RoPE (that layer's) at `positions`, both in B's KV dtype (differentiable)."""
    heads = engine_b.fingerprint.n_kv_heads
    cos, sin = rope.rotary(engine_b.model, layer, positions)
    k = rope.apply(unflat(keys, heads), cos, sin)
    dt = engine_b.kv_dtype
    return LayerKV(k.to(dt), unflat(values, heads).to(dt), positions)


@torch.inference_mode()
def reconstruct_layer(art: Artifact, engine_b: Engine, code: LayerCode) -> LayerKV:
    """B's K/V of one layer from its codes, in B's KV dtype, keys rotated with B's RoPE."""
    i = code.layer
    if code.h is not None:
        x = art.aligner(i)(code.h.float()).to(engine_b.compute_dtype)  # B may compute in bf16
        keys, values = project_kv(engine_b.model.model.layers[i].self_attn, x)
    else:
        keys, values = reuse_flat(art.tensors, code)
    return to_layer(engine_b, i, code.positions, keys, values)


def reconstruct(
    art: Artifact, engine_b: Engine, codes: list[LayerCode], n_tokens: int
) -> DecodeState:
    """B's decode cache from all layers' codes (see `reconstruct_layer`)."""
    layers = [reconstruct_layer(art, engine_b, c) for c in codes]
    return decode_state(engine_b, layers, n_tokens)


def quantize_codes(codes: list[LayerCode], tiers: torch.Tensor) -> list[LayerCode]:
    """The plain reference of codes on the SCD wire: `tiers` [n] (uint8 Tier codes, one per
    prompt position, as `budget.code_tiers` makes) passed through the project's asym-group
    quantizer (groups of CODE_GROUP along the code dimension, FP16 scale + minimum per group),
    DROP rows left out (a layer holding fewer tokens, a sliding window, takes the tiers of its
    positions). Returns dequantized float32 codes whose `nbytes` counts codes and parameters."""
    qc = QuantConfig(group_size=CODE_GROUP, rotate=False)
    out = []
    for c in codes:
        t = tiers[c.positions]
        kept = t != int(Tier.DROP)
        t = t[kept]
        new = LayerCode(c.layer, c.positions[kept])
        for name in ("k", "v", "h"):
            x = getattr(c, name)
            if x is None:
                continue
            x = x[kept].float()
            y = torch.empty_like(x)
            for tier in STORED_TIERS:
                rows = t == int(tier)
                if not rows.any():
                    continue
                if tier == Tier.FP16:
                    y[rows] = x[rows].half().float()
                    new.nbytes += 2 * x[rows].numel()
                    continue
                part = x[rows][:, None, :]
                q = quantize(part, tier, qc)
                y[rows] = dequantize(q, tier, qc, part.shape[-1])[:, 0]
                new.nbytes += q.codes.numel() + 2 * (q.scale.numel() + q.minimum.numel())
            setattr(new, name, y)
        out.append(new)
    return out
