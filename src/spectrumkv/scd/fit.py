"""Calibration fits: per-layer low-rank maps from model A's K/V to model B's, their ranks under a
byte budget, and the patch layers' aligners from A's attention input to B's.

Low-rank map (one layer, K or V): reduced-rank ridge regression. With centered paired samples
a [n, d_a] (A, keys without RoPE) and b [n, d_b] (B), the ridge solution W maps a to b; the top-r
right singular vectors U_r of the fitted values aW span the joint code space. This is the
MSE-optimal rank-r linear map, and it gives the error of every rank from one SVD. Factored as
W U = Q R (QR): A's encoder is Q_r (orthonormal columns, so FP16 or quantized code error is not
amplified), code z = (a - mu_a) Q_r. B has two decoders of the same code: the cross-model one,
b_hat = z R_rr U_r^T + mu_b (the regression), and the self one, a_hat = z S_r + mu_a (A's own
K/V back, least squares; S = Q^T exactly at full rank): what raw reuse would send. The artifact
holds their blend D(alpha) = alpha * cross + (1 - alpha) * self (calibrate.py chooses alpha).
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
    """One layer's K or V map at full rank; `rel_err[j]` is the relative squared error of the
    cross-model map on the calibration samples at rank (j + 1) * RANK_STEP."""

    mu_a: torch.Tensor  # [d_a]
    q: torch.Tensor  # [d_a, m]: encoder columns in order of importance (orthonormal)
    r: torch.Tensor  # [m, m]: upper triangular, W U = q r
    u: torch.Tensor  # [m, d_b] = U^T
    gram: torch.Tensor  # [d_a, d_a]: centered a^T a (for the self decoder)
    mu_b: torch.Tensor  # [d_b]
    rel_err: list[float]
    ridge: float = 1e-4

    def full_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d_a, d_b], bias [d_b]): the full-rank cross map b_hat = a W + bias."""
        w = self.q @ self.r @ self.u
        return w, self.mu_b - self.mu_a @ w

    def decoders(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross [rank, d_b], self [rank, d_a]) decoders of the rank-`rank` code."""
        cross = self.r[:rank, :rank] @ self.u[:rank]
        qr = self.q[:, :rank]
        if rank == self.q.shape[0]:  # square orthogonal: exact inverse
            return cross, qr.T.clone()
        lhs = qr.T @ self.gram @ qr
        lam = self.ridge * float(lhs.diagonal().mean())
        eye = torch.eye(rank, dtype=lhs.dtype)
        return cross, torch.linalg.solve(lhs + lam * eye, qr.T @ self.gram)

    def truncated(self, rank: int, alpha: float = 1.0) -> dict[str, torch.Tensor]:
        """The rank-`rank` encoder and the blended decoder (module docstring), float32: the
        tensors `codes.py` uses (`dec` and `mu_b` are the blend's)."""
        if alpha != 1.0 and self.q.shape[0] != self.u.shape[1]:
            raise ValueError("a self decoder needs A's and B's widths to agree")
        cross, own = self.decoders(rank)
        return {
            "mu_a": self.mu_a.float(),
            "enc": self.q[:, :rank].float().contiguous(),
            "dec": (alpha * cross + (1 - alpha) * own).float().contiguous(),
            "mu_b": (alpha * self.mu_b + (1 - alpha) * self.mu_a).float(),
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
    q, r = torch.linalg.qr(w @ vh.T)
    return LowRank(mu_a, q, r, vh, gram, mu_b, rel, ridge)


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
    w, bias = fit_low_rank(code, target).full_map()  # ridge regression code -> target
    with torch.no_grad():
        al.lin.weight.copy_(w.T.float())
        al.lin.bias.copy_(bias.float())
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
