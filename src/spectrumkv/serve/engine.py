"""Continuous-batching decode engine over the paged KV cache.

One engine thread owns the model and the page pool. Each iteration it (1) admits waiting
requests, in arrival order, whose whole need fits the pool: the pages of their kept prompt
tokens plus `max_tokens` new ones are *reserved* at admission, so an admitted request never
fails for lack of pages and nothing is ever preempted or evicted; (2) writes each admitted
request's prompt KV straight into its pages (a received payload's kept tokens, or a local
prefill for the recompute path: one local prefill per iteration, whole or, with `prefill_chunk`
> 0, one chunk of that many tokens per iteration, either between decode steps or, with
`prefill_mode` "mixed" on a Llama-family model, as more rows of the decode step, its K/V written
straight into its reserved pages); (3) runs one batched model step for every active request
(one new token each) and samples per request; (4) retires requests that hit
EOS, a stop string, `max_tokens`, or were cancelled, returning their pages at once.

A request that cannot be admitted waits in a bounded queue; when the queue is full, or it waited
`queue_timeout_s`, it fails with `PoolBusy` (HTTP 503 + Retry-After in the decode worker). A
request larger than the whole pool fails at once with `RequestTooLarge`.

A prompt rebuilt layer by layer elsewhere (SCD codes, as frames arrive) skips the whole-cache
copy: `stage` queues it like a request; once admitted (pages reserved and allocated by the engine
thread) its producer writes each layer straight into its pages (`StagedPrompt.write`), then
`submit(..., staged=...)` hands it to the decode batch, or `abort()` frees its pages.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import DynamicCache

from ..engines.hf import Engine, layer_kv
from ..errors import SpectrumKVError
from ..kv import LayerKV
from ..paged.cache import PagedKVCache
from ..paged.cost import MachineProfile, default_profile_path, profile_for
from ..pd.sampling import Cancelled, SamplingParams, StopText, next_token
from .chunk_attention import Chunk
from .config import EngineConfig, default_pool_mb  # noqa: F401 - their home was here
from .requests import EngineStats, Generation, Job, PoolBusy, RequestTooLarge
from .runner import ModelRunner, pool_config
from .staged import StagedClosed, StagedPrompt


class BatchEngine:
    """The engine thread and its queue (see module doc). Thread-safe `submit`; `close` stops
    the thread, failing whatever is still queued or running."""

    def __init__(
        self,
        engine: Engine,
        cfg: EngineConfig | None = None,
        profile: MachineProfile | None = None,
    ) -> None:
        self.engine, self.cfg = engine, cfg or EngineConfig()
        self.cache = PagedKVCache(pool_config(engine, self.cfg.pool_mb, self.cfg.page_size))
        # where adaptive's cost model comes from: the caller's profile, the config's file, this
        # machine's calibrated one for the page dtype, or the built-in constants
        self.profile_source = "given by the caller"
        if profile is None:
            dtype, path = self.cache.config.dtype, self.cfg.attention_profile
            profile = profile_for(dtype, path)
            default = default_profile_path(dtype) if profile else "uncalibrated defaults"
            self.profile_source = str(path or default)
        self.runner = ModelRunner(engine, self.cache, self.cfg.route, profile)
        # local prefill chunks inside the decode step: the hand-written Llama step only
        self._mixed = self.cfg.prefill_mode == "mixed" and self.runner.fast is not None
        self.stats = EngineStats()
        # called after every step with (batch size, seconds, route), on the engine thread
        self.on_step: Callable[[int, float, str], None] | None = None
        eos = engine.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos])
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._prefilling: deque[Job] = deque()  # admitted, local prefill pending or under way
        self._active: list[Job] = []
        self._staged: dict[int, Job] = {}  # admitted, written from outside, not yet submitted
        self._inbox: deque[Job] = deque()  # staged jobs submitted or aborted
        self._committed = 0  # pages reserved by admitted requests
        self._threads = torch.get_num_threads()  # the engine thread's, as its creator's
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # ---- public ----

    @property
    def total_pages(self) -> int:
        return self.cache.config.pages

    def pages_needed(self, n_kept: int, max_tokens: int) -> int:
        """Page ids a request of `n_kept` prompt slots and `max_tokens` new tokens holds at
        most (reserved at admission; sliding-window layers hold about a window)."""
        fp = self.engine.fingerprint
        window = fp.sliding_window if fp.sliding_layers else 0
        return self.cache.pages_needed(n_kept + max_tokens, window)

    def submit(
        self,
        params: SamplingParams,
        first_input: int,
        n_tokens: int,
        layers: list[LayerKV] | None = None,
        context: torch.Tensor | None = None,
        on_piece: Callable[[str], None] | None = None,
        staged: StagedPrompt | None = None,
    ) -> Generation:
        """Queue one completion. `layers`: the prompt's KV as received (kept tokens only, with
        their original positions); or `context` (1-D ids) to prefill locally; or `staged`, a
        prompt already written into its pages (every layer; `stage` reserved them for at least
        params.max_tokens). `n_tokens`: the context length, so `first_input` (the prompt's last
        token) goes at position n_tokens. Raises PoolBusy (queue full), RequestTooLarge,
        ValueError (n > 1, bad arguments)."""
        if params.n != 1:
            raise ValueError("the batch engine runs one choice per request (n = 1)")
        if sum(x is not None for x in (layers, context, staged)) != 1:
            raise ValueError("give exactly one of layers, context (recompute) or staged")
        if staged is not None:
            return self._submit_staged(staged, params, first_input, n_tokens, on_piece)
        if layers is not None:  # a sliding layer may hold fewer: the slots are the longest's
            n_kept = max(int(kv.positions.numel()) for kv in layers)
        else:
            n_kept = int(context.numel())
        job = self._job(params, first_input, n_tokens, n_kept, on_piece)
        job.layers, job.context = layers, context
        self._enqueue(job)
        return job.gen

    def stage(self, params: SamplingParams, n_tokens: int) -> StagedPrompt:
        """Queue the pages of a prompt of `n_tokens` tokens (all kept) plus params.max_tokens
        for admission; its producer writes the layers once `wait_admitted`. Raises PoolBusy
        (queue full), RequestTooLarge."""
        job = self._job(replace(params, n=1), -1, n_tokens, n_tokens, None)
        job.staged = StagedPrompt(self, job)
        self._enqueue(job)
        return job.staged

    def _submit_staged(self, staged, params, first_input, n_tokens, on_piece) -> Generation:
        job = staged.job
        if staged.batch is not self or n_tokens != staged.n_tokens:
            raise ValueError("the staged prompt is not this engine's or not this prompt's")
        if self.pages_needed(n_tokens, params.max_tokens) > job.pages:
            raise ValueError("max_tokens exceeds what the staged prompt reserved")
        if len(staged.written) != self.cache.config.layers:
            raise ValueError(f"the staged prompt has {len(staged.written)} of "
                             f"{self.cache.config.layers} layers written")  # fmt: skip
        if not staged._close():
            raise StagedClosed("the staged prompt was aborted, submitted or closed")
        staged._submitted = True
        job.gen.params, job.gen.on_piece, job.token = params, on_piece, first_input
        self._post(job)
        return job.gen

    def _post(self, job: Job) -> None:
        """Hand a staged job (submitted or aborted) to the engine thread."""
        with self._cond:
            self._inbox.append(job)
            self._cond.notify()

    def _job(self, params, first_input, n_tokens, n_kept, on_piece) -> Job:
        pages = self.pages_needed(n_kept, params.max_tokens)
        if pages > self.total_pages:
            raise RequestTooLarge(
                f"prompt ({n_kept} tokens) + max_tokens ({params.max_tokens}) needs {pages} "
                f"pages; the pool holds {self.total_pages}"
            )
        gen = Generation(params, on_piece)
        return Job(
            next(self._ids), gen, None, None, n_kept, n_tokens, first_input, pages, time.monotonic()
        )

    def _enqueue(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise SpectrumKVError("the engine is closed")
            if len(self._waiting) >= self.cfg.max_queue:
                self.stats.rejected += 1
                raise PoolBusy("the KV page pool is full and so is the queue", self._retry_after())
            self._waiting.append(job)
            self._cond.notify()

    def load(self) -> dict:
        """Queue length, active requests, pool pages used / free / reserved."""
        with self._cond:
            return {
                "queued": len(self._waiting),
                "active": len(self._active),
                "pages_total": self.total_pages,
                "pages_free": self.cache.free_pages,
                "pages_reserved": self._committed,
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ---- engine thread ----

    def _retry_after(self) -> float:
        """Seconds until pages are likely to free up: the shortest remaining output among the
        active requests at the mean step time (at least 1 s)."""
        s = self.stats
        per_step = s.step_s / s.steps if s.steps else 0.1
        left = min(
            (j.gen.params.max_tokens - len(j.gen.token_ids) for j in self._active), default=1
        )
        return max(1.0, left * per_step)

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)  # this thread's OpenMP team (engines.omp)
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._prefilling or self._active
                           or self._inbox):  # fmt: skip
                    self._cond.wait()
                if self._closed:
                    break
                admitted = self._admit()
                inbox = list(self._inbox)
                self._inbox.clear()
            for job in admitted:
                self._start(job)
            for job in inbox:  # staged prompts, submitted (written) or aborted
                self._staged.pop(job.rid, None)
                if job.gen._cancel.is_set() or not job.admitted:
                    if not job.gen.done:
                        self._finish(job, Cancelled("the staged prompt was aborted"))
                else:
                    self._activate(job)
            self._retire(lambda j: j.gen._cancel.is_set(), Cancelled("the client went away"))
            if self._mixed and self._prefilling:
                self._step(self._next_chunk())
                continue
            if self._prefilling:
                self._prefill_chunk()
            if self._active:
                self._step()
            elif not admitted and not self._prefilling:
                with self._cond:  # only waiting requests that do not fit: wait for a change
                    self._cond.wait(0.05)
        with self._cond:
            every = [*self._waiting, *self._prefilling, *self._active, *self._staged.values()]
            leftovers = list({j.rid: j for j in every + list(self._inbox)}.values())
            self._waiting.clear()
            self._prefilling.clear()
            self._inbox.clear()
            self._staged.clear()
        for job in leftovers:
            if not job.gen.done:
                self._finish(job, SpectrumKVError("the engine was closed"))

    def _admit(self) -> list[Job]:
        """Under the lock: pop the waiting requests that fit, in order (the first that does not
        fit blocks those behind it, so large requests are not starved); fail the expired."""
        now, out = time.monotonic(), []
        while self._waiting:
            job = self._waiting[0]
            if job.gen._cancel.is_set():
                self._waiting.popleft()
                job.gen.error = Cancelled("the client went away")
                job.gen._done.set()
                continue
            busy = len(self._active) + len(self._prefilling) + len(self._staged) + len(out)
            room = busy < self.cfg.max_batch
            if room and self._committed + job.pages <= self.total_pages:
                self._committed += job.pages
                job.admitted = True
                out.append(self._waiting.popleft())
            elif now - job.t_queued >= self.cfg.queue_timeout_s:
                self._waiting.popleft()
                self.stats.rejected += 1
                job.gen.error = PoolBusy(
                    f"no KV pages for {self.cfg.queue_timeout_s:.0f} s", self._retry_after()
                )
                job.gen._done.set()
            else:
                break
        return out

    def _start(self, job: Job) -> None:
        """Write the job's prompt into its pages; on the recompute path, queue its local prefill
        for `_prefill_chunk` first."""
        try:
            if job.staged is not None:  # its producer writes the pages: allocate them only
                self.runner.allocate_prompt(job.rid, job.n_kept)
                job.holds_pages = True
                self._staged[job.rid] = job
                return
            if job.layers is None:
                if self._mixed:  # its chunks' K/V go straight into its pages
                    self.cache.allocate(job.rid, 0)
                    job.holds_pages = True
                else:
                    job.kv = DynamicCache(config=self.engine.model.config)
                self._prefilling.append(job)
                return
            self.runner.write_prompt(job.rid, job.layers, job.position)
            job.holds_pages = True
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            self._finish(job, e)
            return
        job.layers = job.context = None  # the pages hold it now
        self._activate(job)

    def _activate(self, job: Job) -> None:
        """A job whose prompt is in its pages joins the decode batch."""
        p = job.gen.params
        job.rng = torch.Generator().manual_seed(
            p.seed if p.seed is not None else secrets.randbits(63)
        )
        job.stop = StopText(self.engine.tokenizer, p.stop)
        self._active.append(job)

    @torch.inference_mode()
    def _prefill_chunk(self) -> None:
        """The oldest local prefill: whole, or its next `prefill_chunk` tokens (one call per
        engine iteration, so decode steps run between two prefills or chunks, and a batch of
        recomputes does not hold back the first one's tokens); once its whole context is in,
        its KV goes into pages and it joins the decode batch."""
        job = self._prefilling[0]
        try:
            if job.gen._cancel.is_set():
                raise Cancelled("the client went away")
            n, a, b = int(job.context.numel()), job.prefilled, self._chunk_end(job)
            self.engine.model(input_ids=job.context[a:b].view(1, -1), past_key_values=job.kv,
                              use_cache=True, logits_to_keep=1)  # fmt: skip
            job.prefilled = b
            if b < n:
                return
            self._prefilling.popleft()
            job.layers = [layer_kv(self.engine, job.kv, i, n) for i in range(len(job.kv.layers))]
            job.kv = None
        except Exception as e:  # noqa: BLE001 - the request fails, the engine goes on
            self._prefilling.popleft()
            self._finish(job, e)
            return
        self._start(job)

    def _chunk_end(self, job: Job) -> int:
        """Where the local prefill's next chunk ends: `prefill_chunk` context tokens on, or the
        whole context (prefill_chunk 0)."""
        n, chunk = int(job.context.numel()), self.cfg.prefill_chunk
        return min(n, job.prefilled + chunk) if chunk else n

    def _next_chunk(self) -> Chunk | None:
        """Mixed mode: the oldest local prefill's next chunk (`prefill_chunk` context tokens, or
        all; the last one ends with the prompt's last token, whose logits give the first output
        token), or None when that request was cancelled (it ends here, freeing its pages)."""
        job = self._prefilling[0]
        if job.gen._cancel.is_set():
            self._prefilling.popleft()
            self._finish(job, Cancelled("the client went away"))
            return None
        n, a, b = int(job.context.numel()), job.prefilled, self._chunk_end(job)
        job.prefilled = b
        return Chunk(job.rid, job.context[a:b].tolist() + ([job.token] if b == n else []), a)

    def _step(self, chunk: Chunk | None = None) -> None:
        """One batched step of the active requests (and, mixed mode, `chunk`); sample each."""
        jobs = self._active
        if not jobs and chunk is None:
            return
        t0 = time.perf_counter()
        try:
            logits = self.runner.step(
                [j.rid for j in jobs], [j.token for j in jobs], [j.position for j in jobs], chunk
            )
        except Exception as e:  # noqa: BLE001 - fail this batch, keep serving
            self._retire(lambda j: True, e)
            if chunk is not None:
                self._finish(self._prefilling.popleft(), e)
            return
        if chunk is not None:
            job = self._prefilling[0]
            if job.prefilled < job.context.numel():
                logits = logits[:-1]  # a middle chunk: no token yet
            else:  # its whole prompt is in its pages: its first token comes from this step
                self._prefilling.popleft()
                job.context = None
                self._activate(job)
                jobs = self._active
        dt = time.perf_counter() - t0
        s = self.stats
        s.steps, s.step_s, s.batch_sum, s.tokens = (
            s.steps + 1,
            s.step_s + dt,
            s.batch_sum + len(jobs),
            s.tokens + len(jobs),
        )
        s.last_batch, s.last_step_s = len(jobs), dt
        if self.on_step is not None:
            self.on_step(len(jobs), dt, self.runner.last_route)
        now = time.perf_counter()
        top = logits.argmax(-1).tolist()  # greedy rows: one argmax for the batch
        for job, row, best in zip(jobs, logits, top, strict=True):
            g = job.gen
            tok = best if g.params.temperature == 0 else next_token(row, g.params, job.rng)
            g.token_ids.append(tok)
            if g.ttft_s is None:
                g.ttft_s = now - g.t_submit
            job.token, job.position = tok, job.position + 1
            piece, stopped = job.stop.push(tok)
            if piece and g.on_piece is not None:
                g.on_piece(piece)
            if stopped or tok in self._eos:
                g.finish_reason = "stop"
                job.ended = True
            elif len(g.token_ids) >= g.params.max_tokens:
                job.ended = True
        self._retire(lambda j: j.ended, None)

    def _retire(self, pred: Callable[[Job], bool], error: BaseException | None) -> None:
        keep = []
        for job in self._active:
            if pred(job):
                self._finish(job, error)
            else:
                keep.append(job)
        self._active = keep

    def _finish(self, job: Job, error: BaseException | None) -> None:
        """Free the job's pages and release its reservation; end its Generation."""
        if job.staged is not None:
            job.staged._close()  # waits for a write under way; no write after this
        if job.holds_pages:
            self.runner.free(job.rid)
            job.holds_pages = False
        if job.admitted:
            with self._cond:
                self._committed -= job.pages
        job.kv = None
        g = job.gen
        if error is None and job.stop is not None:
            rest = job.stop.flush()
            if rest and g.on_piece is not None:
                g.on_piece(rest)
            g.text = job.stop.text
            self.stats.finished += 1
        elif error is not None:
            g.error = error
            self.stats.failed += 1
        g.total_s = time.perf_counter() - g.t_submit
        g._done.set()
