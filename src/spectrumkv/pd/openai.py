"""The OpenAI-compatible request layer of the decode worker: parse and validate a request body
into a `Job`, shape responses, stream chunks and errors.

Validation is strict and happens before any work: JSON types are never coerced (`max_tokens:
"8"`, `2.5` or `true` are refused), unknown fields (including OpenAI parameters this server does
not implement, e.g. `logprobs`) are refused by name, transfer options go through the library's
own `PolicyConfig` / `ScoreConfig` (protocol.policy_configs), and a prompt that with
`max_tokens` does not fit the model's context is refused before any prefill. Every refusal is an
`ApiError`: HTTP status + OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
import torch
from aiohttp import web

from ..config import FIXED_RATE
from ..engines.hf import Engine
from ..errors import BudgetError, ConfigError, SpectrumKVError
from .protocol import LinkGbps, LinkLatency, ScoreLayers, TransferOptions, policy_configs
from .sampling import SamplingParams

log = logging.getLogger("spectrumkv.decode")
MAX_TOKENS = 4096
MAX_N = 8
MAX_STOP = 4

Unset = msgspec.UnsetType
UNSET = msgspec.UNSET


class ApiError(SpectrumKVError):
    """A request refused or failed: `status` (HTTP), `type` and `code` as OpenAI uses them,
    `param` the offending field (dotted path) or None."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers  # extra HTTP headers, e.g. Retry-After on a 503

    def body(self) -> dict:
        e = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": e}


class SpectrumKVField(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The request's `spectrumkv` object: per-request transfer options (absent = server's)."""

    policy: str | Unset = UNSET
    budget: float | None | Unset = UNSET
    score_layers: ScoreLayers | Unset = UNSET
    link_gbps: LinkGbps | Unset = UNSET
    link_latency_s: LinkLatency | Unset = UNSET
    overlap: bool | Unset = UNSET
    on_failure: Literal["recompute", "fail"] | Unset = UNSET
    chat: bool = False
    method: Literal["kv", "scd", "raw", "recompute"] | Unset = UNSET  # scd/serve_decode.py
    code_budget: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None  # SCD codes


class _Common(msgspec.Struct, forbid_unknown_fields=True):
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=MAX_N)] | None = None
    seed: int | None = None
    stop: (
        Annotated[str, msgspec.Meta(min_length=1)]
        | Annotated[
            list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=MAX_STOP)
        ]
        | None
    ) = None
    spectrumkv: SpectrumKVField = SpectrumKVField()


class CompletionBody(_Common):
    prompt: Annotated[str, msgspec.Meta(min_length=1)] = ""


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Common):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)] = []


@dataclass(frozen=True)
class ServerDefaults:
    """What a request gets for what it does not say. `budget` applies to budgeted policies;
    fixed-rate ones (uniform-int8/int4, fp16, kivi2) run at their own rate (budget null)
    unless the request gives a budget. temperature 0 = greedy (OpenAI's default is 1)."""

    transfer: TransferOptions = TransferOptions()
    budget: float = 0.5
    on_failure: str = "recompute"
    max_tokens: int = 16
    temperature: float = 0.0


@dataclass(frozen=True)
class Job:
    """A validated request: prompt ids, generation and transfer settings."""

    chat: bool  # answer as chat.completion
    ids: torch.Tensor
    sampling: SamplingParams
    transfer: TransferOptions
    on_failure: str
    stream: bool
    method: str = ""  # "" = the worker's default (scd/serve_decode.resolve_method)
    code_budget: float | None = None


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")
_HINTS = {
    "spectrumkv.on_failure": "allowed: recompute, fail",
    "spectrumkv.method": "allowed: kv, scd, raw, recompute",
    "stop": f"a non-empty string or a list of at most {MAX_STOP}",
}


def _validation_error(e: msgspec.MsgspecError) -> ApiError:
    if isinstance(e, msgspec.DecodeError) and not isinstance(e, msgspec.ValidationError):
        return ApiError(400, f"body must be a JSON object: {e}")
    msg = str(e)
    path = _PATH.search(msg)
    param = re.sub(r"\[\d+\]", "", path.group(1)) if path else ""
    if unknown := _UNKNOWN.search(msg):
        param = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
        msg = f"unsupported or unknown parameter {param!r}"
        code = "unsupported_parameter"
    else:
        code = "invalid_value"
    hint = next((h for p, h in _HINTS.items() if param.startswith(p)), "")
    return ApiError(400, f"{msg} ({hint})" if hint else msg, param=param or None, code=code)


def context_limit(engine: Engine) -> int:
    """The model's maximum context (prompt + generated tokens)."""
    cfg = engine.model.config.get_text_config()
    return int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)


def transfer_options(defaults: ServerDefaults, o: SpectrumKVField) -> TransferOptions:
    """Merge a request's `spectrumkv` field over the server's defaults and validate it with the
    library's configs. Raises ApiError 400 naming the field."""
    policy = defaults.transfer.policy if o.policy is UNSET else o.policy
    if o.budget is not UNSET:
        budget = o.budget
    else:
        budget = None if policy in FIXED_RATE else defaults.budget
    d = defaults.transfer
    opt = TransferOptions(
        policy=policy,
        budget=budget,
        score_layers=d.score_layers if o.score_layers is UNSET else o.score_layers,
        link_gbps=d.link_gbps if o.link_gbps is UNSET else o.link_gbps,
        link_latency_s=d.link_latency_s if o.link_latency_s is UNSET else o.link_latency_s,
        overlap=d.overlap if o.overlap is UNSET else o.overlap,
    )
    try:
        policy_configs(opt)
    except ValueError as e:  # ConfigError, BudgetError
        text = str(e)
        fields = ("budget", "score_layers", "link_gbps", "policy")  # the first one named
        param = next((f"spectrumkv.{k}" for k in fields if k in text), "spectrumkv")
        raise ApiError(
            400, f"{type(e).__name__}: {text}", param=param, code="invalid_value"
        ) from None
    return opt


def validate_defaults(d: ServerDefaults) -> None:
    """Check a server's defaults as a request would be checked. Raises ConfigError /
    BudgetError naming the flag."""
    if not 0 < d.budget <= 1:
        raise BudgetError(f"--budget must be in (0, 1], got {d.budget}")
    if not 1 <= d.max_tokens <= MAX_TOKENS:
        raise ConfigError(f"--max-tokens must be in 1..{MAX_TOKENS}, got {d.max_tokens}")
    if not 0 <= d.temperature <= 2:
        raise ConfigError(f"--temperature must be in [0, 2], got {d.temperature}")
    if d.on_failure not in ("recompute", "fail"):
        raise ConfigError(f"--on-failure must be recompute or fail, got {d.on_failure!r}")
    try:
        msgspec.convert(msgspec.structs.asdict(d.transfer), TransferOptions)  # the bounds
        transfer_options(d, SpectrumKVField())
    except msgspec.ValidationError as e:
        raise ConfigError(f"server default: {e}") from None
    except ApiError as e:
        raise ConfigError(f"server default: {e.message}") from None


def parse(engine: Engine, defaults: ServerDefaults, raw: bytes, chat: bool) -> Job:
    """Validate a /v1/completions (chat=False) or /v1/chat/completions body. Raises ApiError."""
    try:
        body = msgspec.json.decode(raw, type=ChatBody if chat else CompletionBody)
    except msgspec.MsgspecError as e:
        raise _validation_error(e) from None
    if body.model is not None and body.model != engine.name:
        raise ApiError(
            404,
            f"model {body.model!r} is not served here; this worker serves {engine.name!r}",
            param="model",
            code="model_not_found",
        )
    tok = engine.tokenizer
    if chat:
        if not body.messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        msgs = [{"role": m.role, "content": m.content} for m in body.messages]
        ids = _chat_ids(tok, msgs)
    else:
        if not body.prompt:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        text = [{"role": "user", "content": body.prompt}]
        ids = _chat_ids(tok, text) if body.spectrumkv.chat else _plain_ids(tok, body.prompt)
    field = "messages" if chat else "prompt"
    if ids.numel() < 2:
        raise ApiError(400, f"{field} must have at least 2 tokens", param=field)
    max_tokens = body.max_tokens if body.max_tokens is not None else defaults.max_tokens
    limit = context_limit(engine)
    if ids.numel() + max_tokens > limit:
        raise ApiError(
            400,
            f"{field} ({ids.numel()} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {limit} tokens",
            param=field,
            code="context_length_exceeded",
        )
    opt = transfer_options(defaults, body.spectrumkv)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        n=body.n or 1,
        seed=body.seed,
        stop=stop,
    )
    on_failure = body.spectrumkv.on_failure
    return Job(
        chat,
        ids,
        sampling,
        opt,
        defaults.on_failure if on_failure is UNSET else on_failure,
        body.stream,
        "" if body.spectrumkv.method is UNSET else body.spectrumkv.method,
        body.spectrumkv.code_budget,
    )


def _plain_ids(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt")["input_ids"][0]


def _chat_ids(tok, messages: list[dict]) -> torch.Tensor:
    if not getattr(tok, "chat_template", None):
        raise ApiError(400, "this model has no chat template", param="messages")
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return enc["input_ids"][0]


# --- responses ------------------------------------------------------------------------------


def response(job: Job, rid: str, model: str, choices: list, stats: dict) -> dict:
    """The whole (non-streamed) answer; `choices` are sampling.Choice."""
    n_prompt, n_out = int(job.ids.numel()), sum(len(c.token_ids) for c in choices)
    out = []
    for c in choices:
        item = {"index": c.index, "finish_reason": c.finish_reason, "token_ids": c.token_ids}
        if job.chat:
            item["message"] = {"role": "assistant", "content": c.text}
        else:
            item["text"] = c.text
        out.append(item)
    return {
        "id": rid,
        "object": "chat.completion" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out,
        },
        "spectrumkv": stats,
    }


def chunk(job: Job, rid: str, model: str, index: int, text: str) -> dict:
    """One streamed piece of choice `index`."""
    if job.chat:
        choice = {"index": index, "delta": {"content": text}, "finish_reason": None}
    else:
        choice = {"index": index, "text": text, "finish_reason": None}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if job.chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def final_chunk(full: dict) -> dict:
    """The last streamed event: finish reasons, usage and the spectrumkv stats, no text."""
    chunk_type = "chat.completion.chunk" if full["object"] == "chat.completion" else full["object"]
    choices = []
    for c in full["choices"]:
        item = {"index": c["index"], "finish_reason": c["finish_reason"]}
        item["token_ids"] = c["token_ids"]
        item.update({"delta": {}} if "message" in c else {"text": ""})
        choices.append(item)
    return {**full, "object": chunk_type, "choices": choices}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Every error as OpenAI's JSON error body (also aiohttp's own 404/405/413)."""
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        err = ApiError(e.status, e.reason, type="invalid_request_error", code=str(e.status))
        return web.json_response(err.body(), status=e.status)
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as e:
        log.exception("internal error on %s", request.path)
        err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
        return web.json_response(err.body(), status=500)
