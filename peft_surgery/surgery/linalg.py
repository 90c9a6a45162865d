"""Low-rank linear algebra shared by extract, resize, combine, init and type conversion.

* :func:`truncated_svd`: exact (``torch.linalg.svd``, thin) or randomized (Halko et al.: Gaussian sketch with
  oversampling and power iterations, QR-stabilised), deterministic under a seed.
* :func:`factored_svd`: SVD of ``Σ_i B_i @ A_i`` from the factors alone (QR of the stacked factors, SVD of the
  small core), never forming the dense matrix.
* :func:`select_rank`: fixed rank, energy fraction (against the *exact* ‖ΔW‖²) or singular-value ratio.
* :func:`split_scale`: turn U, S, Vh into (B, A), with the singular values in B or split as √S.

All computations run in float32 or float64 on whatever device the inputs live on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class SVD:
    """A (possibly truncated) SVD: M ≈ U @ diag(S) @ Vh, with ``total_energy`` = ‖M‖_F² of the full matrix."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    total_energy: float

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    def truncate(self, rank: int) -> "SVD":
        return SVD(self.U[:, :rank], self.S[:rank], self.Vh[:rank], self.total_energy)

    def retained_energy(self, rank: int | None = None) -> float:
        s = self.S if rank is None else self.S[:rank]
        return float((s.double() ** 2).sum())

    def relative_error(self, rank: int) -> float:
        """‖M − M_r‖_F / ‖M‖_F from the spectrum (exact when the SVD covers the full rank)."""
        if self.total_energy <= 0:
            return 0.0
        rest = max(self.total_energy - self.retained_energy(rank), 0.0)
        return math.sqrt(rest / self.total_energy)


def squared_norm(t: Tensor) -> float:
    """‖t‖_F² accumulated in float64 without materialising a float64 copy of ``t``."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def exact_svd(M: Tensor) -> SVD:
    """Thin SVD in float32/64."""
    m = M.to(_work_dtype(M))
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    return SVD(U, S, Vh, squared_norm(m))


def randomized_svd(M: Tensor, rank: int, *, oversample: int | None = None, niter: int = 3,
                   generator: torch.Generator | None = None, seed: int | None = None) -> SVD:
    """Rank-``rank`` randomized SVD (range finder with power iterations).

    ``oversample`` extra sketch columns (default max(10, rank)) and ``niter`` power iterations (each
    re-orthonormalised) keep the truncation error within 1% of the exact optimum even for flat, noise-like
    spectra (2 iterations with 10 extra columns can miss by ~2% there at rank ≥ 32).
    """
    m = M.to(_work_dtype(M))
    rows, cols = m.shape
    if oversample is None:
        oversample = max(10, rank)
    k = min(rank + oversample, rows, cols)
    if generator is None:
        generator = torch.Generator(device=m.device)
        generator.manual_seed(0 if seed is None else seed)
    transpose = rows < cols
    a = m.T if transpose else m  # tall: (big, small)
    omega = torch.randn(a.shape[1], k, device=m.device, dtype=m.dtype, generator=generator)
    Q, _ = torch.linalg.qr(a @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(a.T @ Q)
        Q, _ = torch.linalg.qr(a @ Z)
    small = Q.T @ a  # (k, small)
    Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)
    U = Q @ Ub
    r = min(rank, S.numel())
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    total = squared_norm(m)
    if transpose:  # we decomposed Mᵀ = U S Vh  ⇒  M = Vhᵀ S Uᵀ
        return SVD(Vh.T, S, U.T, total)
    return SVD(U, S, Vh, total)


def truncated_svd(M: Tensor, rank: int | None = None, *, method: str = "exact", oversample: int | None = None,
                  niter: int = 3, seed: int | None = 0) -> SVD:
    """SVD of a 2-D matrix truncated to ``rank`` (None = full), with ``method`` exact|randomized|auto.

    ``auto`` uses the randomized solver when the rank is small against the matrix (≤ 1/4 of its smaller side).
    """
    if M.dim() != 2:
        raise ValueError(f"truncated_svd needs a 2-D matrix, got shape {tuple(M.shape)}")
    small = min(M.shape)
    if method == "auto":
        extra = max(10, rank or 0) if oversample is None else oversample
        method = "randomized" if rank is not None and (rank + extra) * 4 <= small else "exact"
    if method == "randomized":
        if rank is None:
            raise ValueError("randomized SVD needs a rank")
        return randomized_svd(M, rank, oversample=oversample, niter=niter, seed=seed)
    if method != "exact":
        raise ValueError(f"unknown SVD method '{method}' (exact, randomized, auto)")
    svd = exact_svd(M)
    return svd if rank is None else svd.truncate(min(rank, svd.rank))


def factored_svd(ups: Sequence[Tensor], downs: Sequence[Tensor], weights: Sequence[float] | None = None) -> SVD:
    """SVD of ``Σ_i w_i · ups[i] @ downs[i]`` computed from the factors.

    ``ups[i]`` is ``(out, r_i)``, ``downs[i]`` is ``(r_i, in)``. Cost is O((out+in)·R²) with R = Σ r_i, instead
    of O(out·in·min(out, in)) for the dense SVD. The spectrum is exact (not an approximation).
    """
    if weights is None:
        weights = [1.0] * len(ups)
    dt = torch.float64 if any(t.dtype == torch.float64 for t in list(ups) + list(downs)) else torch.float32
    B = torch.cat([u.to(dt) * float(w) for u, w in zip(ups, weights)], dim=1)  # (out, R)
    A = torch.cat([d.to(dt) for d in downs], dim=0)  # (R, in)
    Qb, Rb = torch.linalg.qr(B)  # (out, k1), (k1, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (in, k2), (k2, R)
    core = Rb @ Ra.T  # (k1, k2)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    U = Qb @ Uc
    Vh = Vhc @ Qa.T
    return SVD(U, S, Vh, float((S.double() ** 2).sum()))


def select_rank(svd: SVD, *, rank: int | None = None, energy: float | None = None,
                sv_ratio: float | None = None, max_rank: int | None = None, min_rank: int = 1) -> int:
    """Choose a rank from a spectrum.

    * ``rank``: fixed.
    * ``energy``: the smallest k with Σ_{i<k} S_i² ≥ energy · ‖M‖_F² (the exact total, ``svd.total_energy``).
    * ``sv_ratio``: keep the singular values with S_0 / S_i ≤ sv_ratio.
    ``max_rank`` caps the result; the result is never more than the singular values available.
    """
    avail = svd.rank
    if sum(x is not None for x in (rank, energy, sv_ratio)) != 1:
        raise ValueError("give exactly one of rank, energy, sv_ratio")
    if rank is not None:
        k = rank
    elif energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        target = energy * svd.total_energy
        cum = torch.cumsum(svd.S.double() ** 2, 0)
        # the first index where the cumulative energy reaches the target (with a tiny relative slack for rounding)
        hits = torch.nonzero(cum >= target * (1 - 1e-12), as_tuple=False)
        k = int(hits[0]) + 1 if hits.numel() else avail
    else:
        assert sv_ratio is not None
        if sv_ratio < 1:
            raise ValueError(f"sv_ratio must be ≥ 1, got {sv_ratio}")
        if avail == 0 or float(svd.S[0]) == 0.0:
            k = 0
        else:
            k = int((svd.S >= svd.S[0] / sv_ratio).sum())
    if max_rank is not None:
        k = min(k, max_rank)
    return max(min(k, avail), min(min_rank, avail))


def split_scale(svd: SVD, rank: int, *, scale: float = 1.0, distribute: bool = False) -> tuple[Tensor, Tensor]:
    """(up, down) with ``scale · up @ down`` = the rank-``rank`` truncation.

    By default the singular values go to ``up`` (B = U·S/scale, A = Vh); with ``distribute`` both get √S.
    """
    U, S, Vh = svd.U[:, :rank], svd.S[:rank], svd.Vh[:rank]
    if distribute:
        r = torch.sqrt(S)
        up = U * r / math.sqrt(scale) if scale != 1 else U * r
        down = r[:, None] * Vh / math.sqrt(scale) if scale != 1 else r[:, None] * Vh
    else:
        up = U * (S / scale if scale != 1 else S)
        down = Vh
    return up.contiguous(), down.contiguous()


def low_rank_error(M: Tensor, up: Tensor, down: Tensor, scale: float = 1.0) -> float:
    """‖M − scale·up@down‖_F / ‖M‖_F (0 when M is 0)."""
    m = M.to(torch.float64)
    diff = m - scale * (up.to(torch.float64) @ down.to(torch.float64))
    denom = float(torch.linalg.vector_norm(m))
    return float(torch.linalg.vector_norm(diff)) / denom if denom > 0 else float(torch.linalg.vector_norm(diff))


__all__ = [
    "SVD",
    "exact_svd",
    "factored_svd",
    "low_rank_error",
    "randomized_svd",
    "select_rank",
    "split_scale",
    "truncated_svd",
]
