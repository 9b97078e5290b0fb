"""`spectrumkv bench load`: concurrent clients through the HTTP front for a set time.

Real workers; N client threads each send completions back to back (prompts of mixed lengths cut
from real text, random policy budgets) until the time is up. Reports completed and failed
requests, TTFT percentiles (as the decode worker measures it: request arrival to first token,
queueing included), and both workers' resident memory sampled over the run; "flat memory"
compares the last quarter of the run with the second. The decode worker runs with its default
settings (the continuous-batching engine), the KV transfer deadline included (`deadline_s` in
the report): a transfer that waits behind queued prefills past it is recomputed and counted in
`recomputed`. `kv_pool_mb` sets the engine's page pool (0 = its default); a request the pool
cannot take in time is an HTTP 503, counted in `rejected` (a clear refusal, not a failure).
From the worker's /metrics: the engine's steps, mean batch size and decode tokens/s over the
run, and its pool pages used / reserved once every client has finished (0 = nothing leaked).
The machine's 1-minute load average is sampled beside the memory.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
from dataclasses import asdict, dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..assets import load_text  # noqa: E402
from ..pd.client import complete, get_json  # noqa: E402
from ..pd.decode_worker import DecodeConfig  # noqa: E402
from ..pd.launch import Cluster, rss_mb  # noqa: E402
from ..serve.metrics import read as read_metrics  # noqa: E402


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    deadline_s: float = DecodeConfig.deadline_s  # the decode worker's default, not raised
    kv_pool_mb: float = 0.0  # the engine's page pool (0 = the worker's default)
    completed: int = 0
    recomputed: int = 0
    rejected: int = 0  # HTTP 503: the page pool could not take the request in time
    failed: int = 0
    errors: dict = field(default_factory=dict)
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    in_flight_after: int = 0
    memory: list = field(default_factory=list)  # (t_s, decode_rss_mb, prefill_rss_mb, load1)
    decode_rss_growth_mb: float = 0.0  # mean of the last quarter minus mean of the second
    load_avg_mean: float = 0.0  # the machine's 1-minute load average, mean over the run
    engine_steps: int = 0
    mean_batch: float = 0.0  # requests per decode step
    decode_tokens_per_s: float = 0.0  # tokens generated / seconds spent in decode steps
    pages_total: int = 0
    pages_used_after: int = -1  # after every client finished (-1: no engine metrics)
    pages_reserved_after: int = -1


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _prompts(n: int, lengths: tuple[int, ...], seed: int) -> list[str]:
    words = load_text("wiki").split()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        size = rng.choice(lengths)
        start = rng.randrange(len(words) - size)
        out.append(" ".join(words[start : start + size]))  # ~1.3 tokens per word
    return out


def run_load(
    model: str,
    clients: int,
    duration_s: float,
    lengths: tuple[int, ...] = (48, 192, 384),
    max_tokens: int = 4,
    seed: int = 0,
    kv_pool_mb: float = 0.0,
) -> LoadReport:
    report = LoadReport(clients, duration_s, kv_pool_mb=kv_pool_mb)
    prompts = _prompts(256, lengths, seed)
    ttfts: list[float] = []
    lock = threading.Lock()
    args = ["--kv-pool-mb", str(kv_pool_mb)] if kv_pool_mb else []
    with Cluster(model, args) as c:
        pids = (c.procs[1].pid, c.procs[0].pid)
        stop_at = time.monotonic() + duration_s

        def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < stop_at:
                budget = rng.choice((1.0, 0.5, 0.3))
                try:
                    r = complete(c.url, rng.choice(prompts), max_tokens, timeout=600, budget=budget)
                    s = r["spectrumkv"]
                    with lock:
                        report.completed += 1
                        report.recomputed += s["outcome"] == "recomputed"
                        ttfts.append(s["ttft_s"])
                except urllib.error.HTTPError as e:
                    with lock:
                        if e.code == 503:
                            report.rejected += 1
                        else:
                            report.failed += 1
                        report.errors[str(e.code)] = report.errors.get(str(e.code), 0) + 1
                except (urllib.error.URLError, TimeoutError, OSError) as e:
                    key = type(e).__name__
                    with lock:
                        report.failed += 1
                        report.errors[key] = report.errors.get(key, 0) + 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        before = read_metrics(c.url)
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            now = time.monotonic() - t0
            report.memory.append((now, rss_mb(pids[0]), rss_mb(pids[1]), os.getloadavg()[0]))
            time.sleep(2.0)
        report.in_flight_after = get_json(c.url, "/health")[1]["in_flight"]
        _engine_figures(report, before, read_metrics(c.url))
    report.ttft_p50_s = _percentile(ttfts, 0.5)
    report.ttft_p99_s = _percentile(ttfts, 0.99)
    mem = report.memory
    report.load_avg_mean = sum(m[3] for m in mem) / len(mem) if mem else 0.0
    q = max(1, len(mem) // 4)
    if len(mem) >= 4:
        second = [m[1] for m in mem[q : 2 * q]]
        last = [m[1] for m in mem[-q:]]
        report.decode_rss_growth_mb = sum(last) / len(last) - sum(second) / len(second)
    return report


def _engine_figures(report: LoadReport, before: dict, after: dict) -> None:
    """The engine's counters over the run and its pool after it, from two /metrics reads."""
    if "spectrumkv_engine_pages{state=used}" not in after:
        return  # the sequential engine: no pool

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("spectrumkv_engine_batch_size_count")
    step_s = delta("spectrumkv_engine_step_seconds_sum")
    report.engine_steps = int(steps)
    report.mean_batch = delta("spectrumkv_engine_batch_size_sum") / steps if steps else 0.0
    report.decode_tokens_per_s = delta("spectrumkv_engine_tokens_total") / step_s if step_s else 0.0
    used, free = (
        after["spectrumkv_engine_pages{state=used}"],
        after["spectrumkv_engine_pages{state=free}"],
    )
    report.pages_total = int(used + free)
    report.pages_used_after = int(used)
    report.pages_reserved_after = int(after["spectrumkv_engine_pages{state=reserved}"])


def plot(report: LoadReport, path: str) -> None:
    t = [m[0] for m in report.memory]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(t, [m[1] for m in report.memory], label="decode worker")
    ax.plot(t, [m[2] for m in report.memory], label="prefill worker")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("resident memory (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{report.clients} clients: {report.completed} done, {report.rejected} 503, "
        f"{report.failed} failed, TTFT p50 {report.ttft_p50_s:.1f} s, "
        f"load avg {report.load_avg_mean:.1f}",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: LoadReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(report), f, indent=1)
