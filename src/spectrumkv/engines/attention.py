"""An HF model's attention implementation, switched for the length of a block.

transformers picks each layer's attention function from `config._attn_implementation` at every
call, so a function registered with `AttentionInterface` (serve.runner's paged attention,
engines.segments' per-prompt attention) can serve one forward while every other caller keeps
the model's own. The switch is on the model's shared config: no other thread may run the same
model inside the block (the batch engine's one thread; the prefill worker's model lock).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def use_attention(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Within the block, `model` runs the attention function registered as `name`; the previous
    implementation is restored on exit, also after an error."""
    cfg = model.config
    previous = cfg._attn_implementation
    cfg._attn_implementation = name
    try:
        yield
    finally:
        cfg._attn_implementation = previous
