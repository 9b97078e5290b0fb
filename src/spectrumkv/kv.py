"""Engine-neutral containers for a prompt's KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    """One layer's cached tokens.

    keys, values: [H, n, D] in the engine's KV dtype (float16 / bfloat16; float32 accepted),
    post-RoPE keys, as the engine caches them.
    positions: [n] int64, the original prompt positions of the n slots, strictly increasing.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor

    def __post_init__(self) -> None:
        n = self.positions.shape[0]
        if self.keys.shape != self.values.shape or self.keys.shape[1] != n:
            raise ValueError(
                f"inconsistent LayerKV shapes: keys {tuple(self.keys.shape)}, "
                f"values {tuple(self.values.shape)}, positions {n}"
            )


#: The dtypes a cache may be encoded from (an engine's 16-bit KV dtypes, or float32).
SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_source(keys: torch.Tensor, values: torch.Tensor) -> None:
    """ValueError unless keys and values are [H, n, D] tensors of one shape and one of
    SOURCE_DTYPES: what an encoder may read."""
    if (
        keys.dim() != 3
        or keys.shape != values.shape
        or keys.dtype != values.dtype
        or keys.dtype not in SOURCE_DTYPES
    ):
        raise ValueError(
            f"layer KV must be float16, bfloat16 or float32 [H, n, D] tensors (keys and values "
            f"alike), got {tuple(keys.shape)} {keys.dtype} and {tuple(values.shape)} {values.dtype}"
        )


def check_destination(
    out: tuple[torch.Tensor, torch.Tensor], heads: int, head_dim: int, dtype: torch.dtype, kept: int
) -> None:
    """ValueError unless `out` is a (keys, values) pair that a decoder may write `kept` slots
    into: contiguous [heads, capacity, head_dim] tensors of `dtype`, one capacity, >= kept."""
    keys, _ = out
    want = (heads, keys.shape[1], head_dim)
    for x in out:
        if x.shape != want or x.dtype != dtype or x.stride() != (want[1] * head_dim, head_dim, 1):
            raise ValueError(f"decode destination must be contiguous {want} {dtype}")
    if keys.shape[1] < kept:
        raise ValueError(f"decode destination holds {keys.shape[1]} slots, frame keeps {kept}")


def first_slot(layer_is_sliding: bool, sliding_window: int, n_tokens: int) -> int:
    """First prompt position an engine keeps in a layer after prefilling n_tokens.

    Sliding-window layers keep only the last `sliding_window - 1` tokens (what the next query
    can still see); full-attention layers keep everything.
    """
    if not layer_is_sliding or sliding_window <= 0:
        return 0
    return max(0, n_tokens - (sliding_window - 1))
