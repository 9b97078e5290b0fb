"""Synthetic headers and caches for unit tests (no model needed)."""

import torch

from spectrumkv.config import QuantConfig
from spectrumkv.kv import LayerKV, first_slot
from spectrumkv.wire import Fingerprint, Header

torch.manual_seed(0)


def make_header(
    n_tokens: int,
    n_layers: int = 2,
    heads: int = 2,
    head_dim: int = 16,
    sliding: tuple[int, ...] = (),
    window: int = 0,
    quant: QuantConfig | None = None,
    policy: str = "spectrum",
    budget: float | None = 0.5,
) -> Header:
    q = quant or QuantConfig(group_size=8)
    fp = Fingerprint(
        arch="synthetic",
        n_layers=n_layers,
        n_kv_heads=heads,
        head_dim=head_dim,
        kv_dtype="float16",
        rope="none",
        sliding_window=window,
        sliding_layers=sliding,
        weights_digest="0" * 16,
    )
    return Header(fp, n_tokens, q.scheme, q.group_for(head_dim), q.rotate, policy, budget)


def random_layers(header: Header, seed: int = 0) -> list[LayerKV]:
    """Per-layer KV shaped like an engine's cache (float16)."""
    g = torch.Generator().manual_seed(seed)
    fp, n = header.fingerprint, header.n_tokens
    out = []
    for layer in range(fp.n_layers):
        first = first_slot(fp.is_sliding(layer), fp.sliding_window, n)
        shape = (fp.n_kv_heads, n - first, fp.head_dim)
        k = (torch.randn(shape, generator=g) * 3).half()
        v = torch.randn(shape, generator=g).half()
        out.append(LayerKV(k, v, torch.arange(first, n)))
    return out
