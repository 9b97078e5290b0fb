"""Model runner: one batched forward of the HF model per decode step, attention over the paged
KV cache.

Everything but attention runs as the HF model's own code (embeddings, RoPE at each request's
original next position, norms, MLP, LM head) on a batch of B rows of one token each. Attention is
routed through transformers' `AttentionInterface` to `_paged_attention`, registered under the
name `ATTENTION`: it writes each row's new K/V (post-RoPE, rounded to the KV dtype) into that
request's next page slot (one compiled copy for K and V when the compute and KV dtypes agree:
paged.kernel.write_rows) and runs the paged decode kernel over the block tables (the route is
chosen once per step; `split` and `workqueue` then call the kernel directly from each layer,
without run_route's per-call planning, ~25 us a layer). The model's
attention is switched to `ATTENTION` only during `step` (engines.attention; other callers of
the same model, e.g. a local prefill, keep their usual attention); the runner's
contract is therefore that all model calls on this engine happen on one thread, the engine's.

The model computes in its load dtype (engines.hf.load: float32, or bfloat16 with packed
linears, engines.packed); the pages stay in the KV dtype and the kernel accumulates in float32,
whatever the compute dtype. Measured parts of a step: `python -m spectrumkv.serve.step_bench`.

Llama-family models (LlamaForCausalLM with a static RoPE and SiLU MLP, e.g. SmolLM2) take a
hand-written step instead (engines.llama_step): the same modules and weights, the same arithmetic
(bit-identical to this HF path with the torch row ops, rounding-level differences with the
compiled ones: engines.rowops), ~30 fewer small torch ops per layer; attention goes to the same
`_attend`. Every other architecture runs the HF model's own forward, so any model the paged
cache accepts works without per-architecture code (`fast=False` forces it for all).

Sliding-window layers (Gemma-3): slots are in position order in every layer (a received
payload's dropped tokens take no slot; a sliding layer's payload frame holds only the window's
suffix of the slots, which is where it is written). Each step computes, per request, the first
slot whose original position lies inside the window of the query (position > query position -
window) and passes it to the route as `starts` for the sliding layers only; full-attention
layers read every slot. The sliding layers are the cache's window layers (`pool_config`): a
prompt is written to them from its first query's window on, and each step releases their pages
wholly below the new `starts` (paged.cache), so they hold about a window per request, not the
context. The runner keeps each request's prompt positions for this (`free` forgets them).
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from ..engines import llama_step
from ..engines.attention import use_attention
from ..engines.hf import Engine
from ..kv import LayerKV
from ..paged import cost, kernel
from ..paged.cache import PagedConfig, PagedKVCache, Slots
from ..paged.errors import PagedInputError
from ..paged.routes import ROUTES, run_route
from .chunk_attention import Chunk, ChunkStep, chunk_attention

ATTENTION = "spectrumkv_paged"


@dataclass
class _Step:
    """What the attention function needs during one batched forward."""

    cache: PagedKVCache
    slots: Slots
    tables: list[torch.Tensor]  # per layer: its page group's block tables
    lengths: torch.Tensor
    route: str  # a fixed route, chosen once per step
    profile: cost.MachineProfile
    starts: torch.Tensor | None  # int32 [B]: sliding layers' first visible slot per request
    sliding: frozenset[int]  # the sliding-window layers
    # (max_splits, min_split_tokens, part_tokens) when the route is one call of the compiled
    # kernel on CPU pages (split, workqueue): each layer then calls it directly, without
    # run_route's per-call planning and bookkeeping (the same call, the same bits)
    settings: tuple[int, int, int] | None


_active = threading.local()
# step_bench's breakdown sets a dict here: the attention function then adds its parts' seconds
timed_parts: dict[str, float] | None = None


def _attend(st: _Step, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            scaling: float | None) -> torch.Tensor:  # fmt: skip
    """One layer's paged attention of a step: write each row's new K/V (k, v [B, Hkv, D],
    post-RoPE) into its next slot, then the route over the pages. q [B, Hq, D]; returns
    [B, Hq, D] in q's dtype."""
    t0 = time.perf_counter()
    st.cache.write_slots(layer, st.slots, k, v)
    k_pages, v_pages = st.cache.layer(layer)
    t1 = time.perf_counter()
    starts = st.starts if layer in st.sliding else None
    tables = st.tables[layer]
    if st.settings is not None:
        kernel.check_inputs(q, k_pages, v_pages, tables, st.lengths, starts)
        max_splits, min_split, part = st.settings
        scale = float(scaling) if scaling is not None else k_pages.shape[3] ** -0.5
        out, _, _ = kernel.decode(q, k_pages, v_pages, tables, st.lengths, scale, max_splits,
                                  min_split, starts=starts, part_tokens=part,
                                  fuse_heads=st.profile.fuse_heads)  # fmt: skip
    else:
        out, _ = run_route(q, k_pages, v_pages, tables, st.lengths, st.route, scaling,
                           st.profile, starts=starts)  # fmt: skip
    if timed_parts is not None:
        timed_parts["KV write"] += t1 - t0
        timed_parts["paged attention"] += time.perf_counter() - t1
    return out.to(q.dtype)


def _paged_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention function: query [B, Hq, 1, D], key/value [B, Hkv, 1, D] (this
    step's token, post-RoPE). Returns ([B, 1, Hq, D], None)."""
    st: _Step | None = getattr(_active, "step", None)
    if st is None or query.shape[2] != 1:
        raise RuntimeError("paged attention runs only inside ModelRunner.step, one token a row")
    out = _attend(st, module.layer_idx, query[:, :, 0], key[:, :, 0], value[:, :, 0], scaling)
    return out[:, None], None


AttentionInterface.register(ATTENTION, _paged_attention)


def pool_config(engine: Engine, pool_mb: float, page_size: int = 16) -> PagedConfig:
    """The page pool for `engine`'s model holding `pool_mb` MiB of K+V pages, its
    sliding-window layers as the window layers (they keep only their window)."""
    model, window = engine.model.config, tuple(engine.fingerprint.sliding_layers)
    probe = PagedConfig.for_model(model, 1, page_size, engine.kv_dtype, window)
    pages = int(pool_mb * (1 << 20)) // probe.id_bytes
    if pages < 1:
        raise PagedInputError(f"a {pool_mb} MiB pool holds no page of this model")
    return PagedConfig.for_model(model, pages, page_size, engine.kv_dtype, window)


class ModelRunner:
    """Runs batched decode steps of `engine`'s model over `cache` (one thread only).
    `route`: one of paged.routes.ROUTES; "adaptive" asks the cost model (`profile`, default
    the built-in one) once per step, for all layers. `last_route`: what the last step ran."""

    def __init__(
        self,
        engine: Engine,
        cache: PagedKVCache,
        route: str = "adaptive",
        profile: cost.MachineProfile | None = None,
        fast: bool = True,
    ) -> None:
        if route not in ROUTES:
            raise PagedInputError(f"unknown route {route!r}; choose from {', '.join(ROUTES)}")
        self.engine, self.cache, self.route = engine, cache, route
        self.profile = profile or cost.MachineProfile()
        self.last_route = ""
        c = cache.config
        group = engine.model.config.num_attention_heads // c.kv_heads
        self.geometry = cost.Geometry(c.kv_heads, group, c.head_dim, c.dtype.itemsize)
        fp = engine.fingerprint
        self.sliding = frozenset(fp.sliding_layers)
        self.window = fp.sliding_window
        self._groups = [cache.group_of(i) for i in range(c.layers)]  # layer -> page group
        self._prompt: dict[Any, list[int]] = {}  # rid -> prompt slots' positions (sliding only)
        self.fast = llama_step.build(engine.model) if fast else None

    def write_prompt(self, rid: Any, layers: list[LayerKV], n_tokens: int) -> None:
        """Allocate `rid` with the prompt's kept tokens and write every layer into its pages,
        slot order = position order (dropped tokens take no slot). `n_tokens`: the context
        length (the first token fed goes at position n_tokens). Full-attention layers must hold
        the same positions; a sliding layer may hold a suffix of them (written to the last
        slots) that covers its window of the first query."""
        if len(layers) != self.cache.config.layers:
            raise PagedInputError(f"got {len(layers)} layers, the model has "
                                  f"{self.cache.config.layers}")  # fmt: skip
        ref = max((kv.positions for kv in layers), key=lambda p: p.numel())
        n = int(ref.numel())
        if n and int(ref[-1]) >= n_tokens:
            raise PagedInputError(f"a position {int(ref[-1])} is not below n_tokens {n_tokens}")
        prompt = ref.tolist()
        first = self._first_slot(prompt, n_tokens, n + 1)  # the first query's window start
        offsets = []
        for i, kv in enumerate(layers):
            kept = int(kv.positions.numel())
            tail = torch.equal(kv.positions, ref[n - kept :])
            if not tail or (kept < n and (i not in self.sliding or n - kept > first)):
                raise PagedInputError(f"layer {i} keeps positions that do not match the rest")
            offsets.append(n - kept)
        window, start = self.cache.config.window_layers, self.window_start(prompt, n_tokens)
        self.cache.allocate(rid, n, start)
        try:
            for i, kv in enumerate(layers):  # window layers from the first query's window on
                lo = max(start, offsets[i]) if i in window else offsets[i]
                k, v = (x[:, lo - offsets[i] :] for x in (kv.keys, kv.values))
                self.cache.write(i, rid, lo, k, v)
        except Exception:
            self.cache.free(rid)
            raise
        if self.sliding:
            self._prompt[rid] = prompt

    def allocate_prompt(self, rid: Any, n_tokens: int) -> None:
        """Allocate `rid` with a prompt of n_tokens slots holding positions 0..n_tokens-1, which
        a producer writes layer by layer (`serve.staged`; window layers from `window_start`)."""
        prompt = list(range(n_tokens)) if self.sliding else []
        self.cache.allocate(rid, n_tokens, self.window_start(prompt, n_tokens))
        if self.sliding:
            self._prompt[rid] = prompt

    def window_start(self, prompt: list[int], n_tokens: int) -> int:
        """The first slot the cache's window layers keep for a prompt of these slot positions,
        whose first query goes at position `n_tokens` (0 without window layers)."""
        if not (self.cache.config.window_layers and self.sliding):
            return 0
        return self._first_slot(prompt, n_tokens, len(prompt) + 1)

    def free(self, rid: Any) -> None:
        """Return `rid`'s pages to the pool and forget it."""
        self._prompt.pop(rid, None)
        self.cache.free(rid)

    def _first_slot(self, prompt: list[int], position: int, length: int) -> int:
        """The first slot a sliding layer's query at `position` sees, for a request of `length`
        slots (the query's own included, last) whose first len(prompt) slots hold the prompt
        positions `prompt` and the rest consecutive positions up to `position`."""
        lo = position - self.window + 1  # the first visible position
        decoded = len(prompt)  # the first slot of a fed token; it holds position:
        first_fed = position - (length - 1 - decoded)
        if lo >= first_fed:
            return length - 1 - (position - lo)
        return bisect.bisect_left(prompt, lo)

    def _starts(self, rids: list[Any], positions: list[int], lengths: list[int]) -> torch.Tensor:
        return torch.tensor(
            [self._first_slot(self._prompt[r], p, n) for r, p, n in zip(rids, positions, lengths,
                                                                       strict=True)],
            dtype=torch.int32,
        )  # fmt: skip

    @torch.inference_mode()
    def step(
        self, rids: list[Any], tokens: list[int], positions: list[int], chunk: Chunk | None = None
    ) -> torch.Tensor:
        """Feed one token per request (`tokens[i]` at original position `positions[i]`),
        appending its K/V to the request's pages; returns float32 logits [B, vocab]. With
        `chunk` (hand-written Llama step only): a local prefill's chunk rides in the same model
        call (serve.chunk_attention), its K/V appended to its pages; one more logits row, its
        last token's: [B + 1, vocab]."""
        if chunk is not None:
            return self._mixed_step(rids, tokens, positions, chunk)
        model = self.engine.model
        st = self._decode_rows(rids, positions)
        if self.fast is not None:
            logits = self.fast(
                torch.tensor(tokens), torch.tensor(positions), functools.partial(_attend, st)
            )
            return logits.float()
        _active.step = st
        try:
            with use_attention(model, ATTENTION):
                out = model(
                    input_ids=torch.tensor(tokens).view(-1, 1),
                    position_ids=torch.tensor(positions).view(-1, 1),
                    use_cache=False,
                )
        finally:
            _active.step = None
        return out.logits[:, -1].float()

    def _decode_rows(self, rids: list[Any], positions: list[int]) -> _Step:
        """Append a slot per request and pick the step's route (decode rows only)."""
        cache = self.cache
        slots = cache.append(rids)
        n_slots = [cache.length(r) for r in rids]
        starts = self._starts(rids, positions, n_slots) if self.sliding else None
        if starts is not None and cache.config.window_layers:
            for rid, first in zip(rids, starts.tolist(), strict=True):
                cache.release(rid, first)  # the window layers never read below it again
        by_group = [cache.block_tables(rids, g) for g in range(cache.n_groups)]
        lengths, tables = by_group[0][1], [by_group[g][0] for g in self._groups]
        route = self.route
        if route == "adaptive":
            route = cost.choose(n_slots, self.geometry, self.profile)
        self.last_route = route
        one_call = route in ("split", "workqueue") and kernel.AVAILABLE and cache.k.is_cpu
        settings = cost.route_settings(route, self.profile) if one_call else None
        return _Step(cache, slots, tables, lengths, route, self.profile, starts, self.sliding,
                     settings)  # fmt: skip

    def _mixed_step(self, rids, tokens, positions, chunk: Chunk) -> torch.Tensor:
        """`step` with a prefill chunk: decode rows first, then the chunk's rows."""
        if self.fast is None:
            raise PagedInputError("a prefill chunk rides only in the hand-written Llama step")
        b, c = len(rids), len(chunk.tokens)
        st = self._decode_rows(rids, positions) if b else None
        if not b:
            self.last_route = ""
        cs = ChunkStep.prepare(self.cache, chunk)

        def attend(layer, q, k, v, scaling):
            out = chunk_attention(cs, layer, q[b:], k[b:], v[b:], scaling)
            if st is None:
                return out
            return torch.cat((_attend(st, layer, q[:b], k[:b], v[:b], scaling), out))

        ids = torch.tensor([*tokens, *chunk.tokens])
        pos = torch.cat((torch.tensor(positions, dtype=torch.int64),
                         torch.arange(chunk.start, chunk.start + c)))  # fmt: skip
        keep = torch.cat((torch.arange(b), torch.tensor([b + c - 1])))
        return self.fast(ids, pos, attend, rows=keep).float()
