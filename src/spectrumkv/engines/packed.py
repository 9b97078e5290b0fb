"""bfloat16 linear layers with prepacked weights (oneDNN's blocked layout), for CPU decoding.

`F.linear` on a bf16 weight re-lays the weight out for oneDNN's kernel on every call. At a decode
step's few rows (a batch of B tokens) that reorder costs as much as the product itself. Measured
here (one thread, 16 rows, 30 layers of SmolLM2-135M's projection shapes with q/k/v and gate/up
fused, load ~4): fp32 `F.linear` 78.9 ms, bf16 `F.linear` 49.4 ms, bf16 packed 24.8 ms (212 MB
at ~8.5 GB/s, a torch sum's read rate). The packed product is bit-identical to `F.linear` in
bf16 (same oneDNN kernel; `tests/test_serve_engine.py` checks it at 1, 16 and 300 rows), and a
row's result does not depend on the other rows, so batch invariance is unaffected.

`pack_linears(model)` swaps every `nn.Linear` of a bf16 model for a `PackedLinear` (the LM head
too; a tied LM head gets its own packed copy, the embedding keeps the shared weight). A packed
layer has no `weight` (its bytes are in `packed`, an opaque layout): nothing in this package
reads a bf16 model's linear weights (the fingerprint reads them from disk), and it is for
inference only (no autograd through the packed op). It uses torch's `torch.ops.mkldnn` linear
ops (the ones torch.compile's CPU backend emits); where oneDNN or its bf16 path is missing the
model is left as it is.
"""

from __future__ import annotations

import contextlib
import ctypes

import torch
from torch import nn

BATCH_HINT = 16  # the rows oneDNN packs for (any row count works)


def available() -> bool:
    """Whether torch's oneDNN bf16 linear ops are usable on this CPU."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed once for oneDNN (bf16). x: [..., in_features] bf16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear packs bfloat16 weights, got {w.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def pack_linears(model: nn.Module) -> int:
    """Swap the bf16 model's `nn.Linear` layers for `PackedLinear` in place; returns how many
    (0 when oneDNN's bf16 ops are not available)."""
    if not available():
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    n = len(targets)
    del targets, parent, child
    _trim()
    return n


def _trim() -> None:
    """Hand the freed unpacked weights back to the OS: glibc keeps freed heap blocks, ~200 MB
    of anonymous memory for SmolLM2-135M here (no-op where there is no glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
