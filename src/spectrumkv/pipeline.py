"""The one data flow, as plain functions:
prefill -> score -> plan -> encode (bytes) -> decode -> decode cache -> generate.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import PolicyConfig, ScoreConfig
from .engines.hf import DecodeState, Engine, Prefilled, decode_state
from .importance import WindowQueries, score_tokens
from .kv import LayerKV
from .payload import decode_payload
from .policy import Plan, layer_firsts, plan, reads_scores
from .wire import (
    Fingerprint,
    Header,
    frame_bytes,
    header_bytes,
    new_payload_id,
    tokens_digest,
)


def make_header(
    engine: Engine, n_tokens: int, policy: PolicyConfig, context_ids: torch.Tensor | None = None
) -> Header:
    """A fresh header for this engine's model (see `new_header`)."""
    return new_header(engine.fingerprint, n_tokens, policy, context_ids)


def new_header(
    fp: Fingerprint,
    n_tokens: int,
    policy: PolicyConfig,
    context_ids: torch.Tensor | list[int] | None = None,
) -> Header:
    """A fresh header (new payload id); with `context_ids`, it records their digest so the
    receiver can check the cache is for its prompt."""
    return Header(
        fingerprint=fp,
        n_tokens=n_tokens,
        scheme=policy.quant.scheme,
        group_size=policy.quant.group_for(fp.head_dim),
        rotate=policy.quant.rotate,
        policy=policy.name,
        budget=policy.budget,
        payload_id=new_payload_id(),
        tokens_digest=tokens_digest(context_ids) if context_ids is not None else 0,
    )


def plan_scores(
    policy: PolicyConfig,
    scoring: ScoreConfig,
    n_tokens: int,
    layers: list[LayerKV],
    window: list[WindowQueries] | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scores `plan` reads under `policy` (`importance.score_tokens`), or zeros without a
    scoring pass when it reads none (`policy.reads_scores`: budget 1.0, positional policies)."""
    if not reads_scores(policy):
        return torch.zeros(n_tokens), None
    return score_tokens(scoring, n_tokens, layers, window)


def plan_transfer(
    engine: Engine, pre: Prefilled, policy: PolicyConfig, scoring: ScoreConfig | None = None
) -> tuple[Header, Plan]:
    """Score the prefilled context (where the policy reads scores) and assign tiers under the
    policy's budget."""
    header = make_header(engine, pre.n_tokens, policy)
    scores, layer_scores = plan_scores(
        policy, scoring or ScoreConfig(), pre.n_tokens, pre.layers, pre.window
    )
    return header, plan(scores, header, policy, layer_scores)


def iter_payload(header: Header, pre: Prefilled, p: Plan) -> Iterator[bytes]:
    """The payload as a stream of chunks: header first, then one frame per layer."""
    yield header_bytes(header)
    for layer, first in enumerate(layer_firsts(header)):
        yield frame_bytes(layer, first, p.tiers[layer, first:], pre.layers[layer], header)


def encode(header: Header, pre: Prefilled, p: Plan) -> bytes:
    return b"".join(iter_payload(header, pre, p))


def receive(engine: Engine, payload: bytes | memoryview) -> DecodeState:
    """Verify and decode a payload for this engine's model and build its decode cache."""
    decoded = decode_payload(payload, expect=engine.fingerprint)
    return decode_state(engine, decoded.layers, decoded.header.n_tokens)


def reference_state(engine: Engine, pre: Prefilled) -> DecodeState:
    """The uncompressed decode cache, as if prefill and decode ran in one process."""
    return decode_state(engine, pre.layers, pre.n_tokens)


def split_prompt(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A prompt's context (prefilled and transferred) and its last token (fed by decode)."""
    if ids.numel() < 2:
        raise ValueError("a prompt needs at least two tokens")
    return ids[:-1], int(ids[-1])
