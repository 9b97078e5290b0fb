"""`spectrumkv bench decode`: decode throughput of the batch engine against baselines, on the
same prompts, output lengths and concurrency, in one run.

Requests: `n` prompts cut from the corpus at context lengths drawn from one of paged.traces'
length mixes (scaled; default uniform x 1/16 = 250-2,000 tokens) or from `--trace FILE`; each
decodes `decode` tokens (a file's own `decode` if given). Every engine runs greedy.

Engines (`--engines`):
- `batched`: serve.BatchEngine at `concurrency` requests per step, attention route `--route`;
- `sequential`: today's one-at-a-time path (engines.hf decode_state + generate), in arrival order;
- `hf-cb`: HF transformers' continuous batching (`generate_batch`, attn "paged|sdpa").

Decode phase vs prefill: `batched` and `sequential` start from the prompts' KV, prefilled once
beforehand (the decode worker receives it; the prefill time is reported apart, `prefill_s`), so
their timed span is decode only: every request's first token and the rest. `hf-cb` prefills
itself, so its decode time is T(decode tokens) - T(1 token), both timed in this run.

Per record: aggregate decode tokens/s, TTFT and time per output token p50/p99 (all requests
arrive at t=0; TTFT counts the wait for a batch slot or for the requests before it), peak KV
bytes held, completed / failed, and for `batched` the mean step time at full batch beside its
bandwidth limit: (weight bytes + KV bytes read in a step) / plain-copy bandwidth, same run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch

from ..assets import load_text
from ..engines import omp
from ..engines.hf import Engine, decode_state, generate, prefill
from ..paged import traces
from ..paged.bench import copy_bandwidth
from ..pd.sampling import SamplingParams
from .engine import BatchEngine, EngineConfig

ENGINES = ("batched", "sequential", "hf-cb")


@dataclass(frozen=True)
class DecodeBench:
    """n requests, `decode` new tokens each, at `concurrency`; lengths from `trace` x `scale`
    (or `trace_file`), seeded. pool_mb: the batch engine's page pool."""

    n: int = 16
    concurrency: int = 16
    decode: int = 32
    trace: str = "uniform"
    scale: float = 1 / 16
    trace_file: str | None = None
    seed: int = 0
    route: str = "adaptive"
    pool_mb: float = 512.0
    corpus: str = "wiki"


@dataclass
class Record:
    engine: str
    concurrency: int
    n: int
    tokens: int
    decode_s: float
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    peak_kv_bytes: int
    completed: int
    failed: int
    dtype: str
    extra: dict = field(default_factory=dict)


@dataclass
class _Req:
    context: torch.Tensor  # 1-D ids
    last: int
    decode: int


def make_requests(engine: Engine, b: DecodeBench) -> list[_Req]:
    """Prompts cut from the corpus at the trace's context lengths (consecutive slices)."""
    if b.trace_file:
        recs = traces.load_trace(b.trace_file)
        lens = traces.file_lengths(recs, b.n, b.seed)
        start = next(i for i, r in enumerate(recs) if r["context"] == lens[0])
        decodes = [recs[(start + i) % len(recs)].get("decode") or b.decode for i in range(b.n)]
    else:
        lens, decodes = traces.lengths(b.trace, b.n, b.seed, b.scale), [b.decode] * b.n
    chars = 8 * (sum(lens) + len(lens)) + 1000  # ~4 characters a token here; margin
    text = load_text(b.corpus)[:chars]
    ids = engine.tokenizer(text, return_tensors="pt")["input_ids"][0]
    out, at = [], 0
    for n, m in zip(lens, decodes, strict=True):
        n = max(2, n)
        if at + n + 1 > ids.numel():
            at = 0
        out.append(_Req(ids[at : at + n], int(ids[at + n]), m))
        at += n + 1
    return out


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


def _record(name, b, tokens, span, ttfts, tpots, peak, failed, dtype, **extra) -> Record:
    return Record(
        name, b.concurrency, b.n, tokens, span, tokens / span if span > 0 else 0.0,
        _pct(ttfts, 0.5), _pct(ttfts, 0.99), _pct(tpots, 0.5), _pct(tpots, 0.99),
        peak, b.n - failed, failed, dtype, extra,
    )  # fmt: skip


def run_sequential(engine: Engine, b: DecodeBench, reqs, pres) -> Record:
    """One request at a time from an HF DynamicCache (float32 compute, fp16 KV rounded)."""
    t0 = time.perf_counter()
    dtype = engine.compute_dtype
    token_bytes = engine.fingerprint.kv_token_bytes(dtype.itemsize)  # DynamicCache
    ttfts, tpots, tokens, peak, outs = [], [], 0, 0, []
    for r, pre in zip(reqs, pres, strict=True):
        first: list[float] = []

        def on_token(_: int, first: list[float] = first) -> None:
            if not first:
                first.append(time.perf_counter())

        out = generate(engine, decode_state(engine, pre.layers, pre.n_tokens), r.last, r.decode,
                       on_token)  # fmt: skip
        end = time.perf_counter()
        ttfts.append(first[0] - t0)
        tpots.append((end - first[0]) / max(1, len(out) - 1))
        tokens += len(out)
        outs.append(out)
        peak = max(peak, token_bytes * (int(pre.layers[0].positions.numel()) + len(out)))
    return _record("sequential", b, tokens, time.perf_counter() - t0, ttfts, tpots, peak, 0,
                   f"{_name(dtype)} compute, KV {_name(dtype)} (from fp16)",
                   token_ids=outs)  # fmt: skip


def run_batched(engine: Engine, b: DecodeBench, reqs, pres) -> Record:
    """All requests submitted at t=0 to a BatchEngine of `concurrency` slots."""
    cfg = EngineConfig(pool_mb=b.pool_mb, max_batch=b.concurrency, max_queue=b.n,
                       queue_timeout_s=3600, route=b.route)  # fmt: skip
    eng = BatchEngine(engine, cfg)
    omp.release()  # this thread's team (the pool's zeros) exits: the engine's is the only one
    steps: list[tuple[int, float, str]] = []
    peak = [0]
    used_bytes = eng.cache.config.id_bytes

    def on_step(batch: int, dt: float, route: str) -> None:
        steps.append((batch, dt, route))
        peak[0] = max(peak[0], (eng.total_pages - eng.cache.free_pages) * used_bytes)

    eng.on_step = on_step
    try:
        t0 = time.perf_counter()
        gens = [eng.submit(SamplingParams(max_tokens=r.decode), r.last, p.n_tokens,
                           layers=p.layers) for r, p in zip(reqs, pres, strict=True)]  # fmt: skip
        failed = 0
        for g in gens:
            try:
                g.wait()
            except Exception:  # noqa: BLE001 - counted
                failed += 1
        span = time.perf_counter() - t0
    finally:
        eng.close()
    ok = [g for g in gens if g.error is None]
    ttfts = [g.ttft_s for g in ok]
    tpots = [(g.total_s - g.ttft_s) / max(1, len(g.token_ids) - 1) for g in ok]
    full = [dt for batch, dt, _ in steps if batch == b.concurrency]
    routes: dict[str, int] = {}
    for _, _, route in steps:
        routes[route] = routes.get(route, 0) + 1
    extra = {"steps": len(steps), "routes": routes,
             "mean_batch": sum(s[0] for s in steps) / max(1, len(steps)),
             "full_batch_step_ms": 1000 * statistics.median(full) if full else None,
             "attention_profile": eng.profile_source}  # fmt: skip
    extra.update(_limit(engine, pres, b, eng.cache.config.dtype.itemsize))
    extra["token_ids"] = [g.token_ids for g in gens]
    return _record("batched", b, sum(len(g.token_ids) for g in ok), span, ttfts, tpots, peak[0],
                   failed, f"{_name(engine.compute_dtype)} compute, KV "
                   f"{_name(eng.cache.config.dtype)} pages", **extra)  # fmt: skip


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_bandwidth(nbytes: int = 256 << 20, reps: int = 5) -> float:
    """Bytes/s a torch sum reads from an nbytes float32 buffer (best of reps)."""
    buf = torch.ones(nbytes // 4)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes a decode step reads: the model's parameters and buffers (packed weights:
    engines.packed) in their dtype, each tensor once, less the input embedding when the LM head
    does not read it (untied, or packed apart): a step gathers only its B rows. A packed layer
    with a few-row copy (`dot`) counts that one only: a step of at most `engines.packed.DOT_ROWS`
    rows reads only it (a larger one reads oneDNN's copy instead: the same bytes)."""
    unread = {id(m.packed) for m in model.modules() if getattr(m, "dot", None) is not None}
    tensors = [*model.parameters(), *model.buffers()]  # each deduplicated by torch
    total = sum(t.numel() * t.element_size() for t in tensors if id(t) not in unread)
    emb = model.get_input_embeddings().weight
    if getattr(model.get_output_embeddings(), "weight", None) is not emb:
        total -= emb.numel() * emb.element_size()
    return total


def _limit(engine: Engine, pres, b: DecodeBench, kv_itemsize: int) -> dict:
    """The bandwidth limits of a full-batch step at the first `concurrency` requests' midpoint
    lengths: weight bytes (compute dtype) + K/V bytes read, / the plain-copy rate (bytes
    copied per second; the issue's definition, loose: a copy also writes) and / the read rate
    (a torch sum: bytes read per second, the honest one), both measured in this run."""
    weights = weight_bytes(engine.model)
    ctx = [p.n_tokens + b.decode // 2 for p in pres[: b.concurrency]]
    kv = engine.fingerprint.step_read_bytes(ctx, kv_itemsize)
    bw, rd = copy_bandwidth(256 << 20), read_bandwidth()
    return {"weight_bytes": weights, "kv_bytes_per_step": kv, "copy_gbps": bw / 1e9,
            "limit_ms": 1000 * (weights + kv) / bw, "read_gbps": rd / 1e9,
            "limit_read_ms": 1000 * (weights + kv) / rd}  # fmt: skip


def run_hf_cb(engine: Engine, b: DecodeBench, reqs) -> Record:
    """HF transformers' `generate_batch` (continuous batching, paged|sdpa attention), same
    weights in float32; decode time = T(decode) - T(1 token), both timed here."""
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from ..assets import model_dir

    model = AutoModelForCausalLM.from_pretrained(
        model_dir(engine.name), dtype=torch.float32, attn_implementation="paged|sdpa"
    ).eval()
    inputs = [torch.cat([r.context, torch.tensor([r.last])]).tolist() for r in reqs]
    m = max(r.decode for r in reqs)
    # its cache sized to the requests (left to itself it sizes it from free memory), at most
    # `concurrency` requests per step, no warm-up (CUDA graphs only)
    page = 64
    blocks = sum(-(-(len(x) + m) // page) for x in inputs)
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=2048,
                                  max_requests_per_batch=b.concurrency)  # fmt: skip
    times = {}
    for new in (1, m):
        gc = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None)
        t = time.perf_counter()
        out = model.generate_batch(inputs, generation_config=gc, continuous_batching_config=cb,
                                   warmup=False)  # fmt: skip
        times[new] = time.perf_counter() - t
    tokens = sum(len(o.generated_tokens) for o in out.values())
    span = times[m] - times[1]
    decode_tokens = tokens - len(out)
    return _record("hf-cb", b, decode_tokens, span, [times[1]] * len(out),
                   [span / max(1, m - 1)] * len(out), 0, b.n - len(out), "float32",
                   total_s=times[m], first_token_s=times[1])  # fmt: skip


def _fresh_thread(fn, *args):
    """fn(*args) on a new thread, whose OpenMP team (if it opens one) ends with it. Every phase
    of the bench gets its own thread and the calling thread keeps none (`run`): one-token steps
    ran 10-100x slower here on a thread that had run a long prefill, or beside one that kept its
    team, because libgomp puts idle workers to sleep once teams outnumber the CPUs
    (engines.omp)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


def run(
    engine: Engine,
    b: DecodeBench,
    engines: tuple[str, ...],
    rounds: int = 1,
    concurrencies: tuple[int, ...] = (),
) -> list[Record]:
    """Prefill every prompt once, then time each engine on the same requests, `rounds` times
    in alternation, at each of `concurrencies` (default: b.concurrency). `sequential` does not
    depend on concurrency: it runs once per round (recorded at concurrency 1)."""
    reqs = make_requests(engine, b)
    omp.release()  # this thread's team (it loaded the model) exits: each phase runs on its own
    t = time.perf_counter()
    pres = _fresh_thread(lambda: [prefill(engine, r.context) for r in reqs])
    prefill_s = time.perf_counter() - t
    records = []
    for round_ in range(rounds):  # engines alternate, so each sees the same machine load
        for name in engines:
            for c in (1,) if name == "sequential" else concurrencies or (b.concurrency,):
                bc = replace(b, concurrency=c)
                load0 = os.getloadavg()[0]
                if name == "batched":
                    rec = _fresh_thread(run_batched, engine, bc, reqs, pres)
                elif name == "sequential":
                    rec = _fresh_thread(run_sequential, engine, bc, reqs, pres)
                else:
                    rec = _fresh_thread(run_hf_cb, engine, bc, reqs)
                rec.extra.update(round=round_, prefill_s=prefill_s,
                                 contexts=[int(r.context.numel()) for r in reqs],
                                 loadavg_1m=[load0, os.getloadavg()[0]])  # fmt: skip
                records.append(rec)
                print_row(rec)
    return records


def _rounds(records: list[Record]) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = {}
    for r in records:
        out.setdefault(r.extra.get("round", 0), []).append(r)
    return out


def ratios(records: list[Record]) -> dict[tuple[str, int], list[float]]:
    """{(engine, concurrency): per round, batched tokens/s at that concurrency / the engine's
    tokens/s in the same round (sequential: at any concurrency)}."""
    out: dict[tuple[str, int], list[float]] = {}
    for rs in _rounds(records).values():
        for bat in (r for r in rs if r.engine == "batched"):
            for r in rs:
                same_c = r.concurrency == bat.concurrency or r.engine == "sequential"
                if r.engine != "batched" and same_c and r.tokens_per_s > 0:
                    key = (r.engine, bat.concurrency)
                    out.setdefault(key, []).append(bat.tokens_per_s / r.tokens_per_s)
    return out


def identical(records: list[Record]) -> list[tuple[int, int, int]]:
    """(concurrency, requests whose batched greedy tokens equal the sequential ones in the same
    round, requests), per batched record."""
    out = []
    for rs in _rounds(records).values():
        seq = next((r for r in rs if r.engine == "sequential"), None)
        for bat in (r for r in rs if r.engine == "batched" and seq is not None):
            a, b = bat.extra["token_ids"], seq.extra["token_ids"]
            out.append((bat.concurrency, sum(x == y for x, y in zip(a, b, strict=True)), len(a)))
    return out


def plot(records: list[Record], path: str) -> None:
    """Decode tokens/s vs concurrency, one line per engine (median over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.engine for r in records):
        pts: dict[int, list[float]] = {}
        for r in records:
            if r.engine == name:
                pts.setdefault(r.concurrency, []).append(r.tokens_per_s)
        cs = sorted(pts)
        ys = [statistics.median(pts[c]) for c in cs]
        label = name if len(cs) > 1 else f"{name} (at {cs[0]})"
        if name == "sequential":  # one request at a time whatever the concurrency
            cs = sorted({r.concurrency for r in records})
            ys = ys * len(cs)
        ax.plot(cs, ys, marker="o", label=label, linestyle="--" if "(" in label else "-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("aggregate decode tokens/s")
    via = "via HTTP" if records[0].extra.get("mode") == "http" else "in process"
    ax.set_title(f"decode tokens/s, {via}, shared 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_header() -> None:
    print(f"{'engine':<11} {'conc':>4} {'tokens':>6} {'decode s':>8} {'tok/s':>7} "
          f"{'TTFT p50':>8} {'p99':>7} {'TPOT p50':>8} {'p99':>7} {'peak KV MB':>10} "
          f"{'ok':>3} {'fail':>4}", flush=True)  # fmt: skip


def print_row(r: Record) -> None:
    print(f"{r.engine:<11} {r.concurrency:>4} {r.tokens:>6} {r.decode_s:>8.2f} "
          f"{r.tokens_per_s:>7.2f} {r.ttft_p50_s:>8.2f} {r.ttft_p99_s:>7.2f} "
          f"{r.tpot_p50_s:>8.3f} {r.tpot_p99_s:>7.3f} {r.peak_kv_bytes / 2**20:>10.1f} "
          f"{r.completed:>3} {r.failed:>4}", flush=True)  # fmt: skip


def write_json(records: list[Record], path: str) -> None:
    with open(path, "w") as f:
        json.dump([asdict(r) for r in records], f, indent=1)
