"""ΔW for every adapter type, as small pure functions on tensors.

All functions return the *unscaled* product in "math orientation": shape ``(out, in)`` for linear
layers and ``(out, in, *kernel)`` for convolutions. Layout transposes (fan_in_fan_out, embeddings) and
the scale are applied by :meth:`peft_surgery.adapter.AdapterModule.delta_weight`.

Everything is computed in float32 (or float64 when given float64) regardless of the storage dtype, as
PEFT does on CPU.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def lora_delta(down: Tensor, up: Tensor, mid: Tensor | None = None) -> Tensor:
    """ΔW = up @ down (unscaled).

    - linear: ``down (r, in)``, ``up (out, r)`` → ``(out, in)``
    - conv: ``down (r, in, *k)``, ``up (out, r, 1, ...)`` → ``(out, in, *k)``
    - Tucker conv (kohya/LyCORIS ``lora_mid``): ``down (r, in, 1..)``, ``mid (r, r, *k)``,
      ``up (out, r, 1..)``; ΔW[o,c,...] = Σ_ij up[o,i]·mid[i,j,...]·down[j,c]
    """
    dt = compute_dtype(down, up, mid)
    a, b = down.to(dt), up.to(dt)
    r = a.shape[0]
    b2 = b.reshape(b.shape[0], r)
    if mid is not None:
        m = mid.to(dt)
        a2 = a.reshape(r, -1)
        return torch.einsum("oi,ij...,jc->oc...", b2, m, a2)
    if a.dim() == 2:
        return b2 @ a
    kernel = a.shape[2:]
    return (b2 @ a.reshape(r, -1)).reshape(b.shape[0], a.shape[1], *kernel)


def lora_frobenius(down: Tensor, up: Tensor) -> float:
    """‖up @ down‖_F from the factors alone: ‖BA‖²_F = Σ (BᵀB) ⊙ (AAᵀ), O((out+in)·r²) instead of out·in."""
    r = down.shape[0]
    a = down.reshape(r, -1).to(torch.float64)
    b = up.reshape(up.shape[0], r).to(torch.float64)
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


def tucker_rebuild(core: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """LyCORIS/PEFT CP reconstruction: R[p,q,...] = Σ_ij core[i,j,...]·left[i,p]·right[j,q].

    ``left (r, out)``, ``right (r, in)`` (the transposed layout used with ``hada_t*`` / ``lokr_t2``).
    """
    return torch.einsum("ij...,ip,jq->pq...", core, left, right)


def loha_delta(
    w1a: Tensor,
    w1b: Tensor,
    w2a: Tensor,
    w2b: Tensor,
    t1: Tensor | None = None,
    t2: Tensor | None = None,
    shape: Sequence[int] | None = None,
) -> Tensor:
    """LoHa ΔW = (w1a@w1b) ⊙ (w2a@w2b) (unscaled), reshaped to ``shape`` when given.

    With Tucker cores ``t1/t2 (r, r, *k)`` the factors are in the transposed layout
    ``w*a (r, out)``, ``w*b (r, in)``.
    """
    dt = compute_dtype(w1a, w1b, w2a, w2b, t1, t2)
    w1a, w1b, w2a, w2b, t1, t2 = (_up(t, dt) for t in (w1a, w1b, w2a, w2b, t1, t2))
    if t1 is not None and t2 is not None:
        d = tucker_rebuild(t1, w1a, w1b) * tucker_rebuild(t2, w2a, w2b)
    else:
        d = (w1a @ w1b) * (w2a @ w2b)
    return d.reshape(tuple(shape)) if shape is not None else d


def lokr_factor(a: Tensor | None, b: Tensor | None, full: Tensor | None, t: Tensor | None = None) -> Tensor:
    """One Kronecker factor: the full matrix, or a@b, or the Tucker rebuild with core ``t``."""
    if full is not None:
        return full
    if a is None or b is None:
        raise ValueError("LoKr factor needs either the full matrix or both low-rank parts")
    if t is not None:
        return tucker_rebuild(t, a, b)
    return a @ b


def lokr_delta(
    w1: Tensor | None = None,
    w1a: Tensor | None = None,
    w1b: Tensor | None = None,
    w2: Tensor | None = None,
    w2a: Tensor | None = None,
    w2b: Tensor | None = None,
    t2: Tensor | None = None,
    shape: Sequence[int] | None = None,
) -> Tensor:
    """LoKr ΔW = kron(w1, w2) (unscaled), reshaped to ``shape`` when given.

    A 4-D ``w2`` (conv kernel kept in the factor) is combined with a 2-D ``w1`` by treating w1 as
    ``(out_l, in_m, 1, 1)``, as PEFT and LyCORIS do.
    """
    dt = compute_dtype(w1, w1a, w1b, w2, w2a, w2b, t2)
    w1, w1a, w1b, w2, w2a, w2b, t2 = (_up(t, dt) for t in (w1, w1a, w1b, w2, w2a, w2b, t2))
    f1 = lokr_factor(w1a, w1b, w1)
    f2 = lokr_factor(w2a, w2b, w2, t2)
    if f2.dim() > f1.dim():
        f1 = f1.reshape(*f1.shape, *([1] * (f2.dim() - f1.dim())))
    d = torch.kron(f1, f2)
    return d.reshape(tuple(shape)) if shape is not None else d


def rank_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scale: alpha/r, or alpha/√r with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def alpha_for_scale(scale: float, rank: int, rslora: bool = False) -> float:
    """Inverse of :func:`rank_scale`."""
    return scale * math.sqrt(rank) if rslora else scale * rank


def dora_weight(weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA merged weight in math orientation: (m / ‖W+ΔW‖_row) ⊙ (W+ΔW).

    ``weight``/``delta`` are ``(out, in, ...)``; the norm runs over every axis but the first.
    ``magnitude`` is any shape with ``out`` elements.
    """
    combined = weight + delta
    norm = torch.linalg.vector_norm(combined.reshape(combined.shape[0], -1), dim=1)
    factor = magnitude.reshape(-1).to(combined.dtype) / norm
    return combined * factor.reshape(-1, *([1] * (combined.dim() - 1)))
