"""The compiled decode kernel (`spectrumkv.paged._attention`, from `_attention.c`) and the one
input check every route runs.

`decode()` runs all (request, KV heads, split) tasks of a batch as one OpenMP parallel region
on torch's own threads (the same libgomp team as torch's ops; see `_attention.c`), then merges
split requests exactly. A task covers all KV heads of its request whose state fits its buffers
(one run of K and of V per page), or one KV head when that would leave fewer than 4 tasks per
thread or when the profile says one head per task runs faster (`fuse_heads`; `cost.task_heads`
states the rule). Kernels: AMX-BF16 or AVX512-BF16 (bf16 pages only),
AVX-512F, AVX2/F16C/FMA or plain C, the best the CPU has (`isa`, `set_isa`;
`SPECTRUMKV_PAGED_ISA=<name>` in the environment caps it at import, e.g. to time one kernel
against another in alternating processes). `write_rows()` copies a decode step's new K/V into its
page slots (the batch engine's per-layer write, one call for K and V). When the extension was
not built, `AVAILABLE` is False and only the torch routes (`padded`, `sdpa`, the reference) run.
"""

from __future__ import annotations

import os

import torch

from .errors import PagedInputError

try:
    from . import _attention
except ImportError:  # an optional extension; see setup.py
    _attention = None

AVAILABLE = _attention is not None
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}


def check_inputs(q, k_pages, v_pages, tables, lengths, starts=None) -> None:
    """Shapes and dtypes of a decode call (PagedInputError naming what is wrong). The table
    contents (entries inside the pool, 1 <= length <= width x page_size, 0 <= start < length)
    are checked by the kernel itself, and by `check_tables` for the torch routes."""
    if k_pages.dim() != 4 or k_pages.shape != v_pages.shape:
        raise PagedInputError(
            f"k/v pages must be equal [pages, kv_heads, page_size, head_dim], got "
            f"{list(k_pages.shape)} and {list(v_pages.shape)}"
        )
    if k_pages.dtype not in _DTYPE_CODES or v_pages.dtype != k_pages.dtype:
        raise PagedInputError(f"KV pages must both be float16 or bfloat16: {k_pages.dtype}, "
                              f"{v_pages.dtype}")  # fmt: skip
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        raise PagedInputError("KV pages must be contiguous")
    _, hkv, _, d = k_pages.shape
    if q.dim() != 3 or q.shape[2] != d or q.shape[1] % hkv or not q.is_floating_point():
        raise PagedInputError(f"q must be float [batch, q_heads (a multiple of {hkv}), {d}], "
                              f"got {q.dtype} {list(q.shape)}")  # fmt: skip
    if tables.dtype != torch.int32 or tables.dim() != 2 or tables.shape[0] != q.shape[0]:
        raise PagedInputError(f"tables must be int32 [batch={q.shape[0]}, width], got "
                              f"{tables.dtype} {list(tables.shape)}")  # fmt: skip
    if lengths.dtype != torch.int32 or lengths.shape != (q.shape[0],):
        raise PagedInputError(f"lengths must be int32 [batch={q.shape[0]}], got "
                              f"{lengths.dtype} {list(lengths.shape)}")  # fmt: skip
    if starts is not None and (starts.dtype != torch.int32 or starts.shape != lengths.shape):
        raise PagedInputError(f"starts must be int32 [batch={q.shape[0]}], got "
                              f"{starts.dtype} {list(starts.shape)}")  # fmt: skip


def check_tables(tables, lengths, pages: int, page_size: int, starts=None) -> None:
    """Every length in [1, width x page_size], every start in [0, length), and every table
    entry that [start, length) reaches in [0, pages)."""
    if bool((lengths < 1).any()) or bool((lengths > tables.shape[1] * page_size).any()):
        raise PagedInputError("a length is < 1 or exceeds the block table's width")
    first = torch.zeros_like(lengths) if starts is None else starts
    if bool((first < 0).any()) or bool((first >= lengths).any()):
        raise PagedInputError("a start is < 0 or not below its length")
    ends = torch.arange(1, tables.shape[1] + 1)[None, :] * page_size
    used = (ends > first[:, None]) & (ends - page_size < lengths[:, None])
    entries = tables[used]
    if bool((entries < 0).any()) or bool((entries >= pages).any()):
        raise PagedInputError("a block table entry points outside the page pool")


def write_rows(k_pages, v_pages, rows, k, v) -> bool:
    """Copy tokens' K/V (k, v [batch, kv_heads, head_dim], already in the pages' dtype: a decode
    step's new token per request, or a prompt's tokens; the batch and head axes may be strided,
    as a slice of a larger buffer or a transposed [kv_heads, tokens, head_dim] prompt) into rows
    `rows` (int64 [batch x kv_heads], contiguous) of the pages viewed as [rows, head_dim]: the
    compiled twin of two `index_copy_` calls, one single-threaded call with no temporaries.
    Returns False, writing nothing, when the inputs are not ones it takes (extension not built, a
    dtype conversion, head_dim values not contiguous, a tensor off the CPU): the caller then
    uses torch. A row outside the pool is a PagedInputError, raised before anything is written."""
    if _attention is None:
        return False
    b, h, d = k.shape
    if (
        k.dtype != k_pages.dtype or v.dtype != v_pages.dtype or k_pages.dtype not in _DTYPE_CODES
        or v.shape != k.shape or k.stride(2) != 1 or v.stride(2) != 1
        or rows.dtype != torch.int64 or not rows.is_contiguous() or rows.numel() != b * h
        or not (k_pages.is_contiguous() and v_pages.is_contiguous())
        or not (k_pages.is_cpu and v_pages.is_cpu and k.is_cpu and v.is_cpu and rows.is_cpu)
    ):  # fmt: skip
        return False
    try:
        _attention.write_rows(
            k_pages.data_ptr(), v_pages.data_ptr(), k_pages.numel() // d, rows.data_ptr(),
            k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1), b, h,
            d,
        )  # fmt: skip
    except ValueError as e:
        raise PagedInputError(str(e)) from None
    return True


ISAS = ("scalar", "avx2", "avx512", "avx512bf16", "amx")


def isa() -> str:
    """The kernel in use: "amx" (AMX-BF16 tiles for bf16 pages whose page_size is a multiple of
    16, head_dim of 32 and group <= 8; AVX512-BF16 for other bf16 pages of head_dim % 32 == 0,
    AVX-512F for the rest), "avx512bf16" (VDPBF16PS scores for bf16 pages of head_dim % 32 ==
    0, AVX-512F for the rest), "avx512" (AVX-512F), "avx2" (AVX2/F16C/FMA) or "scalar" (plain
    C). "amx" needs the CPU's AMX-BF16 and the Linux kernel's permission for the tile state
    (asked once at import); without either the best is "avx512bf16" where the CPU has
    AVX512-BF16 (a Zen 4), else "avx512"."""
    return ISAS[_attention.isa()]


def set_isa(name: str) -> str:
    """Use at most this kernel, as far as the CPU has it; returns the previous one. For tests
    and benchmarks (all compute the same attention up to float rounding)."""
    previous = isa()
    _attention.set_isa(ISAS.index(name))
    return previous


def decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    max_splits: int = 1,
    min_split_tokens: int = 1 << 30,
    threads: int | None = None,
    out: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    part_tokens: int = 0,
    fuse_heads: bool = True,
) -> tuple[torch.Tensor, int, int]:
    """One dispatch over the whole batch. Request b attends to its tokens [starts[b],
    lengths[b]) (starts None: from 0); a span of n tokens is cut into
    min(max_splits, ceil(n / min_split_tokens)) ranges (whole 32-token tiles); each (request,
    range) is one task per group of KV heads (`cost.task_heads`). part_tokens > 0 (a multiple
    of 32): the ranges are whole parts of that many tokens and each part is its own partial,
    merged in order, so a request's output bits depend on its span and part_tokens only, not
    on the ranges, the route or the batch (`cost.cut`). fuse_heads False: one KV head per task
    whatever the batch (`MachineProfile.fuse_heads`; the bits do not change). Returns (out
    float32 [batch, q_heads, head_dim], tasks, partials: those of requests cut into more than
    one, per KV head, as `cost.merge_bytes` counts them). Inputs as in `check_inputs`, which
    the caller has run."""
    qf = q.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(qf.shape, dtype=torch.float32)
    threads = max(1, min(64, threads or torch.get_num_threads()))
    try:
        tasks, partials, _ = _attention.decode(
            qf.data_ptr(), k_pages.data_ptr(), v_pages.data_ptr(), k_pages.numel(),
            tables.contiguous().numpy(), lengths.contiguous().numpy(), out.data_ptr(),
            q.shape[1], k_pages.shape[1], k_pages.shape[3], k_pages.shape[2],
            _DTYPE_CODES[k_pages.dtype], scale, max_splits, min_split_tokens, threads,
            b"" if starts is None else starts.contiguous().numpy(), part_tokens, fuse_heads,
        )  # fmt: skip
    except ValueError as e:
        raise PagedInputError(str(e)) from None
    return out, tasks, partials


if AVAILABLE and os.environ.get("SPECTRUMKV_PAGED_ISA"):
    _cap = os.environ["SPECTRUMKV_PAGED_ISA"]
    if _cap not in ISAS:
        raise PagedInputError(f"SPECTRUMKV_PAGED_ISA={_cap!r}: not one of {ISAS}")
    set_isa(_cap)
