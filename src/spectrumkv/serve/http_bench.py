"""`spectrumkv bench decode` through real servers: N streamed completions at concurrency C.

Per engine one server is started and driven over its OpenAI endpoint (POST /v1/completions,
`stream: true`, greedy, budget 1.0 for SpectrumKV's workers so every prompt token arrives):
- `batched` / `sequential`: a prefill worker + decode worker pair (pd.launch.Cluster), the decode
  worker run with `--engine batched` or `--engine sequential`;
- `vllm`: vLLM's CPU engine, one OpenAI server (serve.vllm_engine).
Each worker's torch uses `threads` threads (OMP_NUM_THREADS in its environment); vLLM's OpenMP
threads are bound to `vllm_cpus`.

Everything is timed at the client: a request's TTFT is send -> first streamed text, its decode
interval first -> last streamed text, TPOT = decode interval / (completion tokens - 1).
Decode-phase throughput separates decode from prefill: tokens after each request's first, summed,
over the wall time during which at least one request was decoding (the union of the decode
intervals). While one request decodes, others may be prefilling (on the prefill worker, or
inside vLLM's steps): that is the served system, so it counts. `e2e_tokens_per_s` is every
completion token over first send -> last token. Peak KV bytes come from the server's /metrics,
polled every `POLL_S` seconds: the batch engine's used pages x page bytes (and its step-time
high-water mark `spectrumkv_engine_pages_peak` when a run raised it, which a short run's polls
could miss), vLLM's KV-cache usage x its cache size; the sequential worker exports no KV
gauge, so its figure is computed (the largest request's DynamicCache, in the workers' compute
dtype) and marked so.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..engines.hf import COMPUTE_DTYPES, sliding_layers
from ..pd.launch import Cluster, rss_mb
from ..wire import KV_DTYPES
from .bench import DecodeBench, Record, _pct
from .metrics import read as scrape
from .vllm_engine import VllmServer, VllmSetup, VllmUnavailable, cpus_for

POLL_S = 0.5
TRANSFER_DEADLINE_S = 3600.0
SERVERS = ("batched", "sequential", "vllm")


@dataclass
class Timing:
    """One streamed request, perf_counter seconds. tokens: completion tokens (from usage)."""

    t_send: float
    t_first: float | None = None
    t_last: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    token_ids: list[int] | None = None
    outcome: str | None = None  # SpectrumKV's: ok (KV received) or recomputed
    error: str | None = None


def stream(url: str, body: dict, timeout: float = 3600.0) -> Timing:
    """POST a streamed /v1/completions; time every text piece. Errors end up in `error`."""
    req = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    t = Timing(time.perf_counter())
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    t.error = str(event["error"].get("code") or event["error"].get("message"))
                    continue
                now = time.perf_counter()
                for choice in event.get("choices") or ():
                    if choice.get("text"):
                        t.t_first = t.t_first or now
                        t.t_last = now
                    if choice.get("token_ids") is not None:
                        t.token_ids = choice["token_ids"]
                if isinstance(event.get("spectrumkv"), dict):
                    t.outcome = event["spectrumkv"].get("outcome")
                if event.get("usage"):
                    t.tokens = event["usage"]["completion_tokens"]
                    t.prompt_tokens = event["usage"]["prompt_tokens"]
    except urllib.error.HTTPError as e:
        t.error = f"HTTP {e.code}"
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
        t.error = f"{type(e).__name__}: {e}"
    if t.error is None and (t.t_first is None or t.tokens < 1):
        t.error = "no tokens streamed"
    return t


def request_body(engine: str, model: str, prompt: str, max_tokens: int) -> dict:
    """The same greedy streamed completion for every server, plus what each needs to report
    usage: SpectrumKV's final chunk carries it (and token ids); vLLM needs stream_options."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True}  # fmt: skip
    if engine == "vllm":
        body["stream_options"] = {"include_usage": True}
    else:
        body["spectrumkv"] = {"budget": 1.0}
    return body


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals (seconds)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class Poller:
    """Samples a function of the server's /metrics (and a process's RSS) every POLL_S seconds
    on a thread, keeping the maxima."""

    def __init__(self, url: str, kv_bytes, pid: int | None) -> None:
        self.url, self.kv_bytes, self.pid = url, kv_bytes, pid
        self.peak_kv, self.peak_rss_mb = 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # a missed sample; the next one counts
            self.peak_kv = max(self.peak_kv, int(self.kv_bytes(scrape(self.url))))
        if self.pid is not None:
            self.peak_rss_mb = max(self.peak_rss_mb, rss_mb(self.pid))

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._sample()

    def __enter__(self) -> Poller:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class Served:
    """A running server: its URL, the engine name, the decode process's pid (RSS), KV bytes
    from a /metrics scrape (None: not exported), and the dtype it runs in."""

    engine: str
    url: str
    pid: int | None
    kv_bytes: Callable[[dict[str, float]], float] | None
    dtype: str
    kv_peak: Callable[[dict[str, float]], float] | None = None  # high-water mark since start
    extra: dict = field(default_factory=dict)


def drive(s: Served, model: str, prompts: list[str], decodes: list[int], b: DecodeBench) -> Record:
    """Send every prompt (streamed) with at most b.concurrency in flight; one Record."""
    before = scrape(s.url)
    load0 = os.getloadavg()[0]
    bodies = [request_body(s.engine, model, p, m) for p, m in zip(prompts, decodes, strict=True)]
    with Poller(s.url, s.kv_bytes or (lambda _: 0), s.pid) as poll:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(b.concurrency) as pool:
            timings = list(pool.map(lambda body: stream(s.url, body), bodies))
        wall = time.perf_counter() - t0
    after = scrape(s.url)
    ok = [t for t in timings if t.error is None]
    decode_tokens = sum(t.tokens - 1 for t in ok)
    span = union_s([(t.t_first, t.t_last) for t in ok])
    ttfts = [t.t_first - t.t_send for t in ok]
    tpots = [(t.t_last - t.t_first) / (t.tokens - 1) for t in ok if t.tokens > 1]
    errors: dict[str, int] = {}
    for t in timings:
        if t.error is not None:
            errors[t.error] = errors.get(t.error, 0) + 1
    extra = {
        "mode": "http", "wall_s": wall, "loadavg_1m": [load0, os.getloadavg()[0]],
        "e2e_tokens_per_s": sum(t.tokens for t in ok) / wall if wall > 0 else 0.0,
        "completion_tokens": [t.tokens for t in timings],
        "prompt_tokens": [t.prompt_tokens for t in timings], "errors": errors,
        "outcomes": [t.outcome for t in timings],
        "peak_rss_mb": poll.peak_rss_mb, "token_ids": [t.token_ids for t in timings],
        **s.extra, **engine_side(before, after),
    }  # fmt: skip
    peak = poll.peak_kv if s.kv_bytes else s.extra.get("computed_kv_bytes", 0)
    if s.kv_peak is not None and s.kv_peak(after) > s.kv_peak(before):
        peak = max(peak, int(s.kv_peak(after)))  # this run set the worker's high-water mark
    return Record(
        s.engine, b.concurrency, len(timings), decode_tokens, span,
        decode_tokens / span if span > 0 else 0.0, _pct(ttfts, 0.5), _pct(ttfts, 0.99),
        _pct(tpots, 0.5), _pct(tpots, 0.99), peak, len(ok), len(timings) - len(ok), s.dtype, extra,
    )  # fmt: skip


def engine_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the batch engine's own metrics say about the run (empty for other servers): mean
    batch per step and decode tokens per second of step time."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    steps = delta("spectrumkv_engine_batch_size_count")
    if not steps:
        return {}
    step_s = delta("spectrumkv_engine_step_seconds_sum")
    return {"engine_steps": steps,
            "mean_batch": delta("spectrumkv_engine_batch_size_sum") / steps,
            "mean_step_ms": 1000 * step_s / steps,
            "engine_tokens_per_step_s": delta("spectrumkv_engine_tokens_total") / step_s
            if step_s > 0 else 0.0}  # fmt: skip


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for child processes started inside the block."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class HttpSetup:
    """threads: torch threads of each SpectrumKV worker. vllm_cpus: CPUs vLLM's OpenMP threads
    are bound to ("" = as many as `threads`). vllm_dtype: vLLM's model dtype. hf_cb_decode:
    new tokens per request for `hf-cb` (0 = the requests' own; its steps are slow here).
    dtype: the SpectrumKV workers' compute dtype (`serve prefill|decode --dtype`); kv_dtype:
    their KV dtype, sent and paged (`--kv-dtype`). prefill_threads: torch threads of the
    prefill worker (0 = `threads`). decode_nice: the SpectrumKV decode worker's `nice` increment
    under its prefill worker on this shared host (0: equal priority; vLLM, one process,
    schedules its own prefill)."""

    model: str
    threads: int = 1
    vllm_cpus: str = ""
    vllm_dtype: str = "bfloat16"
    hf_cb_decode: int = 0
    dtype: str = "float32"
    kv_dtype: str = "float16"
    prefill_threads: int = 0
    decode_nice: int = 0


def _token_bytes(model: str, itemsize: int) -> int:
    """K+V bytes of one token, all layers, at `itemsize` bytes per element."""
    cfg = _hf_config(model)
    cfg = getattr(cfg, "text_config", cfg)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize


def _vllm_kv_bytes(cache_bytes: int):
    """vLLM's KV bytes in use: kv_cache_usage_perc (a fraction) x its cache size (its log:
    1 GiB = 46,592 tokens x 23,040 bytes for SmolLM2-135M in bfloat16)."""

    def kv(m: dict[str, float]) -> float:
        return next((v for k, v in m.items() if k.startswith("vllm:kv_cache_usage_perc")), 0.0) * (
            cache_bytes
        )

    return kv


@contextlib.contextmanager
def serve(engine: str, setup: HttpSetup, b: DecodeBench, max_context: int) -> Iterator[Served]:
    """Start `engine`'s server(s); yield it running; stop it."""
    model = setup.model
    if engine == "vllm":
        cpus = setup.vllm_cpus or cpus_for(setup.threads)
        vs = VllmSetup(model, setup.vllm_dtype, cpus)
        with VllmServer(vs, model) as v:
            kv = _vllm_kv_bytes(vs.kv_cache_gib << 30)
            yield Served("vllm", v.url, v.proc.pid, kv, f"{setup.vllm_dtype} (weights, compute "
                         "and KV)", extra={"vllm_cpus": cpus})  # fmt: skip
        return
    from ..paged.cache import PagedConfig
    from .engine import EngineConfig

    # the KV transfer deadline is raised: requests queue for the one-at-a-time prefill worker,
    # and past the default 60 s they would be recomputed on the decode worker instead
    args = ["--engine", engine, "--kv-pool-mb", str(b.pool_mb), "--attention-route", b.route,
            "--deadline", str(TRANSFER_DEADLINE_S)]  # fmt: skip
    dtype = ["--dtype", setup.dtype, "--kv-dtype", setup.kv_dtype]
    prefill_threads = ["--threads", str(setup.prefill_threads)] if setup.prefill_threads else []
    with (
        _env(OMP_NUM_THREADS=str(setup.threads)),
        Cluster(
            model,
            decode_args=args + dtype,
            prefill_args=dtype + prefill_threads,
            threads=setup.threads,
            decode_nice=setup.decode_nice,
        ) as c,
    ):
        pid = c.procs[1].pid
        if engine == "batched":
            kv_dtype = KV_DTYPES[setup.kv_dtype]
            cfg = _hf_config(model)
            window = sliding_layers(cfg.get_text_config())  # the engine's window layers
            page = PagedConfig.for_model(cfg, 1, EngineConfig.page_size, kv_dtype, window)
            per_page = page.id_bytes
            used = "spectrumkv_engine_pages{state=used}"
            dtype = f"{setup.dtype} compute, KV {setup.kv_dtype} pages"
            kv = lambda m: m.get(used, 0) * per_page  # noqa: E731
            most = lambda m: m.get("spectrumkv_engine_pages_peak", 0) * per_page  # noqa: E731
            extra = {
                "threads": setup.threads,
                "prefill_threads": setup.prefill_threads or setup.threads,
                "decode_nice": setup.decode_nice,
            }
            yield Served(engine, c.url, pid, kv, dtype, kv_peak=most, extra=extra)
        else:
            size = COMPUTE_DTYPES[setup.dtype].itemsize
            computed = max_context * _token_bytes(model, size)
            yield Served(engine, c.url, pid, None, f"{setup.dtype} compute and DynamicCache",
                         extra={"threads": setup.threads, "computed_kv_bytes": computed,
                                "decode_nice": setup.decode_nice,
                                "peak_kv_source": f"computed: largest request, "
                                f"{setup.dtype}"})  # fmt: skip


def _hf_config(model: str):
    from transformers import AutoConfig

    from ..assets import model_dir

    return AutoConfig.from_pretrained(model_dir(model))


def warm_up(s: Served, model: str) -> None:
    """One short request, so start-up costs (first step, lazy imports) stay out of the run."""
    t = stream(s.url, request_body(s.engine, model, "The history of the city begins", 4))
    if t.error is not None:
        raise RuntimeError(f"{s.engine}: the warm-up request failed: {t.error}")


def run_http(setup: HttpSetup, b: DecodeBench, engines: tuple[str, ...],
             concurrencies: tuple[int, ...]) -> list[Record]:  # fmt: skip
    """Every engine on the same prompts (the trace's contexts decoded to text) and output
    lengths, at each concurrency; `sequential` (one request at a time whatever the concurrency)
    and `hf-cb` (in process, not a server: decode = T(m tokens) - T(1 token)) only at the
    highest."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ..assets import model_dir
    from .bench import make_requests, print_row, run_hf_cb

    tok = AutoTokenizer.from_pretrained(model_dir(setup.model))
    reqs = make_requests(SimpleNamespace(tokenizer=tok), b)
    prompts = [tok.decode([*r.context.tolist(), r.last]) for r in reqs]
    decodes = [r.decode for r in reqs]
    max_context = max(int(r.context.numel()) + 1 + r.decode for r in reqs)
    contexts = [int(r.context.numel()) + 1 for r in reqs]
    cs = sorted(set(concurrencies or (b.concurrency,)))
    records = []
    for name in engines:
        if name == "hf-cb":
            import torch

            torch.set_num_threads(setup.threads)
            m = setup.hf_cb_decode
            mine = [replace(r, decode=m) for r in reqs] if m else reqs
            load0 = os.getloadavg()[0]
            rec = run_hf_cb(SimpleNamespace(name=setup.model), replace(b, concurrency=cs[-1]), mine)
            rec.extra.update(mode="in process", loadavg_1m=[load0, os.getloadavg()[0]], round=0)
            records.append(rec)
            print_row(rec)
            continue
        try:
            with serve(name, setup, b, max_context) as s:
                warm_up(s, setup.model)
                for c in cs[-1:] if name == "sequential" else cs:
                    rec = drive(s, setup.model, prompts, decodes, replace(b, concurrency=c))
                    rec.extra.update(round=0, contexts=contexts)
                    records.append(rec)
                    print_row(rec)
        except VllmUnavailable as e:  # recorded with its reason; the other engines go on
            print(f"vllm: could not run here: {e}", flush=True)
            nan = float("nan")
            records.append(Record("vllm", cs[-1], len(reqs), 0, 0.0, 0.0, nan, nan, nan, nan, 0,
                                  0, len(reqs), setup.vllm_dtype,
                                  {"mode": "http", "round": 0, "unavailable": str(e)}))  # fmt: skip
    return records
