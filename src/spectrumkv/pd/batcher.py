"""Prefill batching for the prefill worker: KV requests queued at the same time are prefilled
together, up to `size` per model forward (engines.hf.prefill_batch), each still streamed through
its own hook.

Leader/follower: every request blocks in `PrefillBatcher.prefill` on its own thread; whichever
thread holds the model lock takes the oldest queued requests (FIFO, at most `size`), prefills
them in one forward and wakes their threads. A request whose hook fails (cancelled, a bad
policy, a full send queue that was cancelled) fails alone; an error of the forward fails its
batch. One request in a batch goes through `engines.hf.prefill`, today's one-at-a-time path.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from ..engines.hf import Engine, LayerHook, prefill, prefill_batch
from ..errors import ConfigError
from .sampling import Cancelled

log = logging.getLogger("spectrumkv.prefill")
#: the largest `--prefill-batch` accepted (prompts per forward; MAX_BATCH_TOKENS bounds the
#: tokens)
MAX_BATCH = 64
#: a batch packs at most this many prompt tokens (a longer first request goes alone). Each
#: prompt attends only to itself (engines.segments: attention costs the sum of each prompt's
#: square, not the square of the total), so a bigger pack only feeds the linear layers more
#: rows: bench decode's 16 prompts (4,901 tokens, bf16, 2 threads) prefilled and encoded in
#: 2.68 s in one forward against 4.95 s one at a time (benchmarks/prefill_batch.py; with the
#: earlier block-diagonal mask one forward took 10.79 s, hence the earlier cap of 512). The cap
#: bounds how long the first prompt of a pack waits for the last: through the workers on one
#: shared 2-core box (`bench decode`, decode worker on 2 threads, one run each) caps of 512 /
#: 1,024 / 2,048 / 4,096 gave 160 / 166 / 149 / 120 decode tok/s and TTFT p99 5.8 / 4.9 / 6.6 /
#: 7.7 s: one big pack holds every first token back until its last layer.
MAX_BATCH_TOKENS = 1024


def check_batch(size: int) -> int:
    """`size` if it is a valid prefill batch size (1 = one prompt per forward), else
    ConfigError."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH:
        raise ConfigError(f"prefill batch must be an integer in 1..{MAX_BATCH}, got {size!r}")
    return size


def batch_take(lengths: list[int], size: int) -> int:
    """How many of the oldest queued prompts (`lengths`, tokens, oldest first) one forward
    takes: at most `size`, at most MAX_BATCH_TOKENS tokens together, at least one (0 if none
    is queued)."""
    take, tokens = min(1, len(lengths)), lengths[0] if lengths else 0
    while take < min(size, len(lengths)) and tokens + lengths[take] <= MAX_BATCH_TOKENS:
        tokens += lengths[take]
        take += 1
    return take


@dataclass
class _Job:
    ids: torch.Tensor
    on_layer: LayerHook
    cancel: threading.Event
    done: bool = False
    started: float = 0.0
    error: BaseException | None = None


class PrefillBatcher:
    """Runs prefills under `lock` (the model's: other users of the model take it too), batching
    queued requests up to `size` (forced to 1 for a model with sliding-window layers: see
    `prefill_batch`)."""

    def __init__(self, engine: Engine, size: int, lock: threading.Lock) -> None:
        check_batch(size)
        self.engine, self.lock = engine, lock
        self.size = 1 if engine.fingerprint.sliding_layers else size
        self._pending: list[_Job] = []
        self._cond = threading.Condition()  # guards _pending, _leading and jobs' `done`
        self._leading = False  # a thread is taking and running a batch

    def prefill(self, ids: torch.Tensor, on_layer: LayerHook, cancel: threading.Event) -> float:
        """Prefill `ids`, calling `on_layer` per layer (from whichever thread runs the batch);
        block until done. Returns when its forward started (time.perf_counter()); raises what
        its hook or its forward raised."""
        job = _Job(ids, on_layer, cancel)
        with self._cond:
            self._pending.append(job)
        while True:
            with self._cond:
                while not job.done and self._leading:
                    self._cond.wait()
                if job.done:
                    break
                self._leading = True
            try:
                with self.lock:
                    self._run_next()
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        return job.started

    def _run_next(self) -> None:
        """Prefill the oldest queued requests (the caller leads and holds the model lock)."""
        with self._cond:
            take = batch_take([j.ids.numel() for j in self._pending], self.size)
            batch, self._pending = self._pending[:take], self._pending[take:]
            live = []
            for job in batch:
                if job.cancel.is_set():
                    job.error = Cancelled("the decode worker went away before prefill started")
                    job.done = True
                else:
                    live.append(job)
        if not live:
            return
        started = time.perf_counter()
        if len(live) > 1:
            log.info("prefilling %d requests in one forward (%d tokens)", len(live),
                     sum(j.ids.numel() for j in live))  # fmt: skip
        try:
            if len(live) == 1:
                errors: list = [_alone(self.engine, live[0])]
            else:
                errors = prefill_batch(
                    self.engine, [j.ids for j in live], [j.on_layer for j in live]
                )
        except Exception as e:  # the forward itself: the whole batch fails
            errors = [e] * len(live)
        with self._cond:
            for job, err in zip(live, errors, strict=True):
                job.started, job.error, job.done = started, err, True


def _alone(engine: Engine, job: _Job) -> Exception | None:
    """One request through `engines.hf.prefill`; its exception returned, not raised."""
    try:
        prefill(engine, job.ids, on_layer=job.on_layer)
    except Exception as e:
        return e
    return None
