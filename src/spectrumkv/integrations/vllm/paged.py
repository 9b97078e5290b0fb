"""Reading and writing one prompt's K/V in vLLM's paged cache, whatever the backend's layout.

vLLM's CPU attention backend keeps a layer's cache as [num_blocks, n_kv_heads, block_size,
2 * head_dim] but lays keys out in an ISA-specific packed order inside each block (values are
plain). Rather than hard-coding that order, `learn_layout` writes index patterns through the
backend's own cache-write op into a scratch block and reads back where every (head, slot, dim)
element of K and of V landed. Gathering and scattering are then plain indexed copies, and the
layout is checked to be a bijection before it is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import ConfigError

#: (key [T, H, D], value [T, H, D], block [1, H, bs, 2D], slots [T]) -> writes the block in place
WriteOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class PagedLayout:
    """Element offsets inside one flattened block: k_index / v_index [H, block_size, D]."""

    k_index: torch.Tensor
    v_index: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.k_index.shape[1]


def learn_layout(n_heads: int, block_size: int, head_dim: int, write: WriteOp) -> PagedLayout:
    """Find where `write` puts each K and V element of a block (bf16 scratch; indices < 256 are
    exact in bf16, so block_size, head_dim and n_heads must each be <= 256)."""
    if max(n_heads, block_size, head_dim) > 256:
        raise ConfigError("layout probe supports n_heads, block_size, head_dim <= 256")
    shape = (block_size, n_heads, head_dim)
    coords = {
        "t": torch.arange(block_size)[:, None, None].expand(shape),
        "h": torch.arange(n_heads)[None, :, None].expand(shape),
        "d": torch.arange(head_dim)[None, None, :].expand(shape),
    }
    slots = torch.arange(block_size, dtype=torch.int64)
    seen: dict[str, torch.Tensor] = {}
    for name, pattern in (*coords.items(), ("kv", None)):
        block = torch.full((1, n_heads, block_size, 2 * head_dim), -1.0, dtype=torch.bfloat16)
        if pattern is None:  # tells K (0) from V (1)
            k, v = torch.zeros(shape), torch.ones(shape)
        else:
            k = v = pattern.float()
        write(k.bfloat16().contiguous(), v.bfloat16().contiguous(), block, slots)
        seen[name] = block.flatten().float()
    if bool((seen["kv"] < 0).any()):
        raise ConfigError("the cache-write op left part of a block unwritten: unknown layout")
    flat = (
        (seen["kv"].long() * n_heads + seen["h"].long()) * block_size + seen["t"].long()
    ) * head_dim + seen["d"].long()
    index = torch.full((2 * n_heads * block_size * head_dim,), -1, dtype=torch.long)
    index[flat] = torch.arange(flat.numel())
    if bool((index < 0).any()):
        raise ConfigError("the cache-write op's layout is not a bijection: unknown layout")
    index = index.view(2, n_heads, block_size, head_dim)
    return PagedLayout(index[0].contiguous(), index[1].contiguous())


def token_slots(
    layout: PagedLayout, block_ids: list[int], start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks [T] and in-block offsets [T] of prompt positions start..end-1."""
    pos = torch.arange(start, end)
    bs = layout.block_size
    table = torch.as_tensor(block_ids, dtype=torch.long)
    if end > table.numel() * bs:
        raise ValueError(f"{len(block_ids)} blocks of {bs} cannot hold {end} tokens")
    return table[pos // bs], pos % bs


def gather(
    layout: PagedLayout, cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy K and V of the given slots out of a layer's cache: two [H, T, D] tensors."""
    flat = cache.view(cache.shape[0], -1)
    rows = blocks[None, :, None]
    return (
        flat[rows, layout.k_index[:, offsets, :]],
        flat[rows, layout.v_index[:, offsets, :]],
    )


def scatter(
    layout: PagedLayout,
    cache: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Write K and V [H, T, D] into the given slots of a layer's cache, in place."""
    flat = cache.view(cache.shape[0], -1)
    rows = blocks[None, :, None]
    flat[rows, layout.k_index[:, offsets, :]] = keys.to(cache.dtype)
    flat[rows, layout.v_index[:, offsets, :]] = values.to(cache.dtype)
