"""The paged KV cache: a pool of fixed-size pages shared by all layers, block tables, lengths.

Layout (per layer, for K and for V): `[pages, kv_heads, page_size, head_dim]` in the KV dtype
(float16 or bfloat16). A request owns a list of page ids per page group (its block tables); its
token `t` lives in page `table[t // page_size]` at offset `t % page_size`, in every layer of the
group. Pages come from a free list in any order (tests shuffle it), so a table may point
anywhere in the pool. A full pool raises `CacheFullError` before anything changes; a request
never touches another's pages.

Typical use by a decode engine, per request and step:

    cache.allocate(rid, n_prompt)                 # pages for the received prompt
    for layer: cache.write(layer, rid, 0, k, v)   # k, v: [kv_heads, n_prompt, head_dim]
    ...each decode step, for the batch `rids`:
    slots = cache.append(rids)                    # one more token each; returns where it goes
    tables = [cache.block_tables(rids, g) for g in range(cache.n_groups)]  # once per step
    for layer:
        cache.write_slots(layer, slots, k, v)     # k, v: [batch, kv_heads, head_dim]
        out = cache.decode_attention(q, layer, *tables[cache.group_of(layer)])  # fp32
    cache.free(rid)

Sliding-window layers (`window_layers`: Gemma-3, Mistral-style) keep only their window. Layers
are cut into page groups of `group_size` layers each, full-attention layers and window layers
apart (group_size = gcd of the two counts: Gemma-3-270m's 3 full and 15 window layers make 6
groups of 3). A page id holds one page of each layer of a group, and every group has its own
block table per request, drawn from the one free list (as vLLM's hybrid allocator does). A window
layer's attention passes `starts` (the first slot inside its window, per request) so it reads
only [start, length); `release(rid, first_slot)` then hands the window groups' pages wholly
below that slot back to the pool (their table entries become -1). A model without window layers
has one group of all its layers: one table per request, as before.
"""

from __future__ import annotations

import math
import mmap
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import kernel
from .errors import CacheFullError, PagedInputError
from .reference import gather

KV_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PagedConfig:
    """Geometry of a page pool: `pages` page ids of `page_size` tokens each; a page id holds one
    page in each layer of the page group it is given to (see the module doc). `window_layers`:
    the sliding-window layers (indices, ascending), whose pages below a request's window are
    released."""

    layers: int
    kv_heads: int
    head_dim: int
    pages: int
    page_size: int = 16
    dtype: torch.dtype = torch.float16
    window_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "pages", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PagedInputError(f"PagedConfig.{name} must be a positive int, got {value!r}")
        if self.dtype not in KV_DTYPES:
            raise PagedInputError(f"KV dtype must be float16 or bfloat16, got {self.dtype}")
        w = self.window_layers
        if not isinstance(w, tuple) or any(
            not isinstance(i, int) or not 0 <= i < self.layers for i in w
        ) or list(w) != sorted(set(w)):  # fmt: skip
            raise PagedInputError(f"window_layers must be ascending distinct layer indices in "
                                  f"0..{self.layers - 1}, got {w!r}")  # fmt: skip

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K plus V in one layer."""
        return 2 * self.kv_heads * self.page_size * self.head_dim * self.dtype.itemsize

    @property
    def group_size(self) -> int:
        """Layers per page group: the gcd of the full-attention and window layer counts."""
        return math.gcd(self.layers - len(self.window_layers), len(self.window_layers))

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """The page groups' layers: full-attention groups first, then window groups."""
        window = set(self.window_layers)
        full = [i for i in range(self.layers) if i not in window]
        g = self.group_size
        return tuple(tuple(x[i : i + g]) for x in (full, self.window_layers)
                     for i in range(0, len(x), g))  # fmt: skip

    @property
    def id_bytes(self) -> int:
        """Bytes one page id holds: a page of K plus V in each layer of its group."""
        return self.page_bytes * self.group_size

    @classmethod
    def for_model(
        cls, hf_config: Any, pages: int, page_size: int = 16, dtype=torch.float16,
        window_layers: tuple[int, ...] = (),
    ):  # fmt: skip
        """The geometry of a transformers model config; `window_layers`: its sliding-window
        layers whose out-of-window pages are to be released (none: every layer keeps the whole
        context)."""
        text = getattr(hf_config, "text_config", None) or hf_config
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            pages=pages,
            page_size=page_size,
            dtype=dtype,
            window_layers=tuple(window_layers),
        )


class Slots(NamedTuple):
    """Where each request of a step writes its newest token, per page group: page ids int64
    [groups, batch] and offsets int64 [batch]; rows: the same places as rows of a layer's pages
    viewed as [pages * kv_heads * page_size, head_dim], request-major then head, int64 [groups,
    batch * kv_heads] (computed once per step, so each layer's write is one index_copy_)."""

    pages: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled tensor in anonymous memory (mmap): the OS backs a page with memory only
    once it is written, so a large pool costs what its busiest moment used, not its size."""
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


class PagedKVCache:
    """A page pool for all layers, with per-request block tables (one per page group) and
    lengths (see module doc). The pool starts zero-filled and takes resident memory only as
    pages are first written."""

    def __init__(self, config: PagedConfig, shuffle_seed: int | None = None) -> None:
        c = self.config = config
        shape = (c.group_size, c.pages, c.kv_heads, c.page_size, c.head_dim)
        self.k = _lazy_zeros(shape, c.dtype)
        self.v = _lazy_zeros(shape, c.dtype)
        self._free = list(range(c.pages - 1, -1, -1))  # pop() hands out page 0 first
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self._free)
        groups = c.groups
        # layer -> (its group, its index in the group = its slice of self.k / self.v)
        self._where = {layer: (g, j) for g, ls in enumerate(groups) for j, layer in enumerate(ls)}
        self._window = [ls[0] in c.window_layers for ls in groups]  # per group
        self._pages: dict[Any, list[list[int]]] = {}  # rid -> a block table per group
        self._length: dict[Any, int] = {}
        self._released: dict[Any, int] = {}  # rid -> window table entries below it are -1

    # ---- bookkeeping ----

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def n_groups(self) -> int:
        return len(self._window)

    def group_of(self, layer: int) -> int:
        """The page group of `layer` (whose block table its attention takes)."""
        self.layer(layer)  # range check
        return self._where[layer][0]

    def length(self, rid: Any) -> int:
        """Tokens held for request `rid`."""
        return self._length[self._known(rid)]

    def pages_of(self, rid: Any, group: int = 0) -> list[int]:
        """A copy of `rid`'s block table in `group` (page ids in token order, -1 released)."""
        return list(self._pages[self._known(rid)][group])

    def pages_needed(self, n_tokens: int, window: int = 0) -> int:
        """Page ids a request holds at most while it grows to `n_tokens` slots, when its
        window layers' attention sees at most `window` slots (0: no window, whole contexts):
        a window group holds the pages that [first visible slot, newest slot] spans."""
        whole = self._pages_for(n_tokens)
        held = whole if window <= 0 else min(whole, self._pages_for(window + 1) + 1)
        return sum(held if w else whole for w in self._window)

    def _known(self, rid: Any) -> Any:
        if rid not in self._pages:
            raise PagedInputError(f"unknown request {rid!r}")
        return rid

    def _take(self, n_pages: int) -> list[int]:
        if n_pages > len(self._free):
            raise CacheFullError(
                f"page pool full: {n_pages} pages needed, {len(self._free)} of "
                f"{self.config.pages} free"
            )
        return [self._free.pop() for _ in range(n_pages)]

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.config.page_size)

    def allocate(self, rid: Any, n_tokens: int, window_start: int = 0) -> None:
        """Create request `rid` holding `n_tokens` (>= 0) tokens' worth of pages (contents
        undefined until written); window groups only from slot `window_start` on (the first
        slot its first query's window sees: pages wholly below it are never taken).
        CacheFullError if the pool lacks pages."""
        if rid in self._pages:
            raise PagedInputError(f"request {rid!r} already allocated")
        if not isinstance(n_tokens, int) or n_tokens < 0:
            raise PagedInputError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
        if not isinstance(window_start, int) or not 0 <= window_start <= n_tokens:
            raise PagedInputError(f"window_start must be an int in [0, {n_tokens}], got "
                                  f"{window_start!r}")  # fmt: skip
        n, skip = self._pages_for(n_tokens), window_start // self.config.page_size
        take = self._take(sum(n - skip if w else n for w in self._window))
        tables = []
        for w in self._window:
            cut = skip if w else 0
            tables.append([-1] * cut + take[: n - cut])
            del take[: n - cut]
        self._pages[rid] = tables
        self._length[rid] = n_tokens
        self._released[rid] = skip

    def release(self, rid: Any, first_slot: int) -> int:
        """Return the window groups' pages of `rid` that lie wholly below slot `first_slot`
        (no window query of it reads them again) to the pool; their entries become -1. Returns
        how many page ids went back. Full-attention groups keep every page."""
        tables = self._pages[self._known(rid)]
        below = min(first_slot, self._length[rid]) // self.config.page_size
        done = self._released[rid]  # window entries below it are -1 already, none above
        if below <= done:
            return 0
        windows = [t for t, w in zip(tables, self._window, strict=True) if w]
        for table in windows:
            self._free += table[done:below]
            table[done:below] = [-1] * (below - done)
        self._released[rid] = below
        return len(windows) * (below - done)

    def extend(self, rid: Any, n_tokens: int) -> int:
        """Grow `rid` by `n_tokens` (>= 1); returns the position of the first new token.
        All-or-nothing: CacheFullError leaves the request and the pool as they were."""
        n = self._length[self._known(rid)]
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise PagedInputError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
        tables = self._pages[rid]
        more = self._pages_for(n + n_tokens) - len(tables[0])
        take = self._take(more * len(tables))
        for i, table in enumerate(tables):
            table += take[i * more : (i + 1) * more]
        self._length[rid] = n + n_tokens
        return n

    def append(self, rids: list[Any]) -> Slots:
        """One more token for each request of a decode step (all-or-nothing across the batch);
        returns where each new token goes, for `write_slots`."""
        for rid in rids:
            self._known(rid)
        if len(set(rids)) != len(rids):
            raise PagedInputError("a request appears twice in one step")
        ps = self.config.page_size
        need = self.n_groups * sum(1 for r in rids if self._length[r] % ps == 0)
        if need > len(self._free):
            raise CacheFullError(f"page pool full: {need} pages needed, {len(self._free)} free")
        pages, offsets = [], []
        for rid in rids:
            pos = self.extend(rid, 1)
            pages.append([table[pos // ps] for table in self._pages[rid]])
            offsets.append(pos % ps)
        pages_t = torch.tensor(pages, dtype=torch.int64).reshape(len(rids), -1).T.contiguous()
        offsets_t = torch.tensor(offsets, dtype=torch.int64)
        heads = torch.arange(self.config.kv_heads)
        rows = (pages_t[:, :, None] * self.config.kv_heads + heads) * ps + offsets_t[:, None]
        return Slots(pages_t, offsets_t, rows.reshape(self.n_groups, -1))

    def free(self, rid: Any) -> None:
        """Return `rid`'s pages to the pool and forget it."""
        for table in reversed(self._pages.pop(self._known(rid))):
            self._free += [p for p in reversed(table) if p >= 0]
        del self._length[rid], self._released[rid]

    # ---- data ----

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pages of one layer, [pages, kv_heads, page_size, head_dim] views (a page
        id's page there belongs to this layer only while the id is in the layer's group)."""
        if not isinstance(layer, int) or not 0 <= layer < self.config.layers:
            raise PagedInputError(f"layer {layer} out of range 0..{self.config.layers - 1}")
        j = self._where[layer][1]
        return self.k[j], self.v[j]

    def _check_rows(self, k: torch.Tensor, v: torch.Tensor, lead: int) -> None:
        c = self.config
        want = (lead, c.kv_heads, c.head_dim)
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 3 or (x.shape[0], x.shape[1], x.shape[2]) != want:
                raise PagedInputError(f"{name} must be {list(want)}, got {list(x.shape)}")
            if not x.is_floating_point():
                raise PagedInputError(f"{name} must be floating point, got {x.dtype}")

    def _table(self, layer: int, rid: Any, start: int, end: int) -> torch.Tensor:
        """`rid`'s page ids of `layer`'s group for tokens [start, end) (checked: inside its
        length, none released), int64 [pages]."""
        n = self._length[self._known(rid)]
        if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start <= end <= n:
            raise PagedInputError(f"tokens [{start}, {end}) outside {rid!r}'s {n}")
        ps = self.config.page_size
        table = self._pages[rid][self._where[layer][0]][: self._pages_for(end)]
        if any(p < 0 for p in table[start // ps :]):
            raise PagedInputError(f"tokens [{start}, {end}) of {rid!r} reach a released page")
        return torch.tensor(table, dtype=torch.int64)

    def write(self, layer: int, rid: Any, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write tokens [start, start + n) of `rid` in `layer`; k, v: [kv_heads, n, head_dim]
        (any float dtype, converted to the KV dtype). E.g. a whole received prompt at start 0."""
        kp, vp = self.layer(layer)
        if k.dim() != 3:
            raise PagedInputError(f"k must be [kv_heads, n, head_dim], got {list(k.shape)}")
        count = k.shape[1]
        self._check_rows(k.transpose(0, 1), v.transpose(0, 1), count)
        if not isinstance(start, int):
            raise PagedInputError(f"start must be an int, got {start!r}")
        table = self._table(layer, rid, start, start + count)
        ps, heads = self.config.page_size, torch.arange(self.config.kv_heads)
        pos = torch.arange(start, start + count)
        page, off = table[pos // ps], pos % ps
        rows = ((page[:, None] * heads.numel() + heads) * ps + off[:, None]).reshape(-1)
        # [n, kv_heads, head_dim], views unless the dtype changes
        k, v = k.transpose(0, 1).to(kp.dtype), v.transpose(0, 1).to(vp.dtype)
        if kernel.write_rows(kp, vp, rows, k, v):  # no OpenMP region, no temporaries
            return
        kp[page, :, off] = k
        vp[page, :, off] = v

    def read(
        self, layer: int, rid: Any, end: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `rid`'s tokens [start, end) in `layer`, [kv_heads, end - start, head_dim]
        in the KV dtype: one gather of its pages (a copy; the token axis may be a strided view
        of it)."""
        table = self._table(layer, rid, start, end)
        return tuple(gather(x, table, end, start) for x in self.layer(layer))

    def write_slots(self, layer: int, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per request of a step; k, v: [batch, kv_heads, head_dim]."""
        kp, vp = self.layer(layer)
        self._check_rows(k, v, slots.offsets.shape[0])
        rows = slots.rows[self._where[layer][0]]
        if kernel.write_rows(kp, vp, rows, k, v):
            return
        d = self.config.head_dim
        kp.view(-1, d).index_copy_(0, rows, k.reshape(-1, d).to(kp.dtype))
        vp.view(-1, d).index_copy_(0, rows, v.reshape(-1, d).to(vp.dtype))

    def block_tables(self, rids: list[Any], group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables int32 [batch, max pages] of page `group` (unused and released entries
        -1) and lengths int32 [batch] of `rids`, in that order; the inputs of
        `decode_attention` for the group's layers."""
        tables = [self._pages[self._known(r)][group] for r in rids]
        width = max((len(t) for t in tables), default=0)
        out = torch.full((len(rids), max(width, 1)), -1, dtype=torch.int32)
        window = self._window[group]
        for i, (r, t) in enumerate(zip(rids, tables, strict=True)):
            lo = self._released[r] if window else 0  # below it: -1, as `out` starts
            out[i, lo : len(t)] = torch.tensor(t[lo:], dtype=torch.int32)
        lengths = torch.tensor([self._length[r] for r in rids], dtype=torch.int32)
        return out, lengths

    def decode_attention(
        self, q: torch.Tensor, layer: int, tables: torch.Tensor, lengths: torch.Tensor,
        route: str = "adaptive", profile=None, scale: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention of one new query per request (q [batch, q_heads, head_dim]) over `layer`'s
        pages; tables, lengths from `block_tables` of the layer's group (`group_of`). Returns
        float32 [batch, q_heads, head_dim]. See `routes.decode_attention` for routes and
        `cost.MachineProfile` for `profile`."""
        from .routes import decode_attention

        return decode_attention(q, *self.layer(layer), tables, lengths, route, scale, profile)
