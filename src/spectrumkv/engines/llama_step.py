"""A hand-written decode step for Llama-family models: the HF model's own weights and modules,
far fewer small torch ops than its generic forward.

One token per row, B rows: a decode step's requests, or a prefill's tokens (engines.step_prefill,
whose `attend` keeps each prompt causal to itself). The HF forward of a decoder layer spends
most of its non-linear time in dispatch: ~50 tiny ops and ~10 Python module calls per layer
(view/transpose of q, k and v apart, RoPE applied to q and k apart with `rotate_half` = two
slices, a negation and a cat, attention-interface lookup, output reshape/contiguous).
`LlamaStep` runs the same arithmetic as plain functions on [B, features] rows, ~14 calls per
layer:

- residual add + RMSNorm in one call (`rowops.add_rmsnorm`: LlamaRMSNorm's float32 statistics,
  weight times the input-dtype result; the residual stream is updated in place);
- q, k, v through the layer's own projection modules (packed bf16 or float32 `nn.Linear`), then
  RoPE of q and k in one call into one [B, Hq + Hkv, D] buffer (`rowops.rope`:
  `x * cos + roll(x, D/2) * sin_signed`, sin_signed = -sin on the first half, the same products
  and sum as HF's `x * cos + rotate_half(x) * sin` since a sign flip is exact);
- attention through the caller's `attend(layer, q, k, v, scaling)` (the paged route);
- o-proj, add + RMSNorm, SiLU(gate) * up (torch, in place), down, add + next layer's RMSNorm
  (or the final norm), LM head.

With `compiled=False` (or without the extension) the row ops are their torch references, which
are HF's ops in HF's dtype and order: logits bit-identical to the generic HF forward. The
compiled row ops (the default when built) sum the RMSNorm's squares in another order: float32
logits agree within rounding, tokens identical (tests/test_runner_fast.py, float32 and bf16).
`build(model)` returns None for anything it does not cover (other architectures, dynamic or long
RoPE, pretraining_tp > 1, a non-SiLU MLP): the runner then keeps the HF forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import rowops

# attend(layer index, q [B, Hq, D], k [B, Hkv, D], v [B, Hkv, D], scaling) -> [B, Hq, D], q's dtype
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_STATIC_ROPE = ("default", "linear", "llama3")  # inv_freq fixed at init


class LlamaStep:
    """The decode step of a `LlamaForCausalLM` (see module doc). Holds references to the
    model's modules, no weight copies."""

    def __init__(self, model: nn.Module, compiled: bool = rowops.AVAILABLE) -> None:
        if compiled and not rowops.AVAILABLE:
            raise rowops.RowOpsError(
                "the compiled row ops (spectrumkv.engines._rowops) are not built"
            )
        self.compiled = compiled
        ops = (rowops.add_rmsnorm, rowops.rope) if compiled else (rowops.add_rmsnorm_ref,
                                                                 rowops.rope_ref)  # fmt: skip
        self.add_rmsnorm, self.rope_qk = ops
        cfg = model.config
        body = model.model
        self.embed, self.lm_head = body.embed_tokens, model.lm_head
        self.norm_w, self.eps = body.norm.weight, body.norm.variance_epsilon
        self.inv_freq = body.rotary_emb.inv_freq.float()
        self.rope_scale = float(body.rotary_emb.attention_scaling)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = body.layers[0].self_attn.head_dim
        self.layers = [(L.input_layernorm.weight, L.self_attn, L.post_attention_layernorm.weight,
                        L.mlp) for L in body.layers]  # fmt: skip

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos, sin_signed [B, D] for int64 `positions` [B], computed as LlamaRotaryEmbedding
        does (float32, then cast to `dtype`); sin_signed is -sin on the first half."""
        freqs = positions[:, None].float() * self.inv_freq
        cos = torch.cat((freqs, freqs), -1).cos() * self.rope_scale
        s = freqs.sin() * self.rope_scale
        sin = torch.cat((-s, s), -1)
        return cos.to(dtype), sin.to(dtype)

    @torch.inference_mode()
    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attend: Attend,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, vocab] (model dtype) of int64 `tokens` [B] at `positions` [B]; with `rows`
        (int64 indices), only those rows' logits [len(rows), vocab] (a prefill chunk's rows
        need none but its last: the LM head is skipped for the others)."""
        h = self.embed(tokens)  # the residual stream, updated in place by add_rmsnorm
        cos, sin = self.rope(positions, h.dtype)
        b, hq, d, eps = h.shape[0], self.heads, self.head_dim, self.eps
        norms = [w for w_in, _, w_post, _ in self.layers for w in (w_in, w_post)]
        x = self.add_rmsnorm(h, None, norms[0], eps)
        for i, (_, attn, _, mlp) in enumerate(self.layers):
            qk = self.rope_qk(attn.q_proj(x), attn.k_proj(x), cos, sin, d)
            v = attn.v_proj(x).view(b, -1, d)
            o = attend(i, qk[:, :hq], qk[:, hq:], v, attn.scaling)
            x = self.add_rmsnorm(h, attn.o_proj(o.reshape(b, hq * d)), norms[2 * i + 1], eps)
            y = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)).mul_(mlp.up_proj(x)))
            w_next = norms[2 * i + 2] if 2 * i + 2 < len(norms) else self.norm_w
            x = self.add_rmsnorm(h, y, w_next, eps)
        return self.lm_head(x if rows is None else x[rows])


def build(model: nn.Module, compiled: bool | None = None) -> LlamaStep | None:
    """A LlamaStep for `model`, or None when the model is not one it reproduces. `compiled`:
    the row ops to use (None: the compiled ones where they take the model's dtype and width)."""
    cfg = model.config
    if type(model).__name__ != "LlamaForCausalLM" or cfg.model_type != "llama":
        return None
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    mlp = model.model.layers[0].mlp
    if (
        rope.get("rope_type", "default") not in _STATIC_ROPE
        or getattr(cfg, "pretraining_tp", 1) != 1
        or cfg.hidden_act != "silu"
        or type(mlp.act_fn).__name__ != "SiLUActivation"
    ):
        return None
    if compiled is None:
        compiled = rowops.compiled_for(model.model.embed_tokens.weight.dtype, cfg.hidden_size)
    return LlamaStep(model, compiled)
