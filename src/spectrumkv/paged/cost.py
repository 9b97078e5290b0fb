"""The cost model that picks a decode-attention route per step, and its machine profile.

The issue's form is T(route) = KV bytes / beta * max(1, C_min / C(route)) + dispatches * lambda
+ merge bytes / beta. Here the parallelism term is computed from how a dispatch's tasks really
land on the m threads, because on a few cores that decides the time: the kernel takes its tasks
longest first from one counter, so the per-thread loads are those of LPT list scheduling
(simulated exactly, per group of equal tasks), and while k threads are still busy they stream
at min(beta, k * beta_1) together (3 equal heads on 2 threads: both stream, then one alone):

    dispatch    = sum over phases (k threads busy) of bytes read in the phase / min(beta, k beta_1)
    stream      = sum of the route's dispatches + merge bytes / beta_1 (the caller merges)
    T(route)    = scale[route] * stream + dispatches * lambda + tasks * tau   (kernel routes)
    T(padded)   = padded bytes / beta_pad + lambda_pad                        (gather + SDPA)

beta: KV bytes/s the kernel streams with all threads; beta_1: with one thread; lambda: cost of
one hot dispatch (Python entry, checks, waking spinning helpers); tau: cost per task;
scale[route]: a per-route factor fitted on the calibration cases (what the terms above miss:
e.g. how well a route's access pattern streams); beta_pad, lambda_pad: the padded route's rate over
its padded bytes and its fixed cost. `spectrumkv bench calibrate` measures beta, beta_1 and the
padded constants, fits lambda, tau and the per-route scales by relative least squares over every
kernel run on the calibration seeds, picks the split settings there, and writes a
`MachineProfile` JSON; `load_profile` reads it back (plain JSON, validated; nothing unpickled).
"""

from __future__ import annotations

import functools
import heapq
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from . import kernel
from .errors import PagedInputError

TILE = 32  # tokens per kernel tile; splits are whole tiles (as in _attention.c)
TASK_FLOATS, MAX_ROWS = 16 * 256, 64  # a task's buffers (as in _attention.c)
FUSED_TASKS_PER_THREAD = 4  # (as in _attention.c)
MAX_PARTS = 16  # partials per request on the part grid (as in _attention.c)
KERNEL_ROUTES = ("per-request", "split", "workqueue")
FIXED_ROUTES = (*KERNEL_ROUTES, "padded")
KV_DTYPES = ("bfloat16", "float16")  # the page dtypes a profile is calibrated on
PROFILE_DIR = Path.home() / ".cache" / "spectrumkv"


@dataclass(frozen=True)
class MachineProfile:
    """Measured constants of one machine (units: bytes/s, seconds), the fitted per-route scales
    (dimensionless) and the fitted split settings, for KV pages of one dtype (`dtype`: each
    dtype runs its own kernel, e.g. VDPBF16PS for bf16 and F16C conversions for fp16, so their
    rates and best splits differ: calibrate each dtype you serve)."""

    beta: float = 12e9
    beta_1: float = 7e9
    lam: float = 30e-6
    tau: float = 0.5e-6
    beta_pad: float = 1.5e9
    lam_pad: float = 100e-6
    threads: int = 2
    min_split_tokens: int = 2048  # workqueue / per-request: a split holds at least this many
    max_splits: int = 16  # ... and a request has at most this many splits
    split_splits: int = 8  # split route: every request in this many splits
    scale_per_request: float = 1.0
    scale_split: float = 1.0
    scale_workqueue: float = 1.0
    calibrated: bool = False
    # every kernel route keeps one partial per `part_tokens` tokens of a request (`cut`): a
    # request's attention output is then the same bits whatever the route and the batch it
    # decodes in (bf16 models decode batch-invariantly with adaptive too); False: one partial
    # per split range (the ranges, and so the bits, depend on the route)
    batch_invariant: bool = True
    # tokens per partial when batch_invariant (a multiple of TILE): measured on the SmolLM2
    # shape against one partial per range, 256 cost 5-10 %, 512 3-5 %, 1024 0-2 % (RESULTS)
    part_tokens: int = 1024
    # a task may cover several KV heads of a request (`task_heads`); False: one head per task
    # always. Calibrated per page dtype: on the Zen 4 VM fp16 pages (F16C conversions) ran
    # 14-24 % faster with one head per task at batch 8-16, bf16 pages 14-17 % slower (RESULTS)
    fuse_heads: bool = True
    # with fuse_heads, the time of a dispatch whose tasks take one KV head each (too few
    # pieces to fuse: one request, per-request dispatches) relative to fused tasks over the
    # same bytes; measured by `bench calibrate` (bf16 pages on the Zen 4 VM: 1.14-1.17), >= 1
    one_head_scale: float = 1.0
    dtype: str = "bfloat16"  # the KV page dtype it was calibrated on (KV_DTYPES)
    # the machine it was calibrated on (`this_machine()`); "" in profiles that do not say
    # (written before it was recorded): those are taken on any machine
    machine: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "machine":
                ok = isinstance(value, str) and len(value) <= 256
            elif f.type == "str":
                ok = value in KV_DTYPES
            elif f.type == "bool":
                ok = isinstance(value, bool)
            elif f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            else:
                ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
            if not ok:
                raise PagedInputError(f"MachineProfile.{f.name}: bad value {value!r}")
        if self.part_tokens % TILE:
            raise PagedInputError(f"MachineProfile.part_tokens must be a multiple of {TILE}")

    def scale(self, route: str) -> float:
        return getattr(self, "scale_" + route.replace("-", "_"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def this_machine() -> str:
    """What a profile is calibrated for: the CPU model (/proc/cpuinfo's first "model name")
    and the decode kernel this process runs (paged.kernel.isa()), e.g. "AMD EPYC / avx512bf16".
    A profile measured on another CPU, or with another kernel, ranks routes by rates that are
    not this machine's."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            model = next(names, model)
    except OSError:
        pass
    return f"{model} / {kernel.isa() if kernel.AVAILABLE else 'torch'}"


def dtype_name(dtype: torch.dtype | str) -> str:
    """The profile name of a page dtype (torch.bfloat16 or "bfloat16" -> "bfloat16");
    PagedInputError outside KV_DTYPES."""
    name = str(dtype).removeprefix("torch.")
    if name not in KV_DTYPES:
        raise PagedInputError(f"no attention profile for {name} pages; use one of {KV_DTYPES}")
    return name


def default_profile_path(dtype: torch.dtype | str) -> Path:
    """Where `bench calibrate` writes, and the engine and `bench attention` look for, this
    machine's profile for `dtype` pages."""
    return PROFILE_DIR / f"attention-profile-{dtype_name(dtype)}.json"


def profile_for(dtype: torch.dtype | str, path: str | Path | None = None) -> MachineProfile | None:
    """The profile for `dtype` pages: read from `path` (PagedInputError if it is missing,
    malformed, or calibrated on another dtype or another machine), or with no path from
    default_profile_path(dtype) if that exists, else None (the caller runs on
    MachineProfile()'s uncalibrated defaults)."""
    name = dtype_name(dtype)
    if path is None:
        path = default_profile_path(name)
        if not path.exists():
            return None
    profile = load_profile(path)
    if profile.dtype != name:
        raise PagedInputError(
            f"machine profile {path} was calibrated on {profile.dtype} pages, not {name}: "
            f"run `spectrumkv bench calibrate --dtype {name}`"
        )
    here = this_machine()
    if profile.machine and profile.machine != here:
        raise PagedInputError(
            f"machine profile {path} was calibrated on {profile.machine!r}, this machine is "
            f"{here!r}: run `spectrumkv bench calibrate --dtype {name}` here"
        )
    return profile


def load_profile(path: str | Path) -> MachineProfile:
    """Read a profile written by `bench calibrate`; PagedInputError if malformed. Fields a
    profile lacks take their defaults (older profiles have no per-route scales: 1.0, and no
    dtype: bfloat16, the calibration's default dtype)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise PagedInputError(f"cannot read machine profile {path}: {e}") from None
    names = {f.name for f in fields(MachineProfile)}
    if not isinstance(data, dict) or not set(data) <= names:
        raise PagedInputError(f"machine profile {path} has unknown fields")
    return MachineProfile(**data)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cut(n: int, max_splits: int, min_split_tokens: int, part_tokens: int = 0):
    """(ranges, tokens per range, partials) of an n-token span (n >= 1), as the kernel cuts it:
    min(max_splits, ceil(n / min_split_tokens)) ranges of whole 32-token tiles, one partial
    each; or, with part_tokens > 0, ranges of whole parts (as even as whole parts allow, never
    more ranges than parts) and one partial per part: parts of part_tokens tokens, or past
    MAX_PARTS of them, MAX_PARTS equal parts of whole tiles (the partials stay O(1) in n)."""
    ns = min(max_splits, max(1, _ceil_div(n, min_split_tokens)))
    if part_tokens:
        parts = _ceil_div(n, part_tokens)
        if parts > MAX_PARTS:
            part_tokens = _ceil_div(_ceil_div(n, MAX_PARTS), TILE) * TILE
            parts = _ceil_div(n, part_tokens)
        per = _ceil_div(parts, min(ns, parts))
        return _ceil_div(parts, per), per * part_tokens, parts
    chunk = _ceil_div(_ceil_div(n, ns), TILE) * TILE
    ns = _ceil_div(n, chunk)
    return ns, chunk, ns


def splits_of(n: int, max_splits: int, min_split_tokens: int) -> tuple[int, int]:
    """(splits, tokens per split) of an n-token request (n >= 1), one partial per split."""
    return cut(n, max_splits, min_split_tokens)[:2]


def route_settings(route: str, p: MachineProfile) -> tuple[int, int, int]:
    """(max_splits, min_split_tokens, part_tokens) the kernel gets for a kernel route
    (part_tokens 0 unless the profile is batch_invariant)."""
    part = p.part_tokens if p.batch_invariant else 0
    if route == "split":
        return p.split_splits, TILE, part
    if route in ("workqueue", "per-request"):
        return p.max_splits, p.min_split_tokens, part
    raise PagedInputError(f"not a kernel route: {route!r}")


@dataclass(frozen=True)
class Geometry:
    """What a step's cost depends on besides its lengths."""

    kv_heads: int
    group: int
    head_dim: int
    itemsize: int = 2

    @property
    def token_bytes(self) -> int:
        """K plus V bytes of one token over all KV heads."""
        return 2 * self.kv_heads * self.head_dim * self.itemsize


def lpt_loads(tasks: dict[int, int], m: int) -> list[int]:
    """Per-thread loads (ascending) when `tasks` (size -> count) are taken longest first by m
    threads, each next task going to the least-loaded thread (what the kernel's shared counter
    does when task time is proportional to size). Exact; a group of equal tasks costs O(m) once
    the loads are within one task of each other."""
    loads = [0] * m
    for size, count in sorted(tasks.items(), reverse=True):
        while count and max(loads) - loads[0] >= size:
            heapq.heapreplace(loads, loads[0] + size)
            count -= 1
        if count:  # loads within one task: every round of m tasks gives each thread one
            rounds, rest = divmod(count, m)
            loads = sorted(x + rounds * size for x in loads)
            loads[:rest] = [x + size for x in loads[:rest]]
            heapq.heapify(loads)
    return sorted(loads)


def stream_seconds(loads: list[int], p: MachineProfile) -> float:
    """Time to read per-thread `loads` (bytes, ascending) while busy threads share bandwidth:
    with k threads busy they read min(beta, k * beta_1) bytes/s together."""
    t, prev, m = 0.0, 0, len(loads)
    for i, x in enumerate(loads):
        busy = m - i
        t += busy * (x - prev) / min(p.beta, busy * p.beta_1)
        prev = x
    return t


def merge_bytes(n_partials: int, g: Geometry) -> int:
    """Bytes the merge reads for `n_partials` partials (of requests with more than one):
    float32 acc, m and l per query head."""
    return n_partials * g.kv_heads * g.group * (g.head_dim + 2) * 4


def task_heads(g: Geometry, pieces: int, threads: int, fuse: bool = True) -> list[int]:
    """KV heads of each task of one (request, split) piece, as the kernel groups them when a
    dispatch has `pieces` pieces on `threads` threads: all heads whose queries and accumulators
    fit a task's buffers, unless that leaves fewer than FUSED_TASKS_PER_THREAD tasks per thread
    on more than one thread, or `fuse` is False (then one head per task)."""
    hb = min(g.kv_heads, TASK_FLOATS // (g.group * g.head_dim), MAX_ROWS // g.group)
    if (
        not fuse
        or threads > 1
        and pieces * _ceil_div(g.kv_heads, hb) < FUSED_TASKS_PER_THREAD * threads
    ):
        hb = 1
    full, rest = divmod(g.kv_heads, hb)
    return [hb] * full + ([rest] if rest else [])


def dispatch_terms(lengths, g: Geometry, p: MachineProfile, settings) -> tuple[float, int, int]:
    """One kernel dispatch over requests of these lengths: (stream seconds, tasks, merge bytes)."""
    head_bytes = g.token_bytes // g.kv_heads
    pieces = []  # (ranges, tokens per range, tokens of the last range) per request
    n_partials = 0  # of requests with more than one
    for n in lengths:
        ns, chunk, parts = cut(n, *settings)
        pieces.append((ns, chunk, n - (ns - 1) * chunk))
        n_partials += parts if parts > 1 else 0
    n_pieces = sum(ns for ns, _, _ in pieces)
    heads = task_heads(g, n_pieces, p.threads, p.fuse_heads)
    tasks: dict[int, int] = {}
    for ns, chunk, last in pieces:
        for h in heads:
            tasks[last * h * head_bytes] = tasks.get(last * h * head_bytes, 0) + 1
            if ns > 1:
                size = chunk * h * head_bytes
                tasks[size] = tasks.get(size, 0) + ns - 1
    merge = merge_bytes(n_partials, g)
    n_tasks = n_pieces * len(heads)
    stream = stream_seconds(lpt_loads(tasks, min(p.threads, n_tasks)), p)
    if p.fuse_heads and g.kv_heads > 1 and heads[0] == 1:  # could not fuse: slower tasks
        stream *= p.one_head_scale
    return stream, n_tasks, merge


def route_terms(route: str, lengths, g: Geometry, p: MachineProfile) -> tuple[float, int, int]:
    """(stream + merge seconds, dispatches, tasks) of a kernel route: the terms the fitted
    constants (lambda, tau, scale) multiply."""
    settings = route_settings(route, p)
    groups = [[n] for n in lengths] if route == "per-request" else [lengths]
    stream = tasks = 0
    for group in groups:
        s, t, merge = dispatch_terms(group, g, p, settings)
        stream += s + merge / p.beta_1
        tasks += t
    return stream, len(groups), tasks


def predict(route: str, lengths, g: Geometry, p: MachineProfile) -> float:
    """Predicted seconds of one decode step of `route` over requests of these lengths."""
    if route == "padded":
        return len(lengths) * max(lengths) * g.token_bytes / p.beta_pad + p.lam_pad
    stream, dispatches, tasks = route_terms(route, lengths, g, p)
    return p.scale(route) * stream + dispatches * p.lam + tasks * p.tau


def lower_bound(route: str, lengths, g: Geometry, p: MachineProfile) -> float:
    """A cheap lower bound of `predict` for a kernel route: every dispatch streams its bytes at
    most at beta (no schedule simulation), dispatches, tasks and merges as in `route_terms`."""
    cuts = [cut(n, *route_settings(route, p)) for n in lengths]
    pieces = [ns for ns, _, _ in cuts]
    n_partials = sum(parts for _, _, parts in cuts if parts > 1)
    if route == "per-request":  # one dispatch per request
        tasks = sum(ns * len(task_heads(g, ns, p.threads, p.fuse_heads)) for ns in pieces)
    else:
        tasks = sum(pieces) * len(task_heads(g, sum(pieces), p.threads, p.fuse_heads))
    merge = merge_bytes(n_partials, g)
    stream = sum(lengths) * g.token_bytes / p.beta + merge / p.beta_1
    dispatches = len(lengths) if route == "per-request" else 1
    return p.scale(route) * stream + dispatches * p.lam + tasks * p.tau


@functools.lru_cache(maxsize=64)
def _choose(lengths: tuple, g: Geometry, p: MachineProfile, routes: tuple) -> str:
    # per-request (a simulated dispatch per request: most of a plan's time at large batches)
    # is predicted only when its lower bound does not already exceed the best other route's
    # time; the choice is the same as predicting every route
    times = {r: predict(r, lengths, g, p) for r in routes if r != "per-request"}
    best = min(times.values(), default=math.inf)
    # on a tie (one request: the same dispatch) per-request loses: it adds a Python loop
    if "per-request" in routes and lower_bound("per-request", lengths, g, p) < best * (1 - 1e-9):
        times["per-request"] = predict("per-request", lengths, g, p)
    return min((r for r in routes if r in times), key=lambda r: (times[r], r == "per-request"))


def choose(lengths, g: Geometry, p: MachineProfile, routes=FIXED_ROUTES) -> str:
    """The route with the least predicted time (on a tie the first of `routes`, per-request
    last: with one request it is the same dispatch plus a Python loop). Plans are memoized
    (last 64 distinct steps): every layer of a decode step has the same lengths, so a model
    step plans once. `clear_plans()` forgets them. With `p.batch_invariant` the choice is among
    the kernel routes of `routes` (if any): each computes a request's output to the same bits
    (`cut`), so the choice cannot change them (`padded`, torch SDPA, would)."""
    if p.batch_invariant and any(r in KERNEL_ROUTES for r in routes):
        routes = [r for r in routes if r in KERNEL_ROUTES]
    return _choose(tuple(lengths), g, p, tuple(routes))


def clear_plans() -> None:
    """Forget memoized plans (benchmarks: charge planning to every timed step)."""
    _choose.cache_clear()
