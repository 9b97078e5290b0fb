"""Per-request token sampling for the batch engine: the distribution of pd.sampling.next_token
(temperature, then the nucleus: the smallest set of most likely tokens whose probability reaches
top_p, the top token always kept), drawn without sorting the whole vocabulary.

`next_token` sorts all V logits for top-p and calls `torch.multinomial` over V: 12.3 ms per row
with top_p 0.9 and 3.3 ms with temperature only at SmolLM2's V = 49,152 here, i.e. ~200 ms per
step at a batch of 16, as long as the model step itself. `sample` takes the top k logits
(k = 64, growing 8x until their probability reaches top_p, at most V) and draws by inverse CDF:
one uniform from the request's generator, a float64 cumulative sum, a binary search. Same
distribution (up to the order of exactly tied logits at the nucleus edge), different draws for
the same seed than next_token; the engine's seeded outputs stay reproducible and independent of
the batch (each request owns its generator). Greedy rows never come here (one argmax per step).
"""

from __future__ import annotations

import torch

from ..pd.sampling import SamplingParams

FIRST_K = 64  # top logits tried first for the nucleus; x8 until they hold top_p


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One token id from 1-D float logits under `p` (temperature > 0), drawn with `gen`."""
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
