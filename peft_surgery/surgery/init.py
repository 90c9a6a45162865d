"""Weight-aware LoRA initialisations (PiSSA, OLoRA, MiLoRA) and their conversion back to plain LoRA.

Every function works on one weight matrix in math orientation ``(out, in)`` and returns ``(up, down, residual)``
computed in float32 (float64 when ``W`` is float64), with the LoRA scale ``s`` folded in so that

    residual + s · up @ down == W        (up to float rounding of one subtraction)

exactly as PEFT defines them (``peft/tuners/lora/layer.py``: ``pissa_init``, ``olora_init``):

* PiSSA: ``W = U S Vh``; ``down = √(S_r/s)·Vh_r``, ``up = U_r·√(S_r/s)``, ``residual = W − s·up@down``.
* OLoRA: ``W = Q R`` (reduced QR); ``down = R_r``, ``up = Q_r`` (the scale is *not* divided out, as in PEFT).
* MiLoRA: PiSSA with the ``r`` *smallest* singular triplets (not in PEFT; arXiv 2406.09044).

:func:`to_lora` is PEFT's ``[A; A0]``, ``[B, −B0]`` trick: a trained adapter on the residual becomes a plain LoRA of
twice the rank on the original weight. :func:`recompress` shrinks such a factor pair with a factored SVD.

>>> import torch
>>> W = torch.randn(6, 4)
>>> up, down, res = pissa(W, 2, scale=0.5)
>>> bool(torch.allclose(res + 0.5 * up @ down, W, atol=1e-5))
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .linalg import exact_svd, factored_svd, randomized_svd, split_scale


class InitFactors(NamedTuple):
    """``scale · up @ down`` is the part moved into the adapter; ``residual`` is what stays in the base."""

    up: Tensor  # (out, r)  = PEFT lora_B.weight
    down: Tensor  # (r, in)  = PEFT lora_A.weight
    residual: Tensor  # (out, in), float32


INIT_METHODS = ("pissa", "olora", "milora")
# Methods whose adapter is a deterministic function of W (so A0/B0 can be recomputed from the original base).
DETERMINISTIC = ("pissa", "olora", "milora")


def _work(W: Tensor) -> Tensor:
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"expected a floating-point weight, got {W.dtype}")
    return W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)


def _check(W: Tensor, rank: int, scale: float) -> None:
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    if rank > min(W.shape):
        raise ValueError(f"rank {rank} is larger than the matrix allows (shape {tuple(W.shape)}, "
                         f"max rank {min(W.shape)})")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"the LoRA scale must be a positive number, got {scale}")


def _from_svd(Wf: Tensor, U: Tensor, S: Tensor, Vh: Tensor, scale: float) -> InitFactors:
    root = torch.sqrt(S / scale)
    down = (root[:, None] * Vh).contiguous()
    up = (U * root).contiguous()
    # Same expression as PEFT (W − s·B@A from the stored factors), so the identity holds for approximate SVDs too.
    residual = Wf - scale * (up @ down)
    return InitFactors(up, down, residual)


def pissa(W: Tensor, rank: int, scale: float = 1.0, niter: int | None = None, seed: int | None = 0) -> InitFactors:
    """PiSSA: the rank-``rank`` principal part of ``W`` goes into the adapter.

    ``niter=None`` uses the exact thin SVD (PEFT ``"pissa"``). ``niter=K`` uses a seeded randomized SVD with K
    power iterations (the counterpart of PEFT's ``"pissa_niter_K"``; ours oversamples by 10 columns and is
    deterministic for a given ``seed``, so it is not bit-identical to PEFT's unseeded ``torch.svd_lowrank``).
    """
    Wf = _work(W)
    _check(Wf, rank, scale)
    if niter is None:
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        if niter < 0:
            raise ValueError(f"niter must be ≥ 0, got {niter}")
        svd = randomized_svd(Wf, rank, niter=niter, seed=seed)
        U, S, Vh = svd.U, svd.S, svd.Vh
    return _from_svd(Wf, U, S, Vh, scale)


def milora(W: Tensor, rank: int, scale: float = 1.0) -> InitFactors:
    """MiLoRA: like PiSSA but with the ``rank`` *minor* singular components (exact SVD)."""
    Wf = _work(W)
    _check(Wf, rank, scale)
    svd = exact_svd(Wf)
    k = svd.rank
    return _from_svd(Wf, svd.U[:, k - rank:], svd.S[k - rank:], svd.Vh[k - rank:], scale)


def olora(W: Tensor, rank: int, scale: float = 1.0) -> InitFactors:
    """OLoRA: reduced QR ``W = QR``; ``up = Q[:, :r]`` (orthonormal), ``down = R[:r]``, scale not divided out."""
    Wf = _work(W)
    _check(Wf, rank, scale)
    Q, R = torch.linalg.qr(Wf)
    up = Q[:, :rank].contiguous()
    down = R[:rank].contiguous()
    return InitFactors(up, down, Wf - scale * (up @ down))


def init_factors(method: str, W: Tensor, rank: int, scale: float = 1.0, *, niter: int | None = None,
                 seed: int | None = 0) -> InitFactors:
    """Dispatch on ``method`` (pissa, olora, milora)."""
    if method == "pissa":
        return pissa(W, rank, scale, niter=niter, seed=seed)
    if niter is not None:
        raise ValueError(f"niter only applies to pissa, not {method}")
    if method == "olora":
        return olora(W, rank, scale)
    if method == "milora":
        return milora(W, rank, scale)
    raise ValueError(f"unknown init method '{method}' (known: {', '.join(INIT_METHODS)})")


def captured_energy(W: Tensor, up: Tensor, down: Tensor, scale: float = 1.0) -> float:
    """‖s·up@down‖_F² / ‖W‖_F², from the factors (tr((BᵀB)(AAᵀ)), no dense product)."""
    u, d = up.double(), down.double()
    num = float(((u.T @ u) * (d @ d.T)).sum()) * scale * scale
    den = float((W.double() ** 2).sum())
    return num / den if den > 0 else 0.0


def to_lora(trained: tuple[Tensor, Tensor], initial: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(up, down)`` of a plain LoRA equal to ``trained − initial`` (same scale), PEFT's conversion.

    With ``W = W_res + s·B0@A0`` and ``W + ΔW = W_res + s·B@A``: ``ΔW = s·[B, −B0] @ [A; A0]``. The rank doubles;
    to keep ``s`` PEFT doubles alpha (or multiplies it by √2 with rsLoRA), see :func:`converted_alpha`.
    """
    up, down = trained
    up0, down0 = initial
    if up.shape[0] != up0.shape[0] or down.shape[1:] != down0.shape[1:]:
        raise ValueError(f"trained ({tuple(up.shape)} @ {tuple(down.shape)}) and initial "
                         f"({tuple(up0.shape)} @ {tuple(down0.shape)}) factors do not fit the same weight")
    if up.shape[1] != down.shape[0] or up0.shape[1] != down0.shape[0]:
        raise ValueError("up and down factors disagree on the rank")
    dt = torch.promote_types(up.dtype, up0.dtype)
    new_down = torch.cat([down.to(dt), down0.to(dt)], dim=0)
    new_up = torch.cat([up.to(dt), -up0.to(dt)], dim=1)
    return new_up.contiguous(), new_down.contiguous()


def converted_alpha(alpha: float, rslora: bool = False) -> float:
    """The alpha PEFT writes for the doubled rank so that the scale is unchanged (2α, or √2·α with rsLoRA)."""
    return alpha * 2**0.5 if rslora else alpha * 2


def recompress(up: Tensor, down: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` approximation of ``scale·up@down`` as ``(up', down')`` with scale 1, and its relative
    Frobenius error, from a factored SVD (QR of each factor, SVD of the small core; never the dense ΔW)."""
    svd = factored_svd([up], [down], [scale])
    k = min(rank, svd.rank)
    new_up, new_down = split_scale(svd, k, distribute=True)
    return new_up, new_down, svd.relative_error(k)


__all__ = [
    "DETERMINISTIC",
    "INIT_METHODS",
    "InitFactors",
    "captured_energy",
    "converted_alpha",
    "init_factors",
    "milora",
    "olora",
    "pissa",
    "recompress",
    "to_lora",
]
