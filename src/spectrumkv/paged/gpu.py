"""The GPU workqueue decode: Triton kernels for paged decode attention, the same contract as
the CPU kernel (`kernel.decode`, `_attention.c`).

    out, tasks = gpu.decode(q, k_pages, v_pages, tables, lengths, scale,
                            max_splits, min_split_tokens, starts=starts)
    p = gpu.plan(q, k_pages, v_pages, tables, lengths, max_splits, min_split_tokens, starts)
    out = gpu.launch(p, q, k_pages_of_layer, v_pages_of_layer, scale)  # each layer of a step

`split_settings(spans, kv_heads, device_programs(device))` gives the split settings that fill a
GPU (what `routes` uses for CUDA pages); the CPU profile's settings cut far too few programs
for a GPU's multiprocessors.

Work unit: one Triton program per task (request b, KV head h, token range [lo, hi)). The host
plans the compact task list from the lengths (only tasks that exist, longest first; a span of n
tokens is cut into `cost.splits_of(n, max_splits, min_split_tokens)` ranges of whole
`cost.TILE`-token tiles, as the CPU kernel cuts it); the launch grid is (tasks, kv_heads). A
program reads each K/V block of its range once (`KernelConfig.block_tokens` tokens per loop
iteration), through the block table, for all query heads of head h's group, and keeps an FP32
online softmax (m, l, acc) per query head; the two dot products run in `KernelConfig.precision`
(default TF32 on the tensor cores; "ieee": exact float32). An unsplit request's program
writes its output; a split request's programs write partials (m, l, acc) and one merge program
per (split request, KV head) combines them exactly: M = max m_s, L = sum e^(m_s - M) l_s,
out = sum e^(m_s - M) acc_s / L. Temporaries: the task list and the partials, O(batch x
kv_heads x splits x group x head_dim), never O(context length).

Inputs: q [batch, q_heads, head_dim] any float dtype; k_pages, v_pages [pages, kv_heads,
page_size, head_dim] float16 or bfloat16, contiguous, on the device that runs the kernels
(CUDA; or CPU under Triton's interpreter, TRITON_INTERPRET=1 set before this module is
imported: how the tests run it); tables int32 [batch, width], lengths int32 [batch], starts
optional int32 [batch] (request b reads its tokens [starts[b], lengths[b])), on the host or
the device. Checked in full before anything runs (`kernel.check_inputs`, `kernel.check_tables`
on host copies, plus this kernel's limits): bad input raises PagedInputError. Output float32
[batch, q_heads, head_dim] on the pages' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import cost, kernel
from .errors import PagedInputError

MAX_GROUP = 16  # query heads per KV head
MAX_HEAD_DIM = 256
ROWS = 16  # the group is padded to >= 16 rows: tl.dot's smallest M on NVIDIA GPUs
MAX_SPLITS = 256  # most splits of one request (split_settings)
MIN_SPLIT_TOKENS = 256  # shortest split split_settings makes (tokens)
PROGRAMS_PER_SM = 2  # programs per multiprocessor split_settings aims at

PRECISIONS = ("tf32", "ieee", "kv")


@dataclass(frozen=True)
class KernelConfig:
    """How the decode kernel runs (validated once): tokens per loop iteration (`block_tokens`,
    a power of two, 16-256; splits stay whole `cost.TILE` tiles), warps and software-pipeline
    stages per program, and the dots' input precision. "tf32": the tensor cores; fp16/bf16 K
    and V are exact in TF32, q and the softmax weights are rounded to 10-bit mantissas (max
    abs error 2.0e-4 against float64 over the H200 benchmark's cases; FlashInfer's 5.6e-4).
    "ieee": exact float32 products on the FMA units (the CPU kernel's arithmetic; 3e-7, and
    2-4x slower on an H200). "kv": the tensor cores on operands in the KV dtype (q and the
    weights rounded to bf16/fp16; 4.4e-4, no faster than "tf32" there). Figures:
    benchmarks/results/gpu/."""

    block_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2
    precision: str = "tf32"

    def __post_init__(self) -> None:
        b, w = self.block_tokens, self.num_warps
        if b not in (16, 32, 64, 128, 256) or w not in (1, 2, 4, 8, 16):
            raise PagedInputError(f"KernelConfig: block_tokens a power of two in 16..256 and "
                                  f"num_warps in 1..16 (a power of two), got {b}, {w}")  # fmt: skip
        if self.num_stages not in range(1, 6) or self.precision not in PRECISIONS:
            raise PagedInputError(f"KernelConfig: num_stages in 1..5, precision in {PRECISIONS};"
                                  f" got {self.num_stages}, {self.precision!r}")  # fmt: skip


@triton.jit
def _decode_kernel(
    Q, K, V, Tables, Tasks, Out, PM, PL, PAcc, scale, width,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    DP: tl.constexpr, PS: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Program (task t, KV head h). Tasks: int32 [tasks, 4] rows (b, lo, hi, slot); slot -1:
    write Out[b, h*G:(h+1)*G]; else the partials of split slot `slot` (PM, PL [slots, HKV,
    GP]; PAcc [slots, HKV, GP, DP]). GP, DP: G and D padded to powers of two (>= 16)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(Tasks + t * 4)
    lo = tl.load(Tasks + t * 4 + 1)
    hi = tl.load(Tasks + t * 4 + 2)
    slot = tl.load(Tasks + t * 4 + 3)
    rows = tl.arange(0, GP)
    cols = tl.arange(0, DP)
    row_ok = rows < G
    col_ok = cols < D
    q_rows = (b * HKV + h) * G + rows  # query head rows of this KV head, [GP]
    q = tl.load(Q + q_rows[:, None] * D + cols[None, :], row_ok[:, None] & col_ok[None, :], 0.0)
    q = q * scale  # [GP, DP] float32; padded rows and columns are 0
    m_run = tl.full([GP], float("-inf"), tl.float32)  # running max of the scores
    l_run = tl.zeros([GP], tl.float32)  # running sum of e^(score - m_run)
    acc = tl.zeros([GP, DP], tl.float32)
    for t0 in range(lo, hi, BLOCK):
        tok = t0 + tl.arange(0, BLOCK)
        tok_ok = tok < hi
        page = tl.load(Tables + b.to(tl.int64) * width + tok // PS, tok_ok, 0).to(tl.int64)
        base = ((page * HKV + h) * PS + tok % PS) * D  # element offset of each token's row
        kv_ok = tok_ok[:, None] & col_ok[None, :]
        k = tl.load(K + base[:, None] + cols[None, :], kv_ok, 0.0)  # [BLOCK, DP]
        if PREC == "kv":  # operands in the KV dtype, float32 accumulation
            s = tl.dot(q.to(k.dtype), tl.trans(k))  # [GP, BLOCK]
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PREC)
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(s, 1))
        alpha = tl.exp(m_run - m_new)  # 0 on the first tile (m_run = -inf, m_new finite)
        p = tl.exp(s - m_new[:, None])
        l_run = l_run * alpha + tl.sum(p, 1)
        v = tl.load(V + base[:, None] + cols[None, :], kv_ok, 0.0)
        if PREC == "kv":
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PREC)
        m_run = m_new
    if slot < 0:
        out = acc / l_run[:, None]
        tl.store(Out + q_rows[:, None] * D + cols[None, :], out, row_ok[:, None] & col_ok[None, :])
    else:
        part = (slot * HKV + h).to(tl.int64)
        tl.store(PM + part * GP + rows, m_run)
        tl.store(PL + part * GP + rows, l_run)
        tl.store(PAcc + (part * GP + rows[:, None]) * DP + cols[None, :], acc)


@triton.jit
def _merge_kernel(
    Merges, Out, PM, PL, PAcc,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    """Program (split request i, KV head h). Merges: int32 [merges, 3] rows (b, s0, ns): the
    request's partials are slots [s0, s0 + ns)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(Merges + i * 3)
    s0 = tl.load(Merges + i * 3 + 1)
    ns = tl.load(Merges + i * 3 + 2)
    rows = tl.arange(0, GP)
    cols = tl.arange(0, DP)
    m_max = tl.full([GP], float("-inf"), tl.float32)
    for s in range(s0, s0 + ns):
        m_max = tl.maximum(m_max, tl.load(PM + (s * HKV + h) * GP + rows))
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    for s in range(s0, s0 + ns):
        part = (s * HKV + h).to(tl.int64)
        w = tl.exp(tl.load(PM + part * GP + rows) - m_max)
        l_sum += w * tl.load(PL + part * GP + rows)
        acc += w[:, None] * tl.load(PAcc + (part * GP + rows[:, None]) * DP + cols[None, :])
    out = acc / l_sum[:, None]
    q_rows = (b * HKV + h) * G + rows
    mask = (rows < G)[:, None] & (cols < D)[None, :]
    tl.store(Out + q_rows[:, None] * D + cols[None, :], out, mask)


def _check(q, k_pages, v_pages, tables, lengths, starts) -> tuple:
    """The CPU path's checks (on host copies of the tables) plus this kernel's limits and
    devices; returns host copies of (tables, lengths, starts)."""
    kernel.check_inputs(q, k_pages, v_pages, tables, lengths, starts)
    hkv, ps, d = k_pages.shape[1:]
    if q.shape[1] // hkv > MAX_GROUP or d > MAX_HEAD_DIM:
        raise PagedInputError(f"the GPU kernel takes group <= {MAX_GROUP} and head_dim <= "
                              f"{MAX_HEAD_DIM}, got {q.shape[1] // hkv}, {d}")  # fmt: skip
    if q.device != k_pages.device or v_pages.device != k_pages.device:
        raise PagedInputError(f"q, k_pages, v_pages must be on one device, got {q.device}, "
                              f"{k_pages.device}, {v_pages.device}")  # fmt: skip
    host = [None if x is None else x.cpu() for x in (tables, lengths, starts)]
    kernel.check_tables(host[0], host[1], k_pages.shape[0], ps, host[2])
    return tuple(host)


def split_settings(spans: list[int], kv_heads: int, programs: int) -> tuple[int, int]:
    """(max_splits, min_split_tokens) that fill a GPU: requests are cut into chunks of about
    total tokens x kv_heads / programs tokens (never under MIN_SPLIT_TOKENS), so one launch has
    about `programs` (request, KV head, split) programs, the flash-decoding rule. Unlike the CPU
    profile's settings, these depend on the whole batch: a request's split points, and so its
    output's float32 rounding, change with what else is in the step."""
    if kv_heads < 1 or programs < 1 or not spans or min(spans) < 1:
        raise PagedInputError(f"split_settings needs spans >= 1, kv_heads >= 1, programs >= 1, "
                              f"got {spans[:4]}, {kv_heads}, {programs}")  # fmt: skip
    chunk = -(-sum(spans) * kv_heads // programs)
    return MAX_SPLITS, max(MIN_SPLIT_TOKENS, chunk)


def device_programs(device: torch.device, per_sm: int = PROGRAMS_PER_SM) -> int:
    """The program count `split_settings` aims at on a CUDA device: per_sm per SM."""
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def plan_tasks(lengths: list[int], firsts: list[int], max_splits: int, min_split_tokens: int):
    """The compact task list, longest first: int32 [tasks, 4] rows (b, lo, hi, slot), and the
    merge list int32 [merges, 3] rows (b, first slot, splits); `slots` partial slots in all."""
    tasks, merges, slots = [], [], 0
    for b, (n, lo) in enumerate(zip(lengths, firsts, strict=True)):
        ns, chunk = cost.splits_of(n - lo, max_splits, min_split_tokens)
        for s in range(ns):
            start = lo + s * chunk
            tasks.append((b, start, min(start + chunk, n), slots + s if ns > 1 else -1))
        if ns > 1:
            merges.append((b, slots, ns))
            slots += ns
    tasks.sort(key=lambda row: row[1] - row[2])  # longest first: short tasks fill the tail
    return _int32_rows(tasks, 4), _int32_rows(merges, 3), slots


def _int32_rows(rows: list[tuple], width: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, width)


@dataclass(frozen=True)
class Plan:
    """One step's launch plan (`plan`), reused by every layer of the step (`launch`): the task
    and merge lists on the device, the partials' buffers, and the checked geometry."""

    tasks: torch.Tensor  # int32 [tasks, 4] on the device
    merges: torch.Tensor  # int32 [merges, 3] on the device
    tables: torch.Tensor  # int32 [batch, width] on the device
    pm: torch.Tensor  # float32 [slots, kv_heads, GP]
    pl: torch.Tensor
    pacc: torch.Tensor  # float32 [slots, kv_heads, GP, DP]
    shape: tuple[int, int, int, int, int]  # pages, kv_heads, page_size, head_dim, q_heads
    dtype: torch.dtype
    programs: int  # decode programs per launch: tasks x kv_heads


def plan(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    max_splits: int = 1,
    min_split_tokens: int = 1 << 30,
    starts: torch.Tensor | None = None,
) -> Plan:
    """Check the inputs (module doc) and plan one step: the compact task list of the requests'
    (split) token ranges, copied to the pages' device with the tables once. Every layer whose
    pages have the same shape, dtype and device then runs with `launch`."""
    if max_splits < 1 or min_split_tokens < 1:
        raise PagedInputError(f"max_splits and min_split_tokens must be positive, got "
                              f"{max_splits}, {min_split_tokens}")  # fmt: skip
    tables_h, lengths_h, starts_h = _check(q, k_pages, v_pages, tables, lengths, starts)
    dev = k_pages.device
    n = lengths_h.tolist()
    firsts = [0] * len(n) if starts_h is None else starts_h.tolist()
    tasks, merges, slots = plan_tasks(n, firsts, max_splits, min_split_tokens)
    pages, hkv, ps, d = k_pages.shape
    gp, dp = _padded(q.shape[1] // hkv, d)
    partial = dict(dtype=torch.float32, device=dev)
    return Plan(
        tasks=tasks.to(dev),
        merges=merges.to(dev),
        tables=tables.to(dev, torch.int32).contiguous(),
        pm=torch.empty((max(slots, 1), hkv, gp), **partial),
        pl=torch.empty((max(slots, 1), hkv, gp), **partial),
        pacc=torch.empty((max(slots, 1), hkv, gp, dp), **partial),
        shape=(pages, hkv, ps, d, q.shape[1]),
        dtype=k_pages.dtype,
        programs=tasks.shape[0] * hkv,
    )


def _padded(group: int, head_dim: int) -> tuple[int, int]:
    """(GP, DP): the group and head_dim padded to powers of two, at least ROWS and 16."""
    return max(ROWS, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))


def launch(
    p: Plan,
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    config: KernelConfig = KernelConfig(),
) -> torch.Tensor:
    """Run planned step `p` on one layer: q [batch, q_heads, head_dim] and that layer's pages
    (shape, dtype and device as planned, else PagedInputError). Returns out float32 [batch,
    q_heads, head_dim] on the pages' device."""
    pages, hkv, ps, d, hq = p.shape
    dev = p.tasks.device
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if (tuple(x.shape), x.dtype, x.device, x.is_contiguous()) != (
            (pages, hkv, ps, d), p.dtype, dev, True,
        ):  # fmt: skip
            raise PagedInputError(f"{name} is not the planned contiguous {p.dtype} "
                                  f"[{pages}, {hkv}, {ps}, {d}] on {dev}")  # fmt: skip
    if tuple(q.shape) != (p.tables.shape[0], hq, d) or q.device != dev:
        raise PagedInputError(f"q must be [{p.tables.shape[0]}, {hq}, {d}] on {dev}")
    if not scale > 0:
        raise PagedInputError(f"scale must be positive, got {scale}")
    qf = q.to(torch.float32).contiguous()
    if out is None:
        out = torch.empty(qf.shape, dtype=torch.float32, device=dev)
    if (out.shape, out.dtype, out.device, out.is_contiguous()) != (
        qf.shape,
        torch.float32,
        dev,
        True,
    ):
        raise PagedInputError(f"out must be contiguous float32 {list(qf.shape)} on {dev}")
    g = hq // hkv
    gp, dp = _padded(g, d)
    geometry = dict(HKV=hkv, G=g, GP=gp, D=d, DP=dp)
    _decode_kernel[(p.tasks.shape[0], hkv)](
        qf, k_pages, v_pages, p.tables, p.tasks, out, p.pm, p.pl, p.pacc, float(scale),
        p.tables.shape[1], PS=ps, BLOCK=config.block_tokens, PREC=config.precision,
        num_warps=config.num_warps, num_stages=config.num_stages, **geometry,
    )  # fmt: skip
    if p.merges.shape[0]:
        _merge_kernel[(p.merges.shape[0], hkv)](p.merges, out, p.pm, p.pl, p.pacc, **geometry)
    return out


def decode(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    max_splits: int = 1,
    min_split_tokens: int = 1 << 30,
    out: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
    config: KernelConfig = KernelConfig(),
) -> tuple[torch.Tensor, int]:
    """Decode attention of one query token per request (module doc): `plan` then `launch`, one
    launch over all (request, KV head, split) tasks and, if any request is split, one merge
    launch. Splits as `kernel.decode` cuts them. Returns (out float32 [batch, q_heads,
    head_dim], tasks: the number of decode programs, (request, split) ranges x kv_heads)."""
    p = plan(q, k_pages, v_pages, tables, lengths, max_splits, min_split_tokens, starts)
    return launch(p, q, k_pages, v_pages, scale, out, config), p.programs
