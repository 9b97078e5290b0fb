"""SpectrumKV: per-token mixed-precision KV-cache transfer for prefill-decode disaggregation.

import spectrumkv as skv
engine = skv.load("smollm2-135m")
context, last = skv.split_prompt(skv.chat_ids(engine, "Why is the sky blue?"))
pre = skv.prefill(engine, context)
header, plan = skv.plan_transfer(engine, pre, skv.PolicyConfig("spectrum", budget=0.3))
payload = skv.encode(header, pre, plan)            # bytes for the wire
state = skv.receive(engine, payload)               # decode side
text = engine.tokenizer.decode(skv.generate(engine, state, last, 32))
"""

from .config import PolicyConfig, QuantConfig, ScoreConfig
from .engines.hf import DecodeState, Engine, Prefilled, chat_ids, generate, load, prefill, step
from .errors import (
    AssetError,
    BudgetError,
    ChecksumError,
    ConfigError,
    IncompatiblePayloadError,
    SpectrumKVError,
    WireFormatError,
)
from .importance import score_tokens
from .payload import decode_payload
from .pipeline import encode, iter_payload, plan_transfer, receive, reference_state, split_prompt
from .policy import Plan, plan
from .tiers import Tier
from .wire import Fingerprint, Header

__all__ = [
    "AssetError",
    "BudgetError",
    "ChecksumError",
    "ConfigError",
    "DecodeState",
    "Engine",
    "Fingerprint",
    "Header",
    "IncompatiblePayloadError",
    "Plan",
    "PolicyConfig",
    "Prefilled",
    "QuantConfig",
    "ScoreConfig",
    "SpectrumKVError",
    "Tier",
    "WireFormatError",
    "chat_ids",
    "decode_payload",
    "encode",
    "generate",
    "iter_payload",
    "load",
    "plan",
    "plan_transfer",
    "prefill",
    "receive",
    "reference_state",
    "score_tokens",
    "split_prompt",
    "step",
]
