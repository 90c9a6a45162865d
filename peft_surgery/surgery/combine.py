"""Combine several adapters' modules into one (pure tensor math on :class:`AdapterModule`).

Each function takes the modules for one module path, one per input adapter (``None`` where an adapter does
not adapt that module), and the user weights wᵢ. The target is always ΔW = Σ wᵢ·ΔWᵢ, where ΔWᵢ already
includes the module's own scale sᵢ once (PEFT's ``add_weighted_adapter(..., "svd")`` multiplies by sᵢ twice;
we do not).

* :func:`stack`: concatenate ranks with wᵢ·sᵢ folded into A; exactly Σ wᵢΔWᵢ (PEFT's ``cat``).
* :func:`svd_combine`: best rank-k approximation of Σ wᵢΔWᵢ. For plain LoRA inputs it is computed from the
  factors (QR of the stacked factors + SVD of the small core), never forming ΔW.
* :func:`ties_merge`, :func:`dare_merge`: TIES / DARE on the dense ΔWᵢ, seeded, then re-factored.

LoHa/LoKr/full-diff (or Tucker LoRA) inputs have no factor form to stack, so they go through the dense ΔW
and an exact SVD; the returned :class:`CombineInfo` says which path a module took and how much was lost.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from ..adapter import AdapterModule, LoRA, check_finite
from ..errors import ShapeMismatchError, SurgeryError
from .linalg import SVD, exact_svd, factored_svd, select_rank, split_scale

METHODS = ("stack", "svd", "linear", "ties", "dare", "dare_ties")


@dataclass
class CombineInfo:
    """What happened to one module: the path taken, ranks, and the relative Frobenius error of the result."""

    path: str  # "factored" (from LoRA factors) or "dense" (through ΔW)
    in_ranks: list[int]
    rank: int
    rel_error: float  # ‖ΔW_target − ΔW_out‖_F / ‖ΔW_target‖_F (0 for exact results)
    retained_energy: float  # fraction of ‖ΔW_target‖_F² kept


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def is_plain_lora(m: AdapterModule) -> bool:
    """A LoRA without Tucker core and without DoRA: combinable from its factors."""
    return isinstance(m.delta, LoRA) and m.delta.mid is None and m.magnitude is None


def lora_factors(m: AdapterModule) -> tuple[Tensor, Tensor]:
    """(up (out, r), down (r, in·k)) of a plain LoRA in math orientation, float32/64, unscaled."""
    d = m.delta
    assert isinstance(d, LoRA)
    dt = torch.float64 if torch.float64 in (d.up.dtype, d.down.dtype) else torch.float32
    r = d.rank
    return d.up.reshape(d.up.shape[0], r).to(dt), d.down.reshape(r, -1).to(dt)


def _present(mods: Sequence[AdapterModule | None], weights: Sequence[float]):
    pairs = [(m, float(w)) for m, w in zip(mods, weights) if m is not None]
    if not pairs:
        raise ValueError("no module to combine")
    return pairs


def math_shape(m: AdapterModule) -> tuple[int, ...]:
    """Math-orientation shape (out, in, *k) when known, else the 2-D shape of the product."""
    s = m.layout.math_shape()
    if s is not None:
        return s
    if isinstance(m.delta, LoRA):
        d = m.delta
        kernel = d.mid.shape[2:] if d.mid is not None else d.down.shape[2:]
        return (int(d.up.shape[0]), int(d.down.shape[1]), *(int(k) for k in kernel))
    return tuple(m.delta_math().shape)


def check_compatible(name: str, mods: Sequence[AdapterModule | None], sources: Sequence[object] | None = None) -> None:
    """All present modules must target the same weight shape (same base); DoRA needs the base and is refused."""
    ref = None
    for i, m in enumerate(mods):
        if m is None:
            continue
        src = sources[i] if sources else None
        if m.is_dora:
            raise SurgeryError("DoRA modules cannot be combined without the base weights (their ΔW depends on W); "
                               "merge them into the base instead", path=src, tensor=name)
        shape = math_shape(m)
        numel = math.prod(shape)
        if ref is None:
            ref = (shape, numel, src)
            continue
        if shape[0] != ref[0][0] or numel != ref[1]:
            raise ShapeMismatchError(
                f"module shapes differ between adapters: {tuple(ref[0])} in {ref[2]} vs {tuple(shape)} "
                "(adapters for different bases?)", path=src, tensor=name)


def dense_delta(m: AdapterModule, shape2d: tuple[int, int] | None = None) -> Tensor:
    """Scaled ΔW in math orientation flattened to 2-D ``(out, in·k)``, float32/64."""
    d = m.delta_math()
    return d.reshape(d.shape[0], -1) if shape2d is None else d.reshape(shape2d)


def _reference(pairs) -> AdapterModule:
    """The module whose layout/shapes the output follows (first plain LoRA, else the first module)."""
    for m, _ in pairs:
        if isinstance(m.delta, LoRA) and m.delta.mid is None:
            return m
    return pairs[0][0]


def _dtype(pairs) -> torch.dtype:
    dts = [m.dtype for m, _ in pairs]
    for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        if dt in dts:
            return dt
    return torch.float32


def lora_module_like(ref: AdapterModule, up2: Tensor, down2: Tensor, *, scale: float, dtype: torch.dtype,
                     bias: Tensor | None = None) -> AdapterModule:
    """A plain LoRA module with factors ``up2 (out, k)``, ``down2 (k, in·kk)`` shaped like ``ref``'s layer."""
    k = int(down2.shape[0])
    shape = math_shape(ref)
    if len(shape) > 2:  # conv: A (k, in, *kernel), B (out, k, 1, ...)
        down = down2.reshape(k, *shape[1:])
        up = up2.reshape(up2.shape[0], k, *([1] * (len(shape) - 2)))
    else:
        down, up = down2, up2
    layout = ref.layout
    if layout.weight_shape is None:
        stored = (shape[1], shape[0], *shape[2:]) if layout.transposed else tuple(shape)
        layout = type(layout)(layout.kind, layout.fan_in_fan_out, tuple(int(s) for s in stored))
    return AdapterModule(delta=LoRA(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous()), scale=scale,
                         layout=layout, bias=bias, alpha=None, rslora=False)


def _combined_bias(pairs) -> Tensor | None:
    """Σ wᵢ·(scaled bias deltaᵢ), stored with scale 1, or None when no input has a bias delta."""
    out = None
    for m, w in pairs:
        b = m.bias_delta()
        if b is not None:
            out = b * w if out is None else out + b * w
    return out


# ----------------------------------------------------------------------------------------------------------
# Stack (exact)
# ----------------------------------------------------------------------------------------------------------


def stack(mods: Sequence[AdapterModule | None], weights: Sequence[float], *, name: str | None = None
          ) -> tuple[AdapterModule, CombineInfo]:
    """Concatenate the ranks: A' = [cᵢ·Aᵢ], B' = [Bᵢ] with cᵢ = wᵢsᵢ, so B'A' = Σ wᵢsᵢBᵢAᵢ exactly.

    When every cᵢ is equal it is kept as the module scale and the factors are copied bit for bit.
    Non-LoRA inputs go through the dense ΔW (exact SVD at full numerical rank).
    """
    pairs = _present(mods, weights)
    if not all(is_plain_lora(m) for m, _ in pairs):
        return svd_combine(mods, weights, name=name, energy=1.0)
    ref = _reference(pairs)
    dtype = _dtype(pairs)
    coefs = [w * m.scale for m, w in pairs]
    common = coefs[0] if all(c == coefs[0] for c in coefs) else 1.0
    ups, downs = [], []
    work = torch.float64 if dtype == torch.float64 else torch.float32
    for (m, _), c in zip(pairs, coefs):
        d = m.delta
        ups.append(d.up.reshape(d.up.shape[0], d.rank).to(dtype))
        down = d.down.reshape(d.rank, -1)
        if c != common:  # fold in fp32, one rounding
            down = down.to(work) * (c / common)
        downs.append(down.to(dtype))
    up2, down2 = torch.cat(ups, 1), torch.cat(downs, 0)
    bias = _combined_bias(pairs)
    if bias is not None and common != 1.0:
        bias = bias / common
    out = lora_module_like(ref, up2, down2, scale=common, dtype=dtype, bias=bias)
    ranks = [m.rank for m, _ in pairs]
    return out, CombineInfo("factored", ranks, sum(ranks), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------
# SVD / linear (optimal truncation of the exact sum)
# ----------------------------------------------------------------------------------------------------------


def sum_svd(pairs) -> tuple[SVD, str]:
    """SVD of Σ wᵢΔWᵢ (2-D, math orientation): factored when all inputs are plain LoRA, else dense."""
    if all(is_plain_lora(m) for m, _ in pairs):
        ups, downs, ws = [], [], []
        for m, w in pairs:
            up, down = lora_factors(m)
            ups.append(up)
            downs.append(down)
            ws.append(w * m.scale)
        return factored_svd(ups, downs, ws), "factored"
    shape2d = None
    total = None
    for m, w in pairs:
        d = dense_delta(m, shape2d)
        shape2d = tuple(d.shape)
        total = d * w if total is None else total + d * w
    return exact_svd(total), "dense"


def numerical_rank(svd: SVD, rtol: float | None = None) -> int:
    """Singular values above ``rtol·S₀`` (default: machine epsilon × size, as numpy's matrix_rank)."""
    if svd.rank == 0 or float(svd.S[0]) == 0.0:
        return 0
    if rtol is None:
        rtol = torch.finfo(svd.S.dtype).eps * max(svd.U.shape[0], svd.Vh.shape[1])
    return int((svd.S > svd.S[0] * rtol).sum())


def svd_combine(mods: Sequence[AdapterModule | None], weights: Sequence[float], *, name: str | None = None,
                rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
                max_rank: int | None = None) -> tuple[AdapterModule, CombineInfo]:
    """Best rank-k LoRA for Σ wᵢΔWᵢ (Eckart–Young), k fixed or chosen by energy / singular-value ratio.

    With none of rank/energy/sv_ratio given, k is the sum's numerical rank (an exact re-factorisation),
    capped by ``max_rank``. Scale of the result is 1 (alpha = r); singular values go to B.
    """
    pairs = _present(mods, weights)
    svd, path = sum_svd(pairs)
    nrank = max(numerical_rank(svd), 1)
    if rank is None and energy is None and sv_ratio is None:
        k = min(nrank, max_rank) if max_rank else nrank
    else:
        k = select_rank(svd, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank)
        if energy is not None or sv_ratio is not None:
            k = min(k, nrank)  # never keep exactly-zero directions
    k = max(min(k, svd.rank), 1)
    up2, down2 = split_scale(svd, k)
    ref = _reference(pairs)
    bias = _combined_bias(pairs)
    out = lora_module_like(ref, up2, down2, scale=1.0, dtype=_dtype(pairs), bias=bias)
    kept = svd.retained_energy(k)
    frac = kept / svd.total_energy if svd.total_energy > 0 else 1.0
    info = CombineInfo(path, [m.rank for m, _ in pairs], k, svd.relative_error(k), min(frac, 1.0))
    return out, info


# ----------------------------------------------------------------------------------------------------------
# TIES / DARE on ΔW
# ----------------------------------------------------------------------------------------------------------


def magnitude_prune(t: Tensor, density: float) -> Tensor:
    """Keep the ⌊density·numel⌋ entries of largest |t|, zero the rest."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    flat = t.reshape(-1)
    keep = torch.zeros_like(flat)
    if k > 0:
        keep[torch.topk(flat.abs(), k).indices] = 1
    return (flat * keep).reshape(t.shape)


def random_prune(t: Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``density`` and divide the survivors by ``density``."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    out = t * mask
    return out / density if rescale and density > 0 else out


def elect_sign(stacked: Tensor, method: Literal["total", "frequency"] = "total") -> Tensor:
    """Mask of entries agreeing with the elected sign (sum of values, or of signs); ties go to +."""
    if method == "total":
        votes = stacked.sum(0)
    elif method == "frequency":
        votes = stacked.sign().sum(0)
    else:
        raise SurgeryError(f"unknown sign election method '{method}' (total, frequency)")
    majority = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return stacked.sign() == majority


def disjoint_mean(weighted: Tensor, mask: Tensor) -> Tensor:
    """Σᵢ Tᵢ·maskᵢ / max(Σᵢ maskᵢ, 1): the mean over the tasks that agree with the elected sign."""
    m = mask.to(weighted.dtype)
    return (weighted * m).sum(0) / m.sum(0).clamp(min=1.0)


def ties_merge(deltas: Sequence[Tensor], weights: Sequence[float], density: float,
               majority: Literal["total", "frequency"] = "total") -> Tensor:
    """TIES (Yadav et al. 2023), as PEFT applies it: trim by magnitude, elect sign, disjoint mean of wᵢTᵢ."""
    trimmed = torch.stack([magnitude_prune(d, density) for d in deltas])
    mask = elect_sign(trimmed, majority)
    w = torch.tensor(list(weights), dtype=trimmed.dtype).reshape(-1, *([1] * (trimmed.dim() - 1)))
    return disjoint_mean(trimmed * w, mask)


def dare_merge(deltas: Sequence[Tensor], weights: Sequence[float], density: float, *,
               generator: torch.Generator | None = None, ties: bool = False,
               majority: Literal["total", "frequency"] = "total") -> Tensor:
    """DARE (Yu et al. 2023): random drop with 1/density rescale, then Σ wᵢTᵢ (or the TIES disjoint mean)."""
    dropped = torch.stack([random_prune(d, density, generator) for d in deltas])
    w = torch.tensor(list(weights), dtype=dropped.dtype).reshape(-1, *([1] * (dropped.dim() - 1)))
    if ties:
        return disjoint_mean(dropped * w, elect_sign(dropped, majority))
    return (dropped * w).sum(0)


def module_seed(seed: int, name: str) -> int:
    """A per-module seed independent of module order (crc32 of the name mixed with the user seed)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def task_merge(mods: Sequence[AdapterModule | None], weights: Sequence[float], method: str, *, name: str,
               density: float, seed: int = 0, majority: Literal["total", "frequency"] = "total",
               rank: int | None = None, energy: float | None = None) -> tuple[AdapterModule, CombineInfo]:
    """TIES/DARE on the dense ΔWᵢ, then the best rank-k LoRA of the result (k default: largest input rank)."""
    if not 0 <= density <= 1:
        raise SurgeryError(f"--density must be in [0, 1], got {density}")
    # Absent adapters contribute a zero task vector (they still count in sign election and means).
    present = [m for m in mods if m is not None]
    ref = _reference([(m, 1.0) for m in present])
    shape2d = tuple(dense_delta(present[0]).shape)
    deltas = [dense_delta(m, shape2d) if m is not None else torch.zeros(shape2d) for m in mods]
    dt = torch.float64 if any(d.dtype == torch.float64 for d in deltas) else torch.float32
    deltas = [d.to(dt) for d in deltas]
    if method == "ties":
        total = ties_merge(deltas, weights, density, majority)
    elif method in ("dare", "dare_ties"):
        g = torch.Generator().manual_seed(module_seed(seed, name))
        total = dare_merge(deltas, weights, density, generator=g, ties=method == "dare_ties", majority=majority)
    else:
        raise SurgeryError(f"unknown task-merge method '{method}'")
    check_finite(total, tensor=name)
    svd = exact_svd(total)
    if rank is None and energy is None:
        rank = max(m.rank for m in present)
    k = select_rank(svd, rank=rank, energy=energy)
    k = max(min(k, max(numerical_rank(svd), 1)), 1)
    up2, down2 = split_scale(svd, k)
    pairs = [(m, w) for m, w in zip(mods, weights) if m is not None]
    out = lora_module_like(ref, up2, down2, scale=1.0, dtype=_dtype(pairs), bias=_combined_bias(pairs))
    frac = svd.retained_energy(k) / svd.total_energy if svd.total_energy > 0 else 1.0
    return out, CombineInfo("dense", [m.rank for m in present], k, svd.relative_error(k), min(frac, 1.0))


def combine_modules(mods: Sequence[AdapterModule | None], weights: Sequence[float], method: str, *, name: str,
                    rank: int | None = None, energy: float | None = None, density: float = 0.5, seed: int = 0,
                    majority: Literal["total", "frequency"] = "total") -> tuple[AdapterModule, CombineInfo]:
    """Dispatch one module path to the chosen method (see the module docstring)."""
    if method == "stack":
        return stack(mods, weights, name=name)
    if method == "svd":
        if rank is None and energy is None:
            rank = max(m.rank for m in mods if m is not None)
        return svd_combine(mods, weights, name=name, rank=rank, energy=energy)
    if method == "linear":
        # The exact sum, re-factored to its numerical rank; --rank caps it (optimally) when smaller.
        return svd_combine(mods, weights, name=name, max_rank=rank, energy=energy)
    if method in ("ties", "dare", "dare_ties"):
        return task_merge(mods, weights, method, name=name, density=density, seed=seed, majority=majority,
                          rank=rank, energy=energy)
    raise SurgeryError(f"unknown combine method '{method}' ({', '.join(METHODS)})")


__all__ = [
    "CombineInfo",
    "METHODS",
    "check_compatible",
    "combine_modules",
    "dare_merge",
    "dense_delta",
    "disjoint_mean",
    "elect_sign",
    "is_plain_lora",
    "lora_factors",
    "lora_module_like",
    "magnitude_prune",
    "math_shape",
    "module_seed",
    "numerical_rank",
    "random_prune",
    "stack",
    "svd_combine",
    "task_merge",
    "ties_merge",
]
