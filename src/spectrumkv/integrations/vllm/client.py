"""Measuring requests through a running 1P1D pair: streamed TTFT, answers and bytes on the wire.

Used by `spectrumkv vllm-demo`, `spectrumkv bench vllm` and the integration tests.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .launch import VllmPD


@dataclass
class Answer:
    """One request. ttft_s: request sent -> first streamed token at the client (seconds).
    wire_bytes / fp16_bytes: the producer's counters for this request (SpectrumKV), or the bytes
    ExampleConnector wrote to its shared directory (fp16_bytes = wire_bytes then).
    push_s: the producer's score + encode + push until the consumer's verdict; load_s: the
    consumer's claim + write into the paged cache (SpectrumKV only, else 0)."""

    text: str
    ttft_s: float
    total_s: float
    wire_bytes: int
    fp16_bytes: int
    fallback: str
    push_s: float = 0.0
    load_s: float = 0.0


def stream_completion(
    url: str, body: dict, headers: dict[str, str] | None = None, timeout_s: float = 600.0
) -> tuple[str, float, float, dict[str, str]]:
    """POST a streamed /v1/completions request; returns (text, ttft_s, total_s, headers)."""
    data = json.dumps({**body, "stream": True}).encode()
    req = urllib.request.Request(
        url + "/v1/completions",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    t0 = time.perf_counter()
    ttft, parts = 0.0, []
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        reply_headers = dict(r.headers)
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            text = event["choices"][0].get("text", "")
            if text and not ttft:
                ttft = time.perf_counter() - t0
            parts.append(text)
    return "".join(parts), ttft, time.perf_counter() - t0, reply_headers


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def completion_body(model: str, prompt: list[int] | str, max_tokens: int, salt: str = "") -> dict:
    """A greedy /v1/completions body that always generates `max_tokens` tokens; `salt` keeps
    it out of other requests' prefix-cache entries."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    if salt:
        body["cache_salt"] = salt
    return body


def ask(
    pd: VllmPD,
    prompt: list[int] | str,
    max_tokens: int,
    budget: float | None = None,
    salt: str = "",
) -> Answer:
    """One greedy request through the proxy, with the bytes it moved."""
    body = completion_body(pd.setup.model, prompt, max_tokens, salt)
    headers = {"X-SpectrumKV-Budget": str(budget)} if budget is not None else {}
    if pd.setup.connector == "example":
        storage = pd.setup.log_dir / "example-storage"
        before = _dir_bytes(storage)
        text, ttft, total, h = stream_completion(pd.proxy_url, body, headers)
        wire = _dir_bytes(storage) - before
        return Answer(text, ttft, total, wire, wire, h.get("X-SpectrumKV-Fallback", ""))
    before_p, before_d = pd.metrics("prefill"), pd.metrics("decode")
    text, ttft, total, h = stream_completion(pd.proxy_url, body, headers)
    p = _delta(_wait_counters(pd, before_p), before_p)
    d = _delta(pd.metrics("decode"), before_d)
    return Answer(
        text,
        ttft,
        total,
        int(p["wire_bytes_total"]),
        int(p["fp16_bytes_total"]),
        h.get("X-SpectrumKV-Fallback", ""),
        p["transfer_seconds_sum"],
        d["transfer_seconds_sum"],
    )


_KEYS = ("wire_bytes_total", "fp16_bytes_total", "transfer_seconds_sum")


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    """Counter growth, keyed without the vllm:spectrumkv_ prefix."""
    return {
        k: after.get(f"vllm:spectrumkv_{k}", 0.0) - before.get(f"vllm:spectrumkv_{k}", 0.0)
        for k in _KEYS
    }


def _wait_counters(pd: VllmPD, before: dict[str, float], timeout_s: float = 15.0) -> dict:
    """vLLM publishes connector stats with its step outputs: wait until they moved."""
    key = "vllm:spectrumkv_transfers_total"
    fail = "vllm:spectrumkv_failures_total"
    deadline = time.monotonic() + timeout_s
    while True:
        now = pd.metrics("prefill")
        moved = now.get(key, 0) > before.get(key, 0) or now.get(fail, 0) > before.get(fail, 0)
        if moved or time.monotonic() > deadline:
            return now
        time.sleep(0.5)
