"""The cost model that picks a decode-attention route per step, and its machine profile.

The issue's form is T(route) = KV bytes / beta * max(1, C_min / C(route)) + dispatches * lambda
+ merge bytes / beta. Here the parallelism term is made explicit per dispatch, because on a few
cores what limits a dispatch is either the total bytes over all threads or how its tasks pack
onto the m threads (longest first, as the kernel takes them; with 3 equal tasks on 2 threads
one thread reads two of them):

    makespan    = bytes / m + longest task bytes * (1 - 1/m)     (list-scheduling bound)
    T(dispatch) = max(bytes / beta, makespan / beta_1) + lambda + tasks * tau
    T(route)    = sum of its dispatches + merge bytes / beta           (kernel routes)
    T(padded)   = padded bytes / beta_pad + lambda_pad                 (gather + SDPA)

beta: KV bytes/s the kernel streams with all threads; beta_1: with one thread; lambda: cost of one
dispatch (pool wake-up, Python call, planning); tau: cost per task; beta_pad, lambda_pad: the
padded route's rate over its padded bytes and its fixed cost. `spectrumkv bench calibrate`
measures them (and fits the split settings) on calibration seeds and writes a `MachineProfile`
JSON; `load_profile` reads it back (plain JSON, validated; nothing is unpickled).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .errors import PagedInputError

TILE = 32  # tokens per kernel tile; splits are whole tiles (as in _attention.c)
KERNEL_ROUTES = ("per-request", "split", "workqueue")
FIXED_ROUTES = (*KERNEL_ROUTES, "padded")


@dataclass(frozen=True)
class MachineProfile:
    """Measured constants of one machine (units: bytes/s, seconds) and the fitted split settings."""

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
    calibrated: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                ok = isinstance(value, bool)
            elif f.type == "int":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            else:
                ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
            if not ok:
                raise PagedInputError(f"MachineProfile.{f.name}: bad value {value!r}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def load_profile(path: str | Path) -> MachineProfile:
    """Read a profile written by `bench calibrate`; PagedInputError if malformed."""
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


def splits_of(n: int, max_splits: int, min_split_tokens: int) -> tuple[int, int]:
    """(splits, tokens per split) of an n-token request (n >= 1), as the kernel cuts it."""
    ns = min(max_splits, max(1, _ceil_div(n, min_split_tokens)))
    chunk = _ceil_div(_ceil_div(n, ns), TILE) * TILE
    return _ceil_div(n, chunk), chunk


def route_settings(route: str, p: MachineProfile) -> tuple[int, int]:
    """(max_splits, min_split_tokens) the kernel gets for a kernel route."""
    if route == "split":
        return p.split_splits, TILE
    if route in ("workqueue", "per-request"):
        return p.max_splits, p.min_split_tokens
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


def _dispatch(lengths: list[int], g: Geometry, p: MachineProfile, settings) -> tuple[float, int]:
    """Predicted seconds of one kernel dispatch, and its merge bytes."""
    total = longest = tasks = merge = 0
    head_bytes = g.token_bytes // g.kv_heads
    for n in lengths:
        ns, chunk = splits_of(n, *settings)
        total += n * g.token_bytes
        longest = max(longest, min(chunk, n) * head_bytes)
        tasks += ns * g.kv_heads
        if ns > 1:
            merge += ns * g.kv_heads * g.group * (g.head_dim + 2) * 4
    m = min(p.threads, tasks)
    # longest-first list scheduling on m threads ends by total/m + longest (1 - 1/m)
    makespan = total / m + longest * (1 - 1 / m)
    t = max(total / p.beta, makespan / p.beta_1) + p.lam + tasks * p.tau + merge / p.beta
    return t, merge


def predict(route: str, lengths: list[int], g: Geometry, p: MachineProfile) -> float:
    """Predicted seconds of one decode step of `route` over requests of these lengths."""
    if route == "padded":
        return len(lengths) * max(lengths) * g.token_bytes / p.beta_pad + p.lam_pad
    if route == "per-request":
        settings = route_settings(route, p)
        return sum(_dispatch([n], g, p, settings)[0] for n in lengths)
    return _dispatch(lengths, g, p, route_settings(route, p))[0]


def choose(lengths: list[int], g: Geometry, p: MachineProfile, routes=FIXED_ROUTES) -> str:
    """The route with the least predicted time (first of `routes` on ties)."""
    return min(routes, key=lambda r: predict(r, lengths, g, p))
