"""The paged KV cache: a pool of fixed-size pages shared by all layers, block tables, lengths.

Layout (per layer, for K and for V): `[pages, kv_heads, page_size, head_dim]` in the KV dtype
(float16 or bfloat16). A request owns a list of page ids (its block table); its token `t` lives
in page `table[t // page_size]` at offset `t % page_size`, in every layer. Pages come from a
free list in any order (tests shuffle it), so a table may point anywhere in the pool. A full pool
raises `CacheFullError` before anything changes; a request never touches another's pages.

Typical use by a decode engine, per request and step:

    cache.allocate(rid, n_prompt)                 # pages for the received prompt
    for layer: cache.write(layer, rid, 0, k, v)   # k, v: [kv_heads, n_prompt, head_dim]
    ...each decode step, for the batch `rids`:
    slots = cache.append(rids)                    # one more token each; returns where it goes
    for layer:
        cache.write_slots(layer, slots, k, v)     # k, v: [batch, kv_heads, head_dim]
        tables, lengths = cache.block_tables(rids)    # once per step, shared by all layers
        out = cache.decode_attention(q, layer, tables, lengths)   # [batch, q_heads, d] fp32
    cache.free(rid)

Sliding-window layers (Gemma-3, Mistral-style): every layer keeps the whole context in its pages
(one block table and length per request for all layers); a sliding layer's attention passes
`starts` (the first slot inside its window, per request) so it reads only [start, length).
Pages that fell out of every sliding layer's window are not freed early (their full-attention
layers still need them in a hybrid model like Gemma-3).
"""

from __future__ import annotations

import mmap
import random
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import kernel
from .errors import CacheFullError, PagedInputError

KV_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class PagedConfig:
    """Geometry of a page pool. `pages` pages of `page_size` tokens each, for every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    pages: int
    page_size: int = 16
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "head_dim", "pages", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PagedInputError(f"PagedConfig.{name} must be a positive int, got {value!r}")
        if self.dtype not in KV_DTYPES:
            raise PagedInputError(f"KV dtype must be float16 or bfloat16, got {self.dtype}")

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K plus V in one layer."""
        return 2 * self.kv_heads * self.page_size * self.head_dim * self.dtype.itemsize

    @classmethod
    def for_model(cls, hf_config: Any, pages: int, page_size: int = 16, dtype=torch.float16):
        """The geometry of a transformers model config (sliding-window layers included: their
        pages hold the whole context too; see the module doc)."""
        text = getattr(hf_config, "text_config", None) or hf_config
        heads = text.num_attention_heads
        return cls(
            layers=text.num_hidden_layers,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            pages=pages,
            page_size=page_size,
            dtype=dtype,
        )


class Slots(NamedTuple):
    """Where each request of a step writes its newest token: page ids and offsets, int64
    [batch]; rows: the same places as rows of a layer's pages viewed as [pages * kv_heads *
    page_size, head_dim], request-major then head, int64 [batch * kv_heads] (computed once per
    step, so each layer's write is one index_copy_)."""

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
    """A page pool for all layers, with per-request block tables and lengths (see module doc).
    The pool starts zero-filled and takes resident memory only as pages are first written."""

    def __init__(self, config: PagedConfig, shuffle_seed: int | None = None) -> None:
        c = self.config = config
        shape = (c.layers, c.pages, c.kv_heads, c.page_size, c.head_dim)
        self.k = _lazy_zeros(shape, c.dtype)
        self.v = _lazy_zeros(shape, c.dtype)
        self._free = list(range(c.pages - 1, -1, -1))  # pop() hands out page 0 first
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(self._free)
        self._pages: dict[Any, list[int]] = {}
        self._length: dict[Any, int] = {}

    # ---- bookkeeping ----

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def length(self, rid: Any) -> int:
        """Tokens held for request `rid`."""
        return self._length[self._known(rid)]

    def pages_of(self, rid: Any) -> list[int]:
        """A copy of `rid`'s block table (page ids in token order)."""
        return list(self._pages[self._known(rid)])

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

    def allocate(self, rid: Any, n_tokens: int) -> None:
        """Create request `rid` holding `n_tokens` (>= 0) tokens' worth of pages (contents
        undefined until written). CacheFullError if the pool lacks pages."""
        if rid in self._pages:
            raise PagedInputError(f"request {rid!r} already allocated")
        if not isinstance(n_tokens, int) or n_tokens < 0:
            raise PagedInputError(f"n_tokens must be an int >= 0, got {n_tokens!r}")
        self._pages[rid] = self._take(self._pages_for(n_tokens))
        self._length[rid] = n_tokens

    def extend(self, rid: Any, n_tokens: int) -> int:
        """Grow `rid` by `n_tokens` (>= 1); returns the position of the first new token.
        All-or-nothing: CacheFullError leaves the request and the pool as they were."""
        n = self._length[self._known(rid)]
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise PagedInputError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
        self._pages[rid] += self._take(self._pages_for(n + n_tokens) - len(self._pages[rid]))
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
        need = sum(1 for r in rids if self._length[r] % ps == 0)
        if need > len(self._free):
            raise CacheFullError(f"page pool full: {need} pages needed, {len(self._free)} free")
        pages, offsets = [], []
        for rid in rids:
            pos = self.extend(rid, 1)
            pages.append(self._pages[rid][pos // ps])
            offsets.append(pos % ps)
        pages_t, offsets_t = torch.tensor(pages), torch.tensor(offsets)
        heads = torch.arange(self.config.kv_heads)
        rows = (pages_t[:, None] * self.config.kv_heads + heads) * ps + offsets_t[:, None]
        return Slots(pages_t, offsets_t, rows.reshape(-1))

    def free(self, rid: Any) -> None:
        """Return `rid`'s pages to the pool and forget it."""
        self._free += reversed(self._pages.pop(self._known(rid)))
        del self._length[rid]

    # ---- data ----

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pages of one layer, [pages, kv_heads, page_size, head_dim] views."""
        if not 0 <= layer < self.config.layers:
            raise PagedInputError(f"layer {layer} out of range 0..{self.config.layers - 1}")
        return self.k[layer], self.v[layer]

    def _check_rows(self, k: torch.Tensor, v: torch.Tensor, lead: int) -> None:
        c = self.config
        want = (lead, c.kv_heads, c.head_dim)
        for name, x in (("k", k), ("v", v)):
            if x.dim() != 3 or (x.shape[0], x.shape[1], x.shape[2]) != want:
                raise PagedInputError(f"{name} must be {list(want)}, got {list(x.shape)}")
            if not x.is_floating_point():
                raise PagedInputError(f"{name} must be floating point, got {x.dtype}")

    def write(self, layer: int, rid: Any, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write tokens [start, start + n) of `rid` in `layer`; k, v: [kv_heads, n, head_dim]
        (any float dtype, converted to the KV dtype). E.g. a whole received prompt at start 0."""
        kp, vp = self.layer(layer)
        n = self._length[self._known(rid)]
        if k.dim() != 3:
            raise PagedInputError(f"k must be [kv_heads, n, head_dim], got {list(k.shape)}")
        count = k.shape[1]
        self._check_rows(k.transpose(0, 1), v.transpose(0, 1), count)
        if not isinstance(start, int) or start < 0 or start + count > n:
            raise PagedInputError(f"tokens [{start}, {start + count}) outside {rid!r}'s {n}")
        ps = self.config.page_size
        pos = torch.arange(start, start + count)
        table = torch.tensor(self._pages[rid], dtype=torch.int64)
        page, off = table[pos // ps], pos % ps
        kp[page, :, off] = k.transpose(0, 1).to(kp.dtype)
        vp[page, :, off] = v.transpose(0, 1).to(vp.dtype)

    def read(self, layer: int, rid: Any, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `rid`'s tokens [0, end) in `layer`, [kv_heads, end, head_dim] in the KV
        dtype: one gather of its pages (a copy; the token axis may be a strided view of it)."""
        kp, vp = self.layer(layer)
        n = self._length[self._known(rid)]
        if not isinstance(end, int) or not 0 <= end <= n:
            raise PagedInputError(f"tokens [0, {end}) outside {rid!r}'s {n}")
        c = self.config
        table = torch.tensor(self._pages[rid][: -(-end // c.page_size)], dtype=torch.int64)
        return tuple(
            x[table].transpose(0, 1).reshape(c.kv_heads, -1, c.head_dim)[:, :end] for x in (kp, vp)
        )

    def write_slots(self, layer: int, slots: Slots, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per request of a step; k, v: [batch, kv_heads, head_dim]."""
        kp, vp = self.layer(layer)
        self._check_rows(k, v, slots.pages.shape[0])
        if kernel.write_rows(kp, vp, slots.rows, k, v):
            return
        d = self.config.head_dim
        kp.view(-1, d).index_copy_(0, slots.rows, k.reshape(-1, d).to(kp.dtype))
        vp.view(-1, d).index_copy_(0, slots.rows, v.reshape(-1, d).to(vp.dtype))

    def block_tables(self, rids: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables int32 [batch, max pages] (unused entries -1) and lengths int32 [batch]
        of `rids`, in that order; the inputs of `decode_attention`."""
        tables = [self._pages[self._known(r)] for r in rids]
        width = max((len(t) for t in tables), default=0)
        out = torch.full((len(rids), max(width, 1)), -1, dtype=torch.int32)
        for i, t in enumerate(tables):
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        lengths = torch.tensor([self._length[r] for r in rids], dtype=torch.int32)
        return out, lengths

    def decode_attention(
        self, q: torch.Tensor, layer: int, tables: torch.Tensor, lengths: torch.Tensor,
        route: str = "adaptive", profile=None, scale: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Attention of one new query per request (q [batch, q_heads, head_dim]) over `layer`'s
        pages; tables, lengths from `block_tables`. Returns float32 [batch, q_heads, head_dim].
        See `routes.decode_attention` for routes and `cost.MachineProfile` for `profile`."""
        from .routes import decode_attention

        return decode_attention(q, *self.layer(layer), tables, lengths, route, scale, profile)
