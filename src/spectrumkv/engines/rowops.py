"""The small ops of a Llama-family forward (engines.llama_step: a decode step, or a prefill),
fused: residual add + RMSNorm, and RoPE of q and k into one buffer, on [B, features] rows of
float32 or bfloat16. Calls of at least PARALLEL_MIN values spread their rows over torch's
threads; a row's bits do not depend on the thread count.

Each op has a plain torch reference (`*_ref`: exactly the HF modules' arithmetic, op for op, so
bit-identical to the generic HF forward) and a compiled version (`spectrumkv.engines._rowops`,
from `_rowops.c`, one call instead of 5-8 torch ops on a few KiB each, which at a decode step's
16 rows cost more in dispatch than in arithmetic). The compiled ops round to the row dtype at
the same points as the references; RoPE is bit-identical, RMSNorm differs only in the order of
its sum of squares (tests/test_runner_fast.py bounds it). A compiled SiLU * up was measured and
dropped: no faster than torch's two ops. When the extension was not built (it is optional, see
setup.py), `AVAILABLE` is False and the references run. Inputs are checked here (RowOpsError
names what is wrong), not in C.
"""

from __future__ import annotations

import torch

from ..errors import SpectrumKVError

try:
    from . import _rowops
except ImportError:  # an optional extension; see setup.py
    _rowops = None

AVAILABLE = _rowops is not None
_CODES = {torch.float32: 0, torch.bfloat16: 2}
_MAX_COLS = 16384  # _rowops.c's row buffer
#: values in a call from which its rows are spread over torch's threads (a prefill's rows are;
#: a decode step's few rows stay on the calling thread, where a team would cost more than it saves)
PARALLEL_MIN = 1 << 16


def _threads(values: int) -> int:
    """OpenMP threads for a call over `values` elements: torch's count for large calls, else 1."""
    return torch.get_num_threads() if values >= PARALLEL_MIN else 1


def compiled_for(dtype: torch.dtype, hidden: int) -> bool:
    """Whether the compiled ops are built and take rows of this dtype and width."""
    return AVAILABLE and dtype in _CODES and hidden <= _MAX_COLS


class RowOpsError(SpectrumKVError):
    """Inputs the fused row ops do not take (shape, dtype, layout)."""


def _check(*ts: torch.Tensor) -> int:
    """The dtype code of contiguous tensors sharing one supported dtype."""
    dt = ts[0].dtype
    if dt not in _CODES or any(t.dtype != dt or not t.is_contiguous() for t in ts):
        raise RowOpsError(f"row ops take contiguous float32 or bfloat16 tensors of one dtype, "
                          f"got {[(t.dtype, t.is_contiguous()) for t in ts]}")  # fmt: skip
    return _CODES[dt]


def add_rmsnorm_ref(h: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor, eps: float):
    """h += y in place (when y is given); returns LlamaRMSNorm(h) with weight w. h, y [B, H]."""
    if y is not None:
        h.add_(y)
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(h.dtype)


def rope_ref(q, k, cos, sin, d: int) -> torch.Tensor:
    """q [B, Hq*d], k [B, Hkv*d] -> [B, Hq + Hkv, d] with RoPE: x * cos + roll(x, d/2) *
    sin_signed (cos, sin_signed [B, d]), HF's x * cos + rotate_half(x) * sin (sign flips are
    exact)."""
    qk = torch.cat((q, k), -1).view(q.shape[0], -1, d)
    return qk * cos[:, None] + qk.roll(d // 2, -1) * sin[:, None]


def add_rmsnorm(h: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor, eps: float):
    """add_rmsnorm_ref, compiled."""
    rows, cols = h.shape
    code = _check(h, w) if y is None else _check(h, y, w)
    if w.shape != (cols,) or (y is not None and y.shape != h.shape) or cols > _MAX_COLS:
        raise RowOpsError(f"add_rmsnorm: h {list(h.shape)}, weight {list(w.shape)}")
    out = torch.empty_like(h)
    _rowops.add_rmsnorm(h.data_ptr(), 0 if y is None else y.data_ptr(), w.data_ptr(),
                        out.data_ptr(), rows, cols, code, eps, _threads(h.numel()))  # fmt: skip
    return out


def rope(q, k, cos, sin, d: int) -> torch.Tensor:
    """rope_ref, compiled."""
    code = _check(q, k, cos, sin)
    rows = q.shape[0]
    if (q.dim() != 2 or k.dim() != 2 or k.shape[0] != rows or cos.shape != (rows, d)
            or sin.shape != cos.shape or q.shape[1] % d or k.shape[1] % d):  # fmt: skip
        raise RowOpsError(f"rope: q {list(q.shape)}, k {list(k.shape)}, cos {list(cos.shape)}")
    hq, hkv = q.shape[1] // d, k.shape[1] // d
    out = torch.empty(rows, hq + hkv, d, dtype=q.dtype)
    _rowops.rope(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
                 rows, hq, hkv, d, code, _threads(out.numel()))  # fmt: skip
    return out
