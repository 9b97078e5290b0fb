"""bfloat16 linear layers with prepacked weights (oneDNN's blocked layout), for CPU decoding.

`F.linear` on a bf16 weight re-lays the weight out for oneDNN's kernel on every call. At a decode
step's few rows (a batch of B tokens) that reorder costs as much as the product itself. Measured on
an AMX VM (one thread, 16 rows, 30 layers of SmolLM2-135M's projection shapes with q/k/v and gate/up
fused, load ~4): fp32 `F.linear` 78.9 ms, bf16 `F.linear` 49.4 ms, bf16 packed 24.8 ms (212 MB at
~8.5 GB/s, a torch sum's read rate). oneDNN's packed product is bit-identical to `F.linear` in bf16
(same oneDNN kernel; `tests/test_serve_engine.py` checks it, at 1, 16 and 300 rows where `DOT` is
off, at 300 where it is on), and a row's result does not depend on the other rows, so batch
invariance is unaffected.

`pack_linears(model)` swaps every `nn.Linear` of a bf16 model for a `PackedLinear` (the LM head
too; a tied LM head gets its own packed copy, the embedding keeps the shared weight). A packed
layer has no `weight` (its bytes are in `packed`, an opaque layout): nothing in this package
reads a bf16 model's linear weights (the fingerprint reads them from disk), and it is for
inference only (no autograd through the packed op). It uses torch's `torch.ops.mkldnn` linear
ops (the ones torch.compile's CPU backend emits); where oneDNN or its bf16 path is missing the
model is left as it is.

**Few rows on CPUs without AMX** (`DOT`): there oneDNN's bf16 product at a decode step's 1-16 rows
runs on AVX512-BF16 at 7-16 GB/s of weights (AMD EPYC Zen 4, 2 threads, weights from DRAM), well
under the memory's 27-31 GB/s read rate. `_bf16dot.c` streams a second copy of each weight, packed
for VDPBF16PS (`dot_layout`), at 1.4-1.8x oneDNN's speed there at 1-16 rows on 2 threads, 1.0-1.2x
at 32-64 (benchmarks/bf16dot.py; the batch-16 step 1.29-1.34x faster), and takes every product of at
most `DOT_ROWS` rows (decode steps up to that batch); larger ones (prefills) keep oneDNN's. Its rows
are as independent as oneDNN's (batch invariance holds), but its sums run in another order: outputs
differ from `F.linear` within bf16 rounding. The second copy costs the bf16 weights' size again (269
MB for SmolLM2-135M). On AMX CPUs oneDNN keeps every product (its AMX path was not measured against
this kernel); `SPECTRUMKV_BF16_DOT=0` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch
from torch import nn

try:
    from . import _bf16dot
except ImportError:  # an optional extension; see setup.py
    _bf16dot = None

BATCH_HINT = 16  # the rows oneDNN packs for (any row count works)
#: rows up to which a packed layer multiplies on `_bf16dot` where `DOT` (the engine's batch is
#: at most 32 by default); more rows, a prefill's, take oneDNN's product
DOT_ROWS = 64
DOT = (
    _bf16dot is not None
    and _bf16dot.available()
    and not torch.cpu._is_amx_tile_supported()
    and os.environ.get("SPECTRUMKV_BF16_DOT", "1") != "0"
)


def available() -> bool:
    """Whether torch's oneDNN bf16 linear ops are usable on this CPU."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def dot_layout(w: torch.Tensor) -> torch.Tensor:
    """A bf16 weight [N, K] (N % 16 == 0, K even) in `_bf16dot`'s layout [N / 16, K / 2, 16, 2]:
    per block of 16 output columns and pair of input features, one 64-byte row."""
    n, k = w.shape
    return w.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def dot_matmul(x: torch.Tensor, w_dot: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 times a `dot_layout` weight -> [..., N] bf16, on `_bf16dot` (a CPU with
    AVX512-BF16: RuntimeError elsewhere). ValueError for inputs it does not take."""
    if w_dot.dim() != 4 or w_dot.shape[2:] != (16, 2) or not w_dot.is_contiguous():
        raise ValueError(f"w_dot must be a contiguous dot_layout weight, got {list(w_dot.shape)}")
    k = 2 * w_dot.shape[1]
    if x.dtype != torch.bfloat16 or w_dot.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"x must be bf16 [..., {k}] for a bf16 weight, got {x.dtype} "
                         f"{list(x.shape)} and {w_dot.dtype}")  # fmt: skip
    if x.device.type != "cpu" or w_dot.device.type != "cpu":
        raise ValueError("dot_matmul runs on CPU tensors only")
    return _dot(x, w_dot)


def _dot(x: torch.Tensor, w_dot: torch.Tensor) -> torch.Tensor:
    """`dot_matmul` on inputs already checked (PackedLinear.forward's own, on the decode path)."""
    k, n = 2 * w_dot.shape[1], 16 * w_dot.shape[0]
    rows = x.reshape(-1, k).contiguous()
    y = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    if rows.shape[0]:
        _bf16dot.matmul(rows.data_ptr(), w_dot.data_ptr(), y.data_ptr(), rows.shape[0], k, n,
                        torch.get_num_threads())  # fmt: skip
    return y.view(*x.shape[:-1], n)


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed once for oneDNN (bf16), and where `DOT` (no bias, N % 16 == 0,
    K even) once more for `_bf16dot`, which takes x of at most `DOT_ROWS` rows. x: [...,
    in_features] bf16."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.dtype != torch.bfloat16:
            raise ValueError(f"PackedLinear packs bfloat16 weights, got {w.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(w, BATCH_HINT)
        self.register_buffer("packed", packed, persistent=False)
        self.bias = linear.bias
        fits = DOT and self.bias is None and w.shape[0] % 16 == 0 and w.shape[1] % 2 == 0
        self.register_buffer("dot", dot_layout(w) if fits else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.dot is not None
            and x.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and x.shape[-1] == self.in_features
            and x.numel() <= DOT_ROWS * self.in_features
        ):
            return _dot(x, self.dot)  # the checks dot_matmul makes, made above
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        dot = ", + bf16 dot layout" if self.dot is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16{dot}"


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
