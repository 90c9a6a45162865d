"""Optimal lower-rank LoRA for one module, from its factors (no dense ΔW).

ΔW = s·B·A has rank ≤ r. The SVD of B·A is computed with :func:`linalg.factored_svd` (QR of B and Aᵀ, SVD of
the r×r core): O((out+in)·r²) instead of kohya's dense O(out·in·min(out, in)). Truncating it is the
Eckart–Young optimum, and the spectrum is exact, so the energy report is exact.

Rank selection (:func:`linalg.select_rank`), with no off-by-one:

* ``rank=N``: keep N (modules already at or below N are copied unchanged);
* ``energy=F``: the smallest k with Σ_{i<k} Sᵢ² ≥ F·‖ΔW‖²_F (F is the *squared*-norm fraction; kohya's
  ``sv_fro`` t corresponds to F = t²);
* ``sv_ratio=T``: keep every Sᵢ ≥ S₀/T.

The module keeps its scale s (alpha is re-expressed for the new rank: s·k, or s·√k for rsLoRA), as kohya
does; singular values go into B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import AdapterModule, LoRA
from .combine import lora_factors, lora_module_like
from .linalg import SVD, exact_svd, factored_svd, select_rank, split_scale


@dataclass
class ResizeInfo:
    """Per-module result: ranks, the exact fraction of ‖ΔW‖² kept, and the relative Frobenius error."""

    old_rank: int
    new_rank: int
    retained_energy: float  # Σ_{i<k} Sᵢ² / Σ Sᵢ²
    rel_error: float  # ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = √(1 − retained_energy)
    path: str  # "factored", "dense" (Tucker LoRA), "kept" (unchanged), "skipped" (not a LoRA)
    s_max: float = 0.0
    s_kept_min: float = 0.0


def module_svd(m: AdapterModule, device: str | torch.device | None = None) -> tuple[SVD, str]:
    """SVD of the *unscaled* product B·A (2-D, math orientation): factored for plain LoRA, dense for Tucker."""
    d = m.delta
    assert isinstance(d, LoRA)
    if d.mid is None:
        up, down = lora_factors(m)
        if device is not None:
            up, down = up.to(device), down.to(device)
        return factored_svd([up], [down]), "factored"
    prod = d.product()
    if device is not None:
        prod = prod.to(device)
    return exact_svd(prod.reshape(prod.shape[0], -1)), "dense"


def resize_module(m: AdapterModule, *, rank: int | None = None, energy: float | None = None,
                  sv_ratio: float | None = None, max_rank: int | None = None,
                  device: str | torch.device | None = None) -> tuple[AdapterModule, ResizeInfo]:
    """Best lower-rank LoRA for ``m`` (see the module docstring). Non-LoRA modules are returned unchanged."""
    if not isinstance(m.delta, LoRA):
        return m, ResizeInfo(m.rank, m.rank, 1.0, 0.0, "skipped")
    old = m.rank
    if rank is not None and old <= rank and m.delta.mid is None:
        return m, ResizeInfo(old, old, 1.0, 0.0, "kept")
    svd, path = module_svd(m, device)
    k = select_rank(svd, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank)
    k = max(1, min(k, old, svd.rank))
    total = svd.total_energy
    frac = svd.retained_energy(k) / total if total > 0 else 1.0
    s_max = float(svd.S[0]) if svd.rank else 0.0
    s_min = float(svd.S[k - 1]) if svd.rank >= k else 0.0
    if k == old and m.delta.mid is None:
        return m, ResizeInfo(old, old, 1.0, 0.0, "kept", s_max * abs(m.scale), s_min * abs(m.scale))
    up2, down2 = split_scale(svd, k)
    out = lora_module_like(m, up2.cpu(), down2.cpu(), scale=m.scale, dtype=m.dtype, bias=m.bias)
    # (a Tucker conv LoRA comes out as a plain conv LoRA: A carries the kernel)
    out = out.replace(magnitude=m.magnitude, bias=m.bias, bias_scaled=m.bias_scaled, rslora=m.rslora, alpha=None)
    info = ResizeInfo(old, k, min(frac, 1.0), svd.relative_error(k), path, s_max * abs(m.scale),
                      s_min * abs(m.scale))
    return out, info


def dense_resize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kohya-style baseline: full SVD of a materialised 2-D ΔW; returns (up, down, S)."""
    U, S, Vh = torch.linalg.svd(delta if delta.dtype == torch.float64 else delta.float(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank], S


__all__ = ["ResizeInfo", "dense_resize", "module_svd", "resize_module"]
