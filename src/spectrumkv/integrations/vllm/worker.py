"""Worker side of the connector: runs in vLLM's worker process, next to the paged KV cache.

Producer, once per step (`wait_for_save`, after the forward wrote this step's KV): for each
prompt whose prefill just finished, copy its K/V out of the paged blocks, score tokens by key
norm, plan tiers under the budget, encode with the wire format and push to the consumer. The
push waits for the consumer's verdict, so when the prefill request returns, the decode side
holds a verified payload (or a recorded failure).

Importance inside vLLM: attention weights are never materialised by its kernels, so the
producer scores with a proxy that needs only the cached keys (config.PROXIES, default key norm:
tokens with small key norms draw the most attention, Devoto et al. 2024); `spectrumkv eval
agreement` measures how such proxies rank tokens against the HF pipeline's window attention.

Consumer: a receiver thread accepts pushes into an inbox (decoded and verified on arrival). At
the start of a step (`start_load_kv`) each load claims its payload, checks it is for this
prompt, and writes positions [start, end) into the request's blocks. Any failure marks those
blocks as load errors; vLLM (kv_load_failure_policy=recompute) then recomputes them.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import replace

import torch

from ...config import PolicyConfig, ScoreConfig
from ...errors import BudgetError, ConfigError, SpectrumKVError
from ...importance import score_tokens
from ...kv import LayerKV
from ...pipeline import new_header
from ...policy import Plan, plan
from ...tiers import Tier
from ...transport.framing import TransportError
from ...transport.push import (
    BackgroundLoop,
    KVInbox,
    PushReceiver,
    TransferFailed,
    push_payload,
    start_receiver,
)
from ...transport.shaper import LinkShaper
from ...transport.tls import client_context, server_context
from ...wire import Fingerprint, Header, frame_bytes, header_bytes
from .config import ConnectorConfig
from .meta import LoadReq, SendReq, SpectrumKVMetadata
from .paged import PagedLayout, gather, learn_layout, scatter, token_slots
from .stats import SpectrumKVStats

log = logging.getLogger("spectrumkv.vllm")


def _layer_index(name: str) -> int:
    m = re.search(r"\d+", name)
    if m is None:
        raise ConfigError(f"cannot tell the layer index of {name!r}")
    return int(m.group())


def cpu_write_op(isa: str):
    """The CPU attention backend's cache write, as `paged.learn_layout` calls it."""
    from vllm import _custom_ops as ops

    def write(k, v, block, slots) -> None:
        nb, h, bs, _ = block.shape
        kc, vc = block.view(nb, h, bs * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, kv_cache_dtype="auto")

    return write


def plan_no_drop(scores: torch.Tensor, header: Header, policy: PolicyConfig) -> Plan:
    """`policy.plan`, refusing a plan that drops tokens (the paged cache keeps every position):
    raises BudgetError when the budget is below what the policy reaches without dropping."""
    p = plan(scores, header, policy)
    dropped = int((p.tiers[p.present] == int(Tier.DROP)).sum())
    if dropped:
        raise BudgetError(
            f"budget {policy.budget} needs {dropped} dropped (layer, token) slots; vLLM's paged "
            "cache keeps every token, so the connector never drops"
        )
    return p


class PagedCache:
    """vLLM's per-layer cache tensors in layer order, with their learned block layout."""

    def __init__(self, kv_caches: dict[str, torch.Tensor], fp: Fingerprint, isa: str) -> None:
        self.names = sorted(kv_caches, key=_layer_index)
        self.tensors = [kv_caches[n] for n in self.names]
        t = self.tensors[0]
        if len(self.tensors) != fp.n_layers:
            raise ConfigError(
                f"{len(self.tensors)} KV cache layers for a {fp.n_layers}-layer model"
            )
        if t.dim() != 4 or t.shape[1] != fp.n_kv_heads or t.shape[3] != 2 * fp.head_dim:
            raise ConfigError(
                f"unsupported KV cache shape {tuple(t.shape)}: SpectrumKVConnector supports "
                "vLLM's CPU attention layout [blocks, kv_heads, block_size, 2 * head_dim]"
            )
        if t.dtype != torch.bfloat16 or not all(x.is_contiguous() for x in self.tensors):
            raise ConfigError(f"unsupported KV cache: dtype {t.dtype}, needs contiguous bfloat16")
        self.layout: PagedLayout = learn_layout(
            fp.n_kv_heads, t.shape[2], fp.head_dim, cpu_write_op(isa)
        )

    def read(self, block_ids: list[int], n_tokens: int) -> list[LayerKV]:
        blocks, offsets = token_slots(self.layout, block_ids, 0, n_tokens)
        positions = torch.arange(n_tokens)
        out = []
        for t in self.tensors:
            k, v = gather(self.layout, t, blocks, offsets)
            out.append(LayerKV(k, v, positions))
        return out

    def write(self, block_ids: list[int], start: int, end: int, layers: list[LayerKV]) -> None:
        blocks, offsets = token_slots(self.layout, block_ids, start, end)
        for t, kv in zip(self.tensors, layers, strict=True):
            scatter(self.layout, t, blocks, offsets, kv.keys[:, start:end], kv.values[:, start:end])


class ProducerWorker:
    def __init__(self, cfg: ConnectorConfig, fp: Fingerprint) -> None:
        self.cfg = cfg
        self.fp = fp
        self.cache: PagedCache | None = None
        self.loop = BackgroundLoop("spectrumkv-push")
        self.stats = SpectrumKVStats()
        self.tls = client_context(cfg.tls_ca) if cfg.tls_ca else None

    def register(self, kv_caches: dict[str, torch.Tensor], isa: str) -> None:
        self.cache = PagedCache(kv_caches, self.fp, isa)

    def send_all(self, meta: SpectrumKVMetadata) -> None:
        for req in meta.sends:
            t0 = time.perf_counter()
            try:
                if req.error:
                    raise ConfigError(req.error)
                wire, fp16 = self._send(req)
                self.stats.record(wire, fp16, time.perf_counter() - t0)
            except (SpectrumKVError, ValueError) as e:
                self.stats.count("send_failures")
                log.warning("push of %s (%s) failed: %s", req.req_id, req.transfer_id, e)
                self._notify_failure(req.transfer_id, f"{type(e).__name__}: {e}")

    def _send(self, req: SendReq) -> tuple[int, int]:
        assert self.cache is not None, "register_kv_caches was not called"
        n = len(req.token_ids)
        layers = self.cache.read(req.block_ids, n)
        policy = self.cfg.policy
        if req.budget is not None:
            policy = replace(policy, budget=float(req.budget))
        header = new_header(self.fp, n, policy, req.token_ids)
        scores, _ = score_tokens(ScoreConfig(method=self.cfg.importance), n, layers, None)
        p = plan_no_drop(scores, header, policy)
        chunks = [header_bytes(header)]
        chunks += [frame_bytes(i, 0, p.tiers[i], kv, header) for i, kv in enumerate(layers)]
        shaper = LinkShaper(self.cfg.link_gbps, self.cfg.link_latency_s)
        sent = self._push(req.transfer_id, chunks, shaper=shaper)
        return sent, p.fp16_bytes

    def _push(
        self, transfer_id: str, chunks: list[bytes], timeout_s: float | None = None, **kw
    ) -> int:
        """Push to the consumer within the deadline (push_payload's keywords: shaper, error)."""
        cfg = self.cfg
        coro = push_payload(
            cfg.receiver_host,
            cfg.receiver_port,
            cfg.secret,
            transfer_id,
            chunks,
            tls=self.tls,
            **kw,
        )
        return self.loop.run(coro, timeout_s or cfg.push_timeout_s)

    def _notify_failure(self, transfer_id: str, error: str) -> None:
        try:
            self._push(transfer_id, [], min(self.cfg.push_timeout_s, 5.0), error=error)
        except (TransportError, TransferFailed) as e:
            log.warning("could not notify the consumer of failed transfer %s: %s", transfer_id, e)

    def shutdown(self) -> None:
        self.loop.stop()


class ConsumerWorker:
    def __init__(self, cfg: ConnectorConfig, fp: Fingerprint) -> None:
        self.cfg = cfg
        self.fp = fp
        self.cache: PagedCache | None = None
        self.inbox = KVInbox(cfg.inbox_mb << 20, cfg.inbox_ttl_s)
        self.receiver = PushReceiver(self.inbox, cfg.secret, fp)
        self.loop = BackgroundLoop("spectrumkv-receive")
        tls = server_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        where = f"{cfg.receiver_host}:{cfg.receiver_port}"
        try:
            self.server = self.loop.run(
                start_receiver(self.receiver, cfg.receiver_host, cfg.receiver_port, tls), 10.0
            )
        except OSError as e:
            self.loop.stop()
            raise ConfigError(f"SpectrumKV receiver cannot listen on {where}: {e}") from None
        self.errors: set[int] = set()
        self.stats = SpectrumKVStats()
        log.info("SpectrumKV receiver on %s (TLS %s)", where, "on" if tls else "off")

    def register(self, kv_caches: dict[str, torch.Tensor], isa: str) -> None:
        self.cache = PagedCache(kv_caches, self.fp, isa)

    def load_all(self, meta: SpectrumKVMetadata) -> None:
        for req in meta.loads:
            t0 = time.perf_counter()
            try:
                wire, fp16 = self._load(req)
                self.stats.record(wire, fp16, time.perf_counter() - t0)
            except (SpectrumKVError, ValueError) as e:
                bs = self.cache.layout.block_size if self.cache else 1
                failed = req.block_ids[req.start // bs : -(-req.end // bs)]
                self.errors.update(failed)
                self.stats.count("load_failures")
                log.warning(
                    "load of %s (%s) failed, %d blocks will be recomputed: %s",
                    req.req_id,
                    req.transfer_id,
                    len(failed),
                    e,
                )

    def _load(self, req: LoadReq) -> tuple[int, int]:
        """Claim, check and write one payload; returns its wire bytes and 16-bit bytes."""
        assert self.cache is not None, "register_kv_caches was not called"
        payload, wire = self.inbox.take(req.transfer_id, self.cfg.load_timeout_s)
        h = payload.header
        if h.n_tokens != req.n_prompt or h.tokens_digest != req.digest:
            raise TransferFailed(
                f"payload {req.transfer_id!r} is for another prompt "
                f"({h.n_tokens} tokens, digest {h.tokens_digest:x}; expected {req.n_prompt})"
            )
        if any(kv.positions.numel() != h.n_tokens for kv in payload.layers):
            raise TransferFailed("payload drops tokens, which the paged cache cannot hold")
        self.cache.write(req.block_ids, req.start, req.end, payload.layers)
        return wire, sum(kv.keys.nbytes + kv.values.nbytes for kv in payload.layers)

    def take_errors(self) -> set[int]:
        out, self.errors = self.errors, set()
        return out

    def shutdown(self) -> None:
        self.server.close()
        self.loop.stop()
