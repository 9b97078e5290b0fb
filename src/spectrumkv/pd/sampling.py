"""Token sampling and stop handling for the decode worker's generation loop.

`generate_choices` runs on a worker thread from a decode state (transferred or recomputed): `n`
independent choices, each sampled with temperature / nucleus (top_p) from one seeded generator,
ending at EOS, at a stop string (cut before it, never streamed) or at `max_tokens`. A set
`cancel` event stops it before the next model step (the client went away).

Kept apart from the HTTP layer and from how a step is batched, so a continuous-batching engine
can reuse `SamplingParams`, `next_token` and `StopText` per sequence.
"""

from __future__ import annotations

import copy
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..engines.hf import DecodeState, Engine, step
from ..errors import SpectrumKVError


class Cancelled(SpectrumKVError):
    """Generation (or prefill) stopped because its client went away."""


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: new tokens per choice (>= 1). temperature: 0 = greedy (argmax), else logits
    are divided by it. top_p: sample from the smallest set of tokens whose probability reaches
    it (1 = all). n: independent choices. seed: for reproducible sampling (None = random).
    stop: strings that end a choice (not included in its text). Ranges are checked by the HTTP
    layer's schema (openai.py); `__post_init__` guards library callers."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.n < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters {self}")


@dataclass
class Choice:
    """One generated sequence: its token ids (EOS included when it ended there), its text (stop
    string cut off) and why it ended: "stop" (EOS or a stop string) or "length"."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"


FIRST_K = 64  # top logits tried first for the nucleus; x8 until they hold top_p


def next_token(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """Pick the next token from 1-D float logits: argmax at temperature 0, else a draw with
    `gen` from softmax(logits / temperature) restricted to the nucleus (the smallest set of most
    likely tokens whose probability reaches top_p; the top token always kept).

    Drawn without sorting the vocabulary (a sort and `torch.multinomial` over SmolLM2's 49,152
    logits took 12.3 ms per row at top_p 0.9, ~200 ms per step at a batch of 16, as long as the
    model step): the top k logits (k = 64, growing 8x until they hold top_p, at most V), then an
    inverse-CDF draw (one float64 uniform from `gen`, a float64 cumulative sum, a binary search).
    Both engines sample through here, so a seeded request draws the same tokens batched or
    alone."""
    if p.temperature == 0:
        return int(logits.argmax())
    z = logits.float() / p.temperature
    total = torch.logsumexp(z, 0)
    if p.top_p >= 1:
        return _draw(torch.exp(z - total), gen)
    n, k = z.numel(), min(FIRST_K, z.numel())
    while True:
        top, ids = torch.topk(z, k)  # descending
        probs = torch.exp(top - total)
        if k == n or float(probs.sum()) >= p.top_p:
            break
        k = min(n, 8 * k)
    keep = probs.cumsum(0) - probs < p.top_p  # a prefix; the top token always
    return int(ids[_draw(probs[keep], gen)])


def _draw(weights: torch.Tensor, gen: torch.Generator) -> int:
    """Index i with probability weights[i] / sum(weights) (non-negative; summed in float64)."""
    cdf = weights.double().cumsum(0)
    u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[-1]
    return min(int(torch.searchsorted(cdf, u, right=True)), weights.numel() - 1)


class StopText:
    """Incremental detokenization with stop strings. `push(token)` returns the text that is now
    safe to show (never a partial UTF-8 character, never the start of a possible stop string)
    and whether a stop string was reached; `flush()` returns what was held back at the end."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._show(len(self.text)), True
        hold = 1 if self.text.endswith("\ufffd") else 0
        for s in self.stop:
            hold = max(
                hold, next((k for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), 0)
            )
        return self._show(len(self.text) - hold), False

    def flush(self) -> str:
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        piece = self.text[self.shown : upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece


def generate_choices(
    engine: Engine,
    state: DecodeState,
    first_input: int,
    p: SamplingParams,
    on_piece: Callable[[int, str], None],
    cancel: threading.Event,
) -> list[Choice]:
    """Run `p.n` choices from `state` (each from its own copy; the last uses `state` itself),
    feeding `first_input` (the prompt's last token) first. `on_piece(index, text)` is called
    after every token with the text that became safe to show ("" when none did) and once more
    at the end of a choice if text was held back. Raises Cancelled once `cancel` is set."""
    eos = engine.tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    gen = torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
    choices = []
    for index in range(p.n):
        st = state if index == p.n - 1 else copy.deepcopy(state)
        choice, text = Choice(index), StopText(engine.tokenizer, p.stop)
        tok = first_input
        while len(choice.token_ids) < p.max_tokens:
            if cancel.is_set():
                raise Cancelled("the client went away")
            tok = next_token(step(engine, st, torch.tensor([tok]))[-1], p, gen)
            choice.token_ids.append(tok)
            piece, stopped = text.push(tok)
            on_piece(index, piece)
            if stopped or tok in eos_ids:
                choice.finish_reason = "stop"
                break
        if rest := text.flush():
            on_piece(index, rest)
        choice.text = text.text
        choices.append(choice)
    return choices
