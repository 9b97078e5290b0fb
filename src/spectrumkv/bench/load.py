"""`spectrumkv bench load`: concurrent clients through the HTTP front for a set time.

Real workers; N client threads each send completions back to back (prompts of mixed lengths cut
from real text, random policy budgets) until the time is up. Reports completed and failed
requests, TTFT percentiles (as the decode worker measures it: request arrival to first token,
queueing included), and both workers' resident memory sampled over the run; "flat memory"
compares the last quarter of the run with the second. The decode worker runs with its default
settings, the KV transfer deadline included (`deadline_s` in the report): a transfer that waits
behind queued prefills past it is recomputed and counted in `recomputed`.
"""

from __future__ import annotations

import json
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


@dataclass
class LoadReport:
    clients: int
    duration_s: float
    deadline_s: float = DecodeConfig.deadline_s  # the decode worker's default, not raised
    completed: int = 0
    recomputed: int = 0
    failed: int = 0
    errors: dict = field(default_factory=dict)
    ttft_p50_s: float = 0.0
    ttft_p99_s: float = 0.0
    in_flight_after: int = 0
    memory: list = field(default_factory=list)  # (t_s, decode_rss_mb, prefill_rss_mb)
    decode_rss_growth_mb: float = 0.0  # mean of the last quarter minus mean of the second


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
) -> LoadReport:
    report = LoadReport(clients, duration_s)
    prompts = _prompts(256, lengths, seed)
    ttfts: list[float] = []
    lock = threading.Lock()
    with Cluster(model) as c:
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
                except (urllib.error.URLError, TimeoutError, OSError) as e:
                    key = getattr(e, "code", None) or type(e).__name__
                    with lock:
                        report.failed += 1
                        report.errors[str(key)] = report.errors.get(str(key), 0) + 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            report.memory.append((time.monotonic() - t0, rss_mb(pids[0]), rss_mb(pids[1])))
            time.sleep(2.0)
        report.in_flight_after = get_json(c.url, "/health")[1]["in_flight"]
    report.ttft_p50_s = _percentile(ttfts, 0.5)
    report.ttft_p99_s = _percentile(ttfts, 0.99)
    mem = report.memory
    q = max(1, len(mem) // 4)
    if len(mem) >= 4:
        second = [m[1] for m in mem[q : 2 * q]]
        last = [m[1] for m in mem[-q:]]
        report.decode_rss_growth_mb = sum(last) / len(last) - sum(second) / len(second)
    return report


def plot(report: LoadReport, path: str) -> None:
    t = [m[0] for m in report.memory]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(t, [m[1] for m in report.memory], label="decode worker")
    ax.plot(t, [m[2] for m in report.memory], label="prefill worker")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("resident memory (MB)")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{report.clients} clients: {report.completed} done, {report.failed} failed, "
        f"TTFT p50 {report.ttft_p50_s:.1f} s, default deadline {report.deadline_s:g} s"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(report: LoadReport, path: str) -> None:
    with open(path, "w") as f:
        json.dump(asdict(report), f, indent=1)
