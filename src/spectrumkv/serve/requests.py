"""What a request is inside the batch engine (`serve.engine`): its `Generation` (the caller's
handle), its `Job` (the engine thread's record), the engine's counters, and the two ways a
request is refused (`PoolBusy`, `RequestTooLarge`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ..errors import SpectrumKVError
from ..kv import LayerKV
from ..pd.sampling import SamplingParams, StopText

if TYPE_CHECKING:
    from .staged import StagedPrompt


class PoolBusy(SpectrumKVError):
    """The page pool cannot take the request now (queue full or waited too long);
    `retry_after_s` estimates when it may."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTooLarge(SpectrumKVError, ValueError):
    """A request's prompt plus max_tokens needs more pages than the whole pool holds."""


@dataclass
class Generation:
    """One request's result, filled in by the engine thread. `wait()` returns once it ended
    (raising its error, if any); `cancel()` stops it before its next step and frees its pages.
    Times are seconds since `submit`. `on_piece(text)`, called on the engine thread, streams
    the text as it becomes safe to show."""

    params: SamplingParams
    on_piece: Callable[[str], None] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    error: BaseException | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    _done: threading.Event = field(default_factory=threading.Event)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds for the end; whether it ended."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> Generation:
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self.error is not None:
            raise self.error
        return self


@dataclass
class Job:
    """One request inside the engine: its generation, where its prompt comes from, its pages
    and its decoding state. Owned by the engine thread (a staged prompt's producer writes only
    its pages)."""

    rid: int
    gen: Generation
    layers: list[LayerKV] | None  # None: prefill `context` locally (recompute)
    context: torch.Tensor | None
    n_kept: int  # prompt slots the pages hold
    position: int  # original position of the next token fed
    token: int  # next token fed
    pages: int  # reserved pages
    t_queued: float
    rng: torch.Generator | None = None
    stop: StopText | None = None  # set once started (its pages written)
    ended: bool = False
    admitted: bool = False  # its pages are reserved
    kv: DynamicCache | None = None  # its local prefill in progress
    prefilled: int = 0  # context tokens in `kv`
    staged: StagedPrompt | None = None  # its prompt is written from outside the engine thread
    holds_pages: bool = False  # allocated in the pool


@dataclass
class EngineStats:
    """Counters since start: steps, tokens generated, seconds spent in steps, sum of batch
    sizes, requests finished / failed / rejected, and the last step's batch size and time."""

    steps: int = 0
    tokens: int = 0
    step_s: float = 0.0
    batch_sum: int = 0
    finished: int = 0
    failed: int = 0
    rejected: int = 0
    last_batch: int = 0
    last_step_s: float = 0.0
