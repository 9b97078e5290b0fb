"""A prompt written into the batch engine's pages layer by layer from outside the engine thread
(B's cache rebuilt from SCD codes as frames arrive), without a whole-cache copy first: see
`serve.engine` (`BatchEngine.stage` / `submit(..., staged=...)`)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import torch

from ..errors import SpectrumKVError
from ..kv import LayerKV, first_slot
from ..paged.errors import PagedInputError

if TYPE_CHECKING:
    from .engine import BatchEngine
    from .requests import Job


class StagedPrompt:
    """A request's prompt pages, written layer by layer by one producer thread (see the module
    doc). `wait_admitted` until its pages are reserved and allocated; `write(i, kv)` once per
    layer; then `BatchEngine.submit(..., staged=self)` or `abort()`. Writes after an abort, a
    submit or the engine's close raise `StagedClosed`; an abort waits for a write under way, so
    freed pages are never written. Every layer holds positions 0..n_tokens-1 in slots of the
    same index, but a sliding-window layer may hold only its window's suffix (from
    `kv.first_slot` on, or any earlier position), as a received payload's does."""

    def __init__(self, batch: BatchEngine, job: Job) -> None:
        self.batch, self.job = batch, job
        self.n_tokens = job.n_kept
        self.written: dict[int, int] = {}  # layer -> the first position written
        self._lock = threading.Lock()
        self._closed = False
        self._submitted = False

    def wait_admitted(self, timeout: float | None = None) -> bool:
        """Whether its pages are allocated, waiting up to `timeout` s (polled every 2 ms);
        raises what ended it (PoolBusy after the queue timeout, Cancelled after abort, a
        closed engine)."""
        end = None if timeout is None else time.monotonic() + timeout
        g = self.job.gen
        while not self.job.holds_pages:
            if g.done:
                if g.error is not None:
                    raise g.error
                return False
            left = 0.002 if end is None else min(0.002, end - time.monotonic())
            if left <= 0:
                return False
            g.join(left)
        return True

    def write(self, layer: int, kv: LayerKV) -> None:
        """Layer `layer` of the prompt (positions first..n_tokens-1, any float dtype: first 0,
        or on a sliding-window layer at most `kv.first_slot`) into its pages. Called by one
        producer thread; PagedInputError for a bad layer or shape."""
        n = self.n_tokens
        first = n - int(kv.positions.numel())
        fp = self.batch.engine.fingerprint
        lowest = first_slot(fp.is_sliding(layer), fp.sliding_window, n)
        ends = (int(kv.positions[0]), int(kv.positions[-1])) if n > first else (first, n - 1)
        if not 0 <= first <= lowest or ends != (first, n - 1):
            raise PagedInputError(f"staged layer {layer} must hold prompt positions {lowest} or "
                                  f"earlier up to {n - 1}")  # fmt: skip
        with self._lock:
            if self._closed or not self.job.holds_pages:
                raise StagedClosed("the staged prompt is closed or not admitted")
            # only this request's pages and its (engine-owned) table are touched: the engine
            # thread does not read or free them while the request is staged (see _close)
            cache = self.batch.cache
            if layer in cache.config.window_layers:  # pages from the first query's window on
                kv = LayerKV(kv.keys[:, lowest - first :], kv.values[:, lowest - first :],
                             kv.positions[lowest - first :])  # fmt: skip
                first = lowest
            cache.write(layer, self.job.rid, first, kv.keys, kv.values)
            self.written[layer] = first

    def layers(self) -> list[LayerKV]:
        """A copy of the written prompt, read back from the pages (for extra choices, n > 1)."""
        c, n = self.batch.cache, self.n_tokens
        out = []
        for i in range(c.config.layers):
            first = self.written.get(i, 0)
            k, v = c.read(i, self.job.rid, n, first)
            out.append(LayerKV(k.contiguous(), v.contiguous(), torch.arange(first, n)))
        return out

    def abort(self) -> None:
        """Give its pages back (no-op once submitted or ended)."""
        if self._submitted:
            return
        self._close()
        self.job.gen.cancel()
        self.batch._post(self.job)

    def _close(self) -> bool:
        """No more writes (waits for one under way); whether it was open."""
        with self._lock:
            was, self._closed = not self._closed, True
        return was


class StagedClosed(SpectrumKVError):
    """A write to a staged prompt after its abort, submit or the engine's close."""
