"""Calibration fits: per-layer low-rank maps from model A's K/V to model B's, their ranks under a
byte budget, and the patch layers' aligners from A's attention input to B's.

Low-rank map (one layer, K or V): reduced-rank ridge regression. With centered paired samples
a [n, d_a] (A, keys without RoPE) and b [n, d_b] (B), the ridge solution W maps a to b; the top-r
right singular vectors U_r of the fitted values aW span the joint code space. A's encoder is
W U_r (ridge-fitted), B's decoder U_r^T: code z = (a - mu_a) W U_r, b_hat = z U_r^T + mu_b. This
is the MSE-optimal rank-r linear map, and it gives the error of every rank from one SVD.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from ..errors import BudgetError

#: Ranks move in steps of RANK_STEP (a multiple of the quantizer's code group, see codes.py).
RANK_STEP = 16


@dataclass
class LowRank:
    """One layer's K or V map at full rank; `rel_err[j]` is the relative squared error on the
    calibration samples at rank (j + 1) * RANK_STEP."""

    mu_a: torch.Tensor  # [d_a]
    enc: torch.Tensor  # [d_a, d_b] = W U (columns in order of importance)
    dec: torch.Tensor  # [d_b, d_b] = U^T
    mu_b: torch.Tensor  # [d_b]
    rel_err: list[float]

    def truncated(self, rank: int) -> dict[str, torch.Tensor]:
        """The rank-`rank` encoder and decoder, float32."""
        return {
            "mu_a": self.mu_a.float(),
            "enc": self.enc[:, :rank].float().contiguous(),
            "dec": self.dec[:rank].float().contiguous(),
            "mu_b": self.mu_b.float(),
        }


def fit_low_rank(a: torch.Tensor, b: torch.Tensor, ridge: float = 1e-4) -> LowRank:
    """Reduced-rank ridge regression of b on a (module docstring). `ridge` is relative to the
    mean eigenvalue of a's covariance."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ac, bc = a - mu_a, b - mu_b
    gram = ac.T @ ac
    lam = ridge * float(gram.diagonal().mean())
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), ac.T @ bc)
    fitted = ac @ w
    _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
    coords, proj = fitted @ vh.T, bc @ vh.T
    total = float((bc * bc).sum())
    # ||bc - F_r||^2 = ||bc||^2 - 2 sum_{k<r} <bc v_k, F v_k> + sum_{k<r} ||F v_k||^2
    per = (-2 * (proj * coords).sum(0) + (coords * coords).sum(0)).cumsum(0)
    steps = range(RANK_STEP, vh.shape[0] + 1, RANK_STEP)
    rel = [max(0.0, (total + float(per[r - 1])) / max(total, 1e-30)) for r in steps]
    return LowRank(mu_a, w @ vh.T, vh, mu_b, rel)


def allocate_ranks(
    fits: list[tuple[LowRank, LowRank]], code_budget: int, min_rank: int = RANK_STEP
) -> list[tuple[int, int]]:
    """Ranks (r_K, r_V) per layer with sum over layers of r_K + r_V <= `code_budget`, chosen
    greedily by measured relative error removed per rank step. BudgetError if even the minimum
    ranks do not fit."""
    ranks = [[min_rank, min_rank] for _ in fits]
    used = 2 * min_rank * len(fits)
    if used > code_budget:
        raise BudgetError(f"code budget {code_budget} < minimum ranks {used}")

    def gain(layer: int, kv: int) -> float:
        errs = fits[layer][kv].rel_err
        j = ranks[layer][kv] // RANK_STEP - 1
        return errs[j] - errs[j + 1] if j + 1 < len(errs) else -1.0

    heap = [(-gain(i, kv), i, kv) for i in range(len(fits)) for kv in (0, 1)]
    heapq.heapify(heap)
    while heap and used + RANK_STEP <= code_budget:
        g, i, kv = heapq.heappop(heap)
        if -g < 0:
            break
        ranks[i][kv] += RANK_STEP
        used += RANK_STEP
        heapq.heappush(heap, (-gain(i, kv), i, kv))
    return [(k, v) for k, v in ranks]


class Aligner(torch.nn.Module):
    """A patch layer's map from A's attention-input code [n, r_H] to B's attention input
    [n, hidden]: an affine map (ridge-fitted) plus a small residual MLP (zero-initialized)."""

    def __init__(self, r_h: int, hidden: int, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(r_h, hidden)
        self.up = torch.nn.Linear(r_h, width)
        self.down = torch.nn.Linear(width, hidden)
        torch.nn.init.zeros_(self.down.weight)
        torch.nn.init.zeros_(self.down.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lin(h) + self.down(torch.nn.functional.gelu(self.up(h)))


def fit_pca(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], basis [d, rank]): the top principal directions of samples x [n, d]."""
    mu = x.double().mean(0)
    _, _, vh = torch.linalg.svd(x.double() - mu, full_matrices=False)
    return mu.float(), vh[:rank].T.float().contiguous()


def fit_aligner(
    code: torch.Tensor,
    target: torch.Tensor,
    project: torch.nn.Module | None = None,
    width: int = 128,
    steps: int = 0,
    lr: float = 1e-3,
    batch: int = 1024,
    seed: int = 0,
) -> Aligner:
    """Fit an Aligner from codes [n, r_H] to B's attention inputs [n, hidden]: the affine part
    by ridge regression in closed form, then (steps > 0) Adam on the MSE of `project(x_hat)`
    vs `project(target)`: B's K/V projections, i.e. the error in what B will cache."""
    torch.manual_seed(seed)
    al = Aligner(code.shape[1], target.shape[1], width)
    lr_fit = fit_low_rank(code, target)  # full rank: ridge regression code -> target
    with torch.no_grad():
        al.lin.weight.copy_((lr_fit.enc @ lr_fit.dec).T.float())
        al.lin.bias.copy_((lr_fit.mu_b - lr_fit.mu_a @ lr_fit.enc @ lr_fit.dec).float())
    if steps <= 0:
        return al
    proj = project if project is not None else torch.nn.Identity()
    with torch.no_grad():
        want = proj(target)
        scale = want.var(0).sum()
    opt = torch.optim.Adam(al.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, code.shape[0], (min(batch, code.shape[0]),), generator=g)
        loss = ((proj(al(code[idx])) - want[idx]) ** 2).sum(1).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    return al
