"""`spectrumkv vllm-proxy`: an OpenAI-compatible front for one prefill and one decode instance.

Per request (POST /v1/completions or /v1/chat/completions):
1. a fresh transfer id; the request goes to the prefill instance with max_tokens 1, no
   streaming, and kv_transfer_params {transfer id, budget}: the producer pushes the prompt's KV
   to the decode instance before that call returns;
2. the request goes to the decode instance with kv_transfer_params {transfer id, load}, and its
   answer (streamed or not) is passed back unchanged.
If the prefill instance fails or cannot be reached, the decode instance serves the request on
its own (it prefills the prompt itself) and the reply says so in `X-SpectrumKV-Fallback`.
Client-supplied kv_transfer_params are discarded. `X-SpectrumKV-Budget: 0.3` on a request
overrides the producer's budget for it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .config import BUDGET, LOAD, TRANSFER_ID

log = logging.getLogger("spectrumkv.vllm.proxy")
ROUTES = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ProxyConfig:
    """prefill_url / decode_url: base URLs of the two vLLM servers. transfer: send SpectrumKV
    kv_transfer_params (False for connectors that need none, e.g. vLLM's ExampleConnector).
    Timeouts in seconds."""

    prefill_url: str
    decode_url: str
    transfer: bool = True
    prefill_timeout_s: float = 300.0
    decode_timeout_s: float = 600.0


def prefill_body(body: dict, transfer_id: str, budget: float | None, transfer: bool) -> dict:
    """The prefill instance's copy of a request: one token, no streaming."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out.pop("kv_transfer_params", None)
    if transfer:
        params: dict = {TRANSFER_ID: transfer_id}
        if budget is not None:
            params[BUDGET] = budget
        out["kv_transfer_params"] = params
    return out


def decode_body(body: dict, transfer_id: str | None) -> dict:
    """The decode instance's copy: as sent, with load parameters when a transfer happened."""
    out = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if transfer_id is not None:
        out["kv_transfer_params"] = {TRANSFER_ID: transfer_id, LOAD: True}
    return out


class Proxy:
    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession()

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            budget_text = request.headers.get("X-SpectrumKV-Budget")
            budget = float(budget_text) if budget_text is not None else None
        except ValueError as e:
            return web.json_response({"error": f"bad request: {e}"}, status=400)
        transfer_id = uuid.uuid4().hex
        fallback = await self._prefill(request.path, body, transfer_id, budget)
        sent_id = transfer_id if (self.cfg.transfer and not fallback) else None
        headers = {"X-SpectrumKV-Transfer": transfer_id}
        if fallback:
            headers["X-SpectrumKV-Fallback"] = fallback[:200]
        return await self._decode(request, decode_body(body, sent_id), headers)

    async def _prefill(self, path: str, body: dict, transfer_id: str, budget: float | None) -> str:
        """Run the prefill half; returns "" on success, else why the decode side prefills."""
        assert self.session is not None
        pbody = prefill_body(body, transfer_id, budget, self.cfg.transfer)
        timeout = aiohttp.ClientTimeout(total=self.cfg.prefill_timeout_s)
        try:
            async with self.session.post(
                self.cfg.prefill_url + path, json=pbody, timeout=timeout
            ) as r:
                text = await r.text()
                if r.status != 200:
                    log.warning("prefill instance answered %d: %s", r.status, text[:200])
                    return f"prefill instance answered HTTP {r.status}"
            return ""
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("prefill instance unreachable: %s", e)
            return f"prefill instance unreachable: {type(e).__name__}"

    async def _decode(
        self, request: web.Request, body: dict, headers: dict[str, str]
    ) -> web.StreamResponse:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=self.cfg.decode_timeout_s)
        try:
            async with self.session.post(
                self.cfg.decode_url + request.path, json=body, timeout=timeout
            ) as r:
                if not body.get("stream"):
                    data = await r.read()
                    return web.Response(
                        body=data,
                        status=r.status,
                        content_type="application/json",
                        headers=headers,
                    )
                out = web.StreamResponse(status=r.status, headers=headers)
                out.content_type = r.content_type
                await out.prepare(request)
                async for chunk in r.content.iter_any():
                    await out.write(chunk)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, TimeoutError) as e:
            return web.json_response(
                {"error": f"decode instance failed: {type(e).__name__}: {e}"},
                status=502,
                headers=headers,
            )

    async def health(self, request: web.Request) -> web.Response:
        assert self.session is not None
        status = {}
        for name, url in (("prefill", self.cfg.prefill_url), ("decode", self.cfg.decode_url)):
            try:
                async with self.session.get(url + "/health", timeout=aiohttp.ClientTimeout(5)) as r:
                    status[name] = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                status[name] = False
        return web.json_response(status, status=200 if all(status.values()) else 503)


def make_app(cfg: ProxyConfig) -> web.Application:
    proxy = Proxy(cfg)
    app = web.Application(client_max_size=16 << 20)
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    for route in ROUTES:
        app.router.add_post(route, proxy.handle)
    app.router.add_get("/health", proxy.health)
    return app


async def serve_proxy(cfg: ProxyConfig, host: str, port: int) -> None:
    """Serve until cancelled."""
    runner = web.AppRunner(make_app(cfg))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"READY proxy {host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
