"""AuroRA (NeurIPS 2025): an Adaptive Non-linear Layer between the two projectors.

    Δ(x) = s · B · σ(A · D(x)),   s = α/r
    σ(z) = tanh(H · tanh(z)) + w_s ⊙ spline(z)          [paper eqs. 5-8]

H ∈ R^{r×r} a learnable self-projection (Xavier-normal); spline(z)_i = Σ_j c_ij·B_j(z_i), a
per-element B-spline expansion with learnable c ∈ R^{r×(G+K)}, U(−0.1, 0.1)
[reimplementations: grid size G=5, order K=3, range [−1, 1] → 8 basis functions].
[ours]: w_s ∈ R^r, ones at init; dropout D on the input as in LoRA (paper p = 0.05);
A Kaiming-uniform, B zeros. Paper settings: r = 2, α = 4.
Params r(d+k) + r² + r(G+K) + r.

Not mergeable. The paper merges *approximately* after training, ΔW = s·B·σ(A) with σ applied
to each column of A, which is not the trained function; offered only as
`merge(model, approximate_merge=True)`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial import Polynomial
from torch import nn

from nora.adapters.base import Adapter, register


def bspline_basis(z: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """B-spline basis functions at z via the Cox–de Boor recursion.

    z: (...), knots: (n_knots,) increasing  ->  (..., n_knots - 1 - order). Zero outside
    [knots[0], knots[-1]).
    """
    z = z.unsqueeze(-1)  # (..., 1)
    t = knots.to(z.dtype)
    basis = ((z >= t[:-1]) & (z < t[1:])).to(z.dtype)  # order 0: (..., n_knots - 1)
    for p in range(1, order + 1):
        left = (z - t[: -(p + 1)]) / (t[p:-1] - t[: -(p + 1)]) * basis[..., :-1]
        right = (t[p + 1 :] - z) / (t[p + 1 :] - t[1:-p]) * basis[..., 1:]
        basis = left + right  # (..., n_knots - 1 - p)
    return basis


def local_basis_polynomials(order: int) -> torch.Tensor:
    """M (K+1, K+1): on one interval of a *uniform* knot vector, the K+1 B-splines of order K
    that are non-zero there are N_i(u) = Σ_p M[i, p]·u^p, u ∈ [0, 1) the position in the
    interval, N_i belonging to basis function (interval index − K + i).

    Built once from de Boor's triangular recursion on polynomials (The NURBS Book, A2.2,
    with the uniform spacing cancelled).
    """
    u = Polynomial([0.0, 1.0])
    N = [Polynomial([1.0])]
    for j in range(1, order + 1):
        saved, nxt = Polynomial([0.0]), []
        for i in range(j):
            temp = N[i] / j
            nxt.append(saved + (i + 1 - u) * temp)
            saved = (u + j - i - 1) * temp
        N = [*nxt, saved]
    M = np.zeros((order + 1, order + 1))
    for i, poly in enumerate(N):
        M[i, : len(poly.coef)] = poly.coef
    return torch.from_numpy(M)


def interval_polynomials(coef: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """P (r, n_int, K+1): the spline of each channel on each knot interval as a polynomial in
    the position u ∈ [0, 1) within it, P[c, m, p] = Σ_i coef[c, m − K + i]·M[i, p].

    coef: (r, n_basis) B-spline coefficients; n_int = n_basis + K intervals.
    """
    K = M.shape[0] - 1
    windows = F.pad(coef, (K, K)).unfold(1, K + 1, 1)  # (r, n_int, K+1)
    return windows @ M.to(coef.dtype)


def eval_interval_polynomials(
    z: torch.Tensor, P: torch.Tensor, lo: float, h: float
) -> torch.Tensor:
    """Σ_p P[c, m, p]·u^p for each element of z, where z lies in knot interval m at position u
    and c is its channel; 0 outside the knot range.

    z: (..., R); P: (*lead, R, n_int, K+1) with lead broadcastable against z's leading dims:
    (r, n_int, K+1) for one adapter's z (..., r), or (n, 1, R, n_int, K+1) for stacked
    adapters' latents (n, L, R) — each element reads its own adapter's channel.
    """
    *lead, n_int, K1 = P.shape
    t = (z - lo) / h  # position in units of knot intervals
    inside = (t >= 0) & (t < n_int)
    m = t.floor().clamp(0, n_int - 1)
    u = t - m  # (..., R) in [0, 1) inside the range
    channel = torch.arange(P[..., 0, 0].numel(), device=z.device).view(lead)
    rows = m.long() + n_int * channel  # (..., R) rows of P flattened to (Σ channels·n_int, K+1)
    c = F.embedding(rows, P.reshape(-1, K1))  # (..., R, K+1)
    out = c[..., K1 - 1]
    for p in range(K1 - 2, -1, -1):  # Horner: (((c_K·u + c_{K−1})·u + …)·u + c_0
        out = torch.addcmul(c[..., p], out, u)
    return torch.where(inside, out, torch.zeros_like(out))


def uniform_spline(
    z: torch.Tensor, coef: torch.Tensor, lo: float, h: float, M: torch.Tensor
) -> torch.Tensor:
    """Σ_j coef[c, j]·B_j(z[..., c]) for B-splines on the uniform knots lo + h·(0, 1, …).

    z: (..., r), coef: (r, n_basis), M from `local_basis_polynomials` -> (..., r). Equal to
    (bspline_basis(z, knots, K) * coef).sum(-1), but only the K+1 non-zero basis functions
    of z's interval are touched: per interval the spline is one polynomial of degree K,
    evaluated by Horner's rule; zero outside the knot range.
    """
    return eval_interval_polynomials(z, interval_polynomials(coef, M), lo, h)


@register
class AuroRA(Adapter):
    name = "aurora"
    approximately_mergeable = True
    default_alpha = 4.0
    default_dropout = 0.05
    default_activation = "aurora"
    activations = ("aurora",)

    def __init__(self, in_features, out_features, cfg, device=None, dtype=None):
        super().__init__(in_features, out_features, cfg, device=device, dtype=dtype)
        r, G, K = cfg.r, cfg.spline_grid_size, cfg.spline_order
        lo, hi = cfg.spline_range
        h = (hi - lo) / G
        # G intervals on [lo, hi], extended by K knots on each side: G + 2K + 1 knots.
        knots = lo + h * torch.arange(-K, G + K + 1, dtype=torch.float32)
        self.register_buffer("knots", knots.to(device), persistent=False)
        self.order, self.spline_lo, self.spline_h = K, lo - K * h, h  # knots[0], spacing
        self.register_buffer("local_basis", local_basis_polynomials(K).float(), persistent=False)
        self.self_proj = nn.Linear(r, r, bias=False, device=device, dtype=dtype)  # H
        self.spline_weight = nn.Parameter(torch.empty(r, G + K, device=device, dtype=dtype))
        self.spline_scale = nn.Parameter(torch.ones(r, device=device, dtype=dtype))  # w_s

    def reset_parameters(self, init_weights: bool = True) -> None:
        super().reset_parameters(init_weights)
        nn.init.xavier_normal_(self.self_proj.weight)
        nn.init.uniform_(self.spline_weight, -0.1, 0.1)
        nn.init.ones_(self.spline_scale)

    # σ(z) = tanh(tanh(z)·Hᵀ) + Σ_j (w_s ⊙ c)_ij·B_j(z_i). In training (the inherited
    # forward) σ(z) — spline included — is recomputed in backward by the fused node.
    sigma_rank_dims = {"Ht": 2, "P": 1}

    def kind(self):  # one knot grid and spline shape per kind
        return (self.name, self.spline_lo, self.spline_h, self.spline_weight.shape[1], self.order)

    def sigma_params(self):
        C = self.spline_scale[:, None] * self.spline_weight  # w_s ⊙ c: (r, n_basis)
        return {
            "Ht": self.self_proj.weight.t(),  # (r, r)
            "P": interval_polynomials(C, self.local_basis),  # (r, n_int, K+1): per interval
        }

    @classmethod
    def sigma(cls, kind, z, p):  # (..., r) -> (..., r); stacked: (n, L, R) with (n, R, R) Ht
        mix = torch.tanh(torch.matmul(torch.tanh(z), p["Ht"]))
        # = (bspline_basis(z, knots, K) * (w_s ⊙ c)).sum(-1), touching K+1 basis functions only
        return mix + eval_interval_polynomials(z, p["P"], kind[1], kind[2])

    def approximate_delta_weight(self) -> torch.Tensor:  # (d, k)
        # σ acts on each column A[:, j] ∈ R^r: treat Aᵀ (k, r) as a batch of k latents.
        sig_A = self.phi(self.lora_A.weight.t()).t()  # (r, k)
        return self.scale * (self.lora_B.weight @ sig_A)
