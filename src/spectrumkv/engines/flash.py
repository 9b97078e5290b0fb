"""Causal prefill attention on AMX-BF16 tiles or AVX512-BF16 dot products (`_flash.c`), for
bf16 models of head_dim 64 or 128.

`causal(q, k, v, scale)` computes what `F.scaled_dot_product_attention(q, k, v,
is_causal=True, enable_gqa=True)` computes for one prompt, in bf16 with FP32 accumulation and
an FP32 online softmax; tests/test_flash.py checks it against a float64 reference beside SDPA's
own bf16 error. `engines.segments` runs it for every span it can take (`fits`), so the packed
prefill of `engines.hf.prefill_batch` and the single-prompt `engines.hf.prefill` of bf16 models
use it; everything else stays on SDPA. Kernels (`isa`): "amx" where the CPU has AMX-BF16
(head_dim 64; 128 runs on the next), else "avx512bf16" (VDPBF16PS: AMD Zen 4, Intel Cooper
Lake). Measured with benchmarks/prefill_attention.py (benchmarks/RESULTS.md, "Prefill attention
on AMX tiles" and "Session 29"): AMX 1.1-3.1x SDPA's speed and 1.1-1.7x vLLM's CPU attention at
0.5-8K tokens; AVX512-BF16 on a Zen 4 2.8-5.0x SDPA and 2.0-2.4x vLLM's at 0.5-4K tokens.
`SPECTRUMKV_FLASH_PREFILL=0` in the environment turns it off (for A/B runs); without the
extension or without AVX512-BF16 (`AVAILABLE` False) SDPA runs.
"""

from __future__ import annotations

import os

import torch

try:
    from . import _flash
except ImportError:  # an optional extension; see setup.py
    _flash = None

AVAILABLE = _flash is not None and _flash.available()
ENABLED = AVAILABLE and os.environ.get("SPECTRUMKV_FLASH_PREFILL", "1") != "0"
HEAD_DIMS = (64, 128)


def isa() -> str:
    """The kernel `causal` runs: "amx", "avx512bf16", or "" where neither can run."""
    return _flash.isa() if _flash is not None else ""


def set_isa(name: str) -> str:
    """Run this kernel ("amx" where the CPU has it, or "avx512bf16"); returns the previous one.
    For tests and A/B runs. ValueError for a kernel this CPU lacks."""
    if _flash is None:
        raise ValueError("the flash prefill extension is not built")
    return _flash.set_isa(name)


def fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `causal` takes these ([Hq, T, D] and [Hkv, T, D]): the kernel is enabled here,
    all three bf16 on the CPU, D in HEAD_DIMS with contiguous dims, Hq a multiple of Hkv."""
    return (
        ENABLED
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.device.type == "cpu"
        and query.dim() == key.dim() == value.dim() == 3
        and query.shape[2] in HEAD_DIMS
        and key.shape == value.shape
        and key.shape[1:] == query.shape[1:]
        and query.shape[0] % key.shape[0] == 0
        and all(
            x.stride(2) == 1 and x.stride(0) % 2 == 0 and x.stride(1) % 2 == 0
            for x in (query, key, value)
        )  # fmt: skip
    )


def causal(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal GQA attention of one prompt: query [Hq, T, D], key/value [Hkv, T, D] (bf16, D in
    HEAD_DIMS, any head/token strides) -> [T, Hq, D] bf16, contiguous. `scale` defaults to
    D ** -0.5. ValueError for inputs `fits` refuses."""
    if not fits(query, key, value):
        raise ValueError("flash.causal needs bf16 [Hq, T, D] / [Hkv, T, D] CPU tensors (D 64 "
                         "or 128), contiguous dims, AVX512-BF16 here (see flash.fits)")  # fmt: skip
    hq, t, d = query.shape
    out = torch.empty(t, hq, d, dtype=torch.bfloat16)
    _flash.causal(
        query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), t, hq,
        key.shape[0], d, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), float(scale if scale is not None else d**-0.5),
        max(1, min(64, torch.get_num_threads())),
    )  # fmt: skip
    return out


def serves(model: torch.nn.Module) -> bool:
    """Whether `model`'s prefill attention can run here: the kernel enabled, bf16 weights and
    head_dim in HEAD_DIMS (the caller checks that every layer attends to the whole prompt)."""
    cfg = getattr(model.config, "text_config", None) or model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ENABLED and model.dtype == torch.bfloat16 and head_dim in HEAD_DIMS
