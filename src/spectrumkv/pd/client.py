"""A small synchronous client for the decode worker's HTTP front (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def complete(url: str, prompt: str, max_tokens: int = 16, timeout: float = 300.0, **opts) -> dict:
    """POST /v1/completions; `opts` go into the `spectrumkv` field (policy, budget, chat, ...).
    Raises urllib.error.HTTPError with the worker's JSON error on failure."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "spectrumkv": opts}
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def get_text(url: str, path: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as resp:
        return resp.read().decode()
