"""A small synchronous client for the decode worker's HTTP front (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post(url: str, path: str, body: dict, timeout: float = 300.0) -> dict:
    """POST a JSON body; returns the JSON answer. Raises urllib.error.HTTPError on an error
    status (its body is the worker's OpenAI-shaped JSON error)."""
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def complete(url: str, prompt: str, max_tokens: int = 16, timeout: float = 300.0, **opts) -> dict:
    """POST /v1/completions; `opts` go into the `spectrumkv` field (policy, budget, chat, ...)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "spectrumkv": opts}
    return post(url, "/v1/completions", body, timeout)


def token_ids(response: dict) -> list[int]:
    """The first choice's generated token ids."""
    return response["choices"][0]["token_ids"]


def get_json(url: str, path: str, timeout: float = 30.0) -> tuple[int, dict]:
    """GET a JSON resource: (HTTP status, body), error statuses included (e.g. /health's 503)."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_text(url: str, path: str, timeout: float = 30.0) -> str:
    with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as resp:
        return resp.read().decode()
