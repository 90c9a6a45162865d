"""Adapter-type conversion: LoRA ↔ LoHa / LoKr / full diff, as math on the canonical :class:`Adapter`.

Exact directions (ΔW and scale unchanged, up to float rounding):

* LoRA → LoHa: ``w1 = B @ A`` and a second Hadamard factor that multiplies to all-ones
  (``w2a = [1, 0, …]`` columns, ``w2b = [1; 0; …]`` rows, so both factors keep the LoRA's rank r, as PEFT
  requires, and the product is exactly ones without any ``1/r`` rounding).
* LoRA → LoKr: ``kron([[1]], B @ A)``: a 1×1 ``w1`` and ``w2a = B``, ``w2b = A``.
* Tucker conv LoRA (``mid``) → LoKr uses ``lokr_t2`` (same Tucker layout), → LoHa uses ``hada_t1/t2``.

Lossy directions go through a *factored* SVD (:func:`..linalg.factored_svd`), never building ΔW when the
factored rank is smaller than the matrix:

* LoHa: ``(A1 B1) ⊙ (A2 B2) = U @ D`` with ``U[o, (i,j)] = A1[o,i]·A2[o,j]`` (row-wise Khatri–Rao) and
  ``D[(i,j), c] = B1[i,c]·B2[j,c]``: rank ≤ r1·r2.
* LoKr: ``kron(U1 S1 V1, U2 S2 V2) = kron(U1 S1, U2 S2) @ kron(V1, V2)``: each Kronecker factor is
  decomposed on its own (small), rank ≤ k1·k2.
* full diff: dense SVD.

The truncation rank comes from ``rank`` or ``energy`` (see :func:`..linalg.select_rank`); with neither, the
numerical rank is kept (lossless up to rounding). Every module gets a report row with its relative
Frobenius error computed from the exact spectrum.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, AdapterModule, FullDiff, LoHa, LoKr, LoRA
from . import linalg
from .delta import compute_dtype, lokr_factor

TYPES = ("lora", "loha", "lokr", "full")


# --------------------------------------------------------------------------------------------------------
# exact conversions out of LoRA
# --------------------------------------------------------------------------------------------------------


def _mid_down(d: LoRA) -> Tensor:
    """A Tucker LoRA's effective conv down ``(r, in, *k)``: ``Σ_j mid[i,j,…]·down[j,c]``."""
    assert d.mid is not None
    r = d.down.shape[0]
    dt = compute_dtype(d.down, d.mid)
    return torch.einsum("ij...,jc->ic...", d.mid.to(dt), d.down.to(dt).reshape(r, -1))


def _ones_factor(out: int, inn: int, r: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a, b) with ``a @ b == ones(out, inn)`` exactly and inner dimension ``r``."""
    a = torch.zeros(out, r, dtype=like.dtype, device=like.device)
    b = torch.zeros(r, inn, dtype=like.dtype, device=like.device)
    a[:, 0] = 1
    b[0] = 1
    return a, b


def lora_to_loha(d: LoRA) -> LoHa:
    """Exact LoHa with the same rank: ``(B @ A) ⊙ ones``."""
    r = d.rank
    up2 = d.up.reshape(d.up.shape[0], r)
    if d.mid is not None:
        # Tucker layout: w*a (r, out), w*b (r, in), t* (r, r, *k). The ones factor uses the core e₀⊗e₀⊗ones
        # with w2a[0] = w2b[0] = ones, so its rebuild is exactly ones(out, in, *k).
        out, inn = up2.shape[0], d.down.shape[1]
        t2 = torch.zeros_like(d.mid)
        t2[0, 0] = 1
        w2a, w2b = _ones_factor(out, inn, r, d.down)
        return LoHa(w1a=up2.T.contiguous(), w1b=d.down.reshape(r, inn).contiguous(), w2a=w2a.T.contiguous(),
                    w2b=w2b, t1=d.mid, t2=t2)
    down2 = d.down.reshape(r, -1)
    w2a, w2b = _ones_factor(up2.shape[0], down2.shape[1], r, d.down)
    return LoHa(w1a=up2.contiguous(), w1b=down2.contiguous(), w2a=w2a, w2b=w2b)


def lora_to_lokr(d: LoRA) -> LoKr:
    """Exact LoKr: ``kron([[1]], B @ A)`` (a 1×1 ``w1``; the LoRA becomes the low-rank ``w2``)."""
    r = d.rank
    up2 = d.up.reshape(d.up.shape[0], r)
    w1 = torch.ones(1, 1, dtype=d.down.dtype, device=d.down.device)
    if d.mid is not None:
        # lokr_t2 uses the transposed Tucker layout: w2a (r, out), w2b (r, in).
        return LoKr(w1=w1, w2a=up2.T.contiguous(), w2b=d.down.reshape(r, -1).contiguous(), t2=d.mid)
    down2 = d.down.reshape(r, -1)
    if 2 * r >= max(up2.shape[0], d.down.shape[1]):
        # PEFT keeps w2 full when r ≥ max(out, in)/2: store the product (exact up to one matmul rounding).
        w2 = d.product()
        return LoKr(w1=w1, w2=w2.to(d.down.dtype).contiguous())
    # A conv keeps its kernel in w2b: PEFT's non-CP conv LoKr stores w2b as (r, in·kh·kw).
    return LoKr(w1=w1, w2a=up2.contiguous(), w2b=down2.contiguous())


# --------------------------------------------------------------------------------------------------------
# factorisations of LoHa / LoKr / full products (for → LoRA)
# --------------------------------------------------------------------------------------------------------


def loha_factors(d: LoHa) -> tuple[Tensor, Tensor] | None:
    """(U, D) with ``U @ D`` = the LoHa product (flattened to 2-D), rank r1·r2; None for Tucker LoHa."""
    if d.t1 is not None or d.t2 is not None:
        return None
    dt = compute_dtype(d.w1a, d.w1b, d.w2a, d.w2b)
    a1, b1, a2, b2 = (t.to(dt) for t in (d.w1a, d.w1b, d.w2a, d.w2b))
    up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)  # (out, r1·r2)
    down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])  # (r1·r2, in)
    return up, down


def _factor_lowrank(a: Tensor | None, b: Tensor | None, full: Tensor | None, t: Tensor | None) -> tuple[Tensor, Tensor]:
    """(U·S, Vh) of one Kronecker factor, 2-D, numerically-zero singular directions dropped."""
    if full is not None:
        m = full.reshape(full.shape[0], -1)
        svd = linalg.exact_svd(m)
    elif t is not None:
        m = lokr_factor(a, b, None, t)
        svd = linalg.exact_svd(m.reshape(m.shape[0], -1))
    else:
        assert a is not None and b is not None
        svd = linalg.factored_svd([a], [b.reshape(b.shape[0], -1)])
    k = _numerical_rank(svd.S, svd.U.shape[0], svd.Vh.shape[1])
    k = max(k, 1)
    return svd.U[:, :k] * svd.S[:k], svd.Vh[:k]


def lokr_factors(d: LoKr) -> tuple[Tensor, Tensor]:
    """(U, D) with ``U @ D`` = the LoKr product flattened to ``(out, in·k…)``."""
    dt = compute_dtype(*(t for _, t in _tensors(d)))
    u1, v1 = _factor_lowrank(*(None if x is None else x.to(dt) for x in (d.w1a, d.w1b, d.w1, None)))
    u2, v2 = _factor_lowrank(*(None if x is None else x.to(dt) for x in (d.w2a, d.w2b, d.w2, d.t2)))
    # kron(u1 v1, u2 v2) = kron(u1, u2) @ kron(v1, v2); a conv w2 is already flattened to (out_k, in_n·k).
    return torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(v1.contiguous(), v2.contiguous())


def _tensors(obj: Any):
    for name in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t1", "t2", "down", "up", "mid", "diff"):
        t = getattr(obj, name, None)
        if isinstance(t, Tensor):
            yield name, t


def _numerical_rank(S: Tensor, rows: int, cols: int) -> int:
    """Singular values above ``max(m, n)·eps·S₀`` (the usual numerical-rank tolerance)."""
    if S.numel() == 0 or float(S[0]) == 0.0:
        return 0
    eps = torch.finfo(S.dtype).eps
    return int((S > S[0] * eps * max(rows, cols)).sum())


def product_svd(m: AdapterModule) -> tuple[linalg.SVD, str, int]:
    """SVD of the module's *unscaled* product as a 2-D ``(out, in·k…)`` matrix.

    Returns (svd, method, factored_rank). ``method`` is ``factored`` when the SVD came from the factors
    (cheaper than the dense matrix) and ``dense`` otherwise.
    """
    d = m.delta
    factors: tuple[Tensor, Tensor] | None = None
    if isinstance(d, LoRA):
        down = _mid_down(d) if d.mid is not None else d.down
        factors = (d.up.reshape(d.up.shape[0], -1).to(compute_dtype(d.up)), down.reshape(down.shape[0], -1))
    elif isinstance(d, LoHa):
        factors = loha_factors(d)
    elif isinstance(d, LoKr):
        factors = lokr_factors(d)
    if factors is not None:
        up, down = factors
        # drop rank-one terms that vanish (e.g. the zero padding of an exact LoRA → LoHa ones factor)
        keep = up.any(dim=0) & down.any(dim=1)
        if not bool(keep.all()) and bool(keep.any()):
            up, down = up[:, keep], down[keep]
        out, inn = up.shape[0], down.shape[1]
        k = up.shape[1]
        if k < min(out, inn):
            # float64 keeps the small spectrum accurate (the cost is O((out+in)·k²), tiny next to a dense SVD)
            return linalg.factored_svd([up.double()], [down.double()]), "factored", k
    dense = d.product(m.layout.math_shape() if not isinstance(d, LoRA) else None)
    dense = dense.reshape(dense.shape[0], -1)
    return linalg.exact_svd(dense), "dense", min(dense.shape)


# --------------------------------------------------------------------------------------------------------
# module / adapter conversion
# --------------------------------------------------------------------------------------------------------


def conv_shape(m: AdapterModule) -> tuple[int, ...] | None:
    """The conv weight shape ``(out, in, *k)`` when the factors alone determine it (LoKr 4-D w2 / Tucker)."""
    d = m.delta
    if isinstance(d, LoKr):
        f1 = d.w1 if d.w1 is not None else None
        out_l, in_m = (f1.shape[0], f1.shape[1]) if f1 is not None else (d.w1a.shape[0], d.w1b.shape[1])
        if d.t2 is not None:
            return (out_l * d.w2a.shape[1], in_m * d.w2b.shape[1], *d.t2.shape[2:])
        if d.w2 is not None and d.w2.dim() > 2:
            return (out_l * d.w2.shape[0], in_m * d.w2.shape[1], *d.w2.shape[2:])
    if isinstance(d, LoHa) and d.t1 is not None:
        return (d.w1a.shape[1], d.w1b.shape[1], *d.t1.shape[2:])
    if isinstance(d, LoRA) and d.down.dim() > 2:
        return (d.up.shape[0], d.down.shape[1], *d.down.shape[2:])
    return None


def _lora_from_svd(m: AdapterModule, svd: linalg.SVD, rank: int) -> LoRA:
    """LoRA factors in the stored dtype holding the rank-``rank`` truncation (singular values in up)."""
    up, down = linalg.split_scale(svd, rank)
    dtype = m.dtype if m.dtype.is_floating_point and m.dtype not in (torch.float16, torch.bfloat16) else torch.float32
    # Half-precision sources stay in float32 here: the factors are new numbers and deserve full precision.
    up, down = up.to(dtype), down.to(dtype)
    shape = m.layout.math_shape() or conv_shape(m)
    if m.layout.kind == "conv" and shape is not None and len(shape) > 2:
        down = down.reshape(rank, *shape[1:])
        up = up.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    return LoRA(down=down.contiguous(), up=up.contiguous())


def tail_error(svd: linalg.SVD, rank: int) -> float:
    """‖M − M_k‖_F / ‖M‖_F from the discarded singular values (no cancellation, unlike total − kept)."""
    s2 = svd.S.double() ** 2
    total = float(s2.sum())
    return math.sqrt(float(s2[rank:].sum()) / total) if total > 0 else 0.0


def to_lora(m: AdapterModule, *, rank: int | None = None, energy: float | None = None) -> tuple[AdapterModule, dict]:
    """Convert one module to LoRA. Returns the new module and its report row."""
    svd, method, k_fact = product_svd(m)
    out, inn = svd.U.shape[0], svd.Vh.shape[1]
    if rank is None and energy is None:
        new_rank = max(_numerical_rank(svd.S, out, inn), 1)
    else:
        new_rank = linalg.select_rank(svd, rank=rank, energy=energy)
    new_rank = max(min(new_rank, svd.rank), 1)
    err = tail_error(svd, new_rank)
    lora = _lora_from_svd(m, svd, new_rank)
    exact = new_rank >= _numerical_rank(svd.S, out, inn)
    new = m.replace(delta=lora, alpha=None, rslora=False)
    row = {"module": "", "from": m.kind, "to": "lora", "rank": m.rank, "factored_rank": k_fact,
           "new_rank": new_rank, "method": method, "rel_error": float(err), "exact": bool(exact)}
    return new, row


def convert_module(m: AdapterModule, to_type: str, *, rank: int | None = None,
                   energy: float | None = None) -> tuple[AdapterModule, dict]:
    """Convert one module to ``to_type`` (lora, loha, lokr, full). Returns (module, report row)."""
    if to_type not in TYPES:
        raise ValueError(f"unknown adapter type '{to_type}' (known: {', '.join(TYPES)})")
    src = m.kind
    if src == to_type:
        return m, {"module": "", "from": src, "to": to_type, "rank": m.rank, "factored_rank": m.rank,
                   "new_rank": m.rank, "method": "unchanged", "rel_error": 0.0, "exact": True}
    if to_type == "full":
        d = m.delta.product(m.layout.math_shape() if src != "lora" else None)
        dt = m.dtype if m.dtype.is_floating_point else torch.float32
        return m.replace(delta=FullDiff(d.to(dt))), {
            "module": "", "from": src, "to": "full", "rank": m.rank, "factored_rank": m.rank, "new_rank": m.rank,
            "method": "dense", "rel_error": 0.0, "exact": True}
    if src == "lora":
        lora_mod, row = m, {"module": "", "from": "lora", "to": to_type, "rank": m.rank, "factored_rank": m.rank,
                            "new_rank": m.rank, "method": "exact", "rel_error": 0.0, "exact": True}
    else:
        lora_mod, row = to_lora(m, rank=rank, energy=energy)
        row["to"] = to_type
    if to_type == "lora":
        return lora_mod, row
    d = lora_mod.delta
    assert isinstance(d, LoRA)
    new_delta = lora_to_loha(d) if to_type == "loha" else lora_to_lokr(d)
    alpha = lora_mod.alpha
    return lora_mod.replace(delta=new_delta, alpha=alpha), row


def convert_type(adapter: Adapter, to_type: str, rank: int | None = None, energy: float | None = None,
                 report: Any = None) -> Adapter:
    """Convert every module of ``adapter`` to ``to_type``; append per-module rows and notes to ``report``.

    >>> lokr_adapter = convert_type(lora_adapter, "lokr")          # doctest: +SKIP  (exact)
    >>> lora_adapter = convert_type(loha_adapter, "lora", rank=8)  # doctest: +SKIP  (lossy, reported)
    """
    to_type = to_type.lower()
    if rank is not None and energy is not None:
        raise ValueError("give at most one of rank and energy")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    modules: dict[str, AdapterModule] = {}
    rows = []
    for name, m in adapter.modules.items():
        new, row = convert_module(m, to_type, rank=rank, energy=energy)
        row["module"] = name
        modules[name] = new
        rows.append(row)
    out = adapter.copy(modules=modules)
    if report is not None:
        report.rows.extend(rows)
        lossy = [r for r in rows if not r["exact"]]
        changed = [r for r in rows if r["method"] != "unchanged"]
        if changed:
            worst = max((r["rel_error"] for r in rows), default=0.0)
            report.notes.append(
                f"type conversion to {to_type}: {len(changed)} modules converted, {len(lossy)} lossy "
                f"(max relative Frobenius error {worst:.3g})")
        if any(m.is_dora for m in modules.values()) and to_type != "lora":
            report.notes.append("DoRA magnitudes were kept; only PEFT LoRA can store them")
    return out


def max_relative_error(rows: list[dict]) -> float:
    return max((float(r["rel_error"]) for r in rows), default=0.0) if rows else 0.0


__all__ = [
    "TYPES",
    "convert_module",
    "convert_type",
    "lokr_factors",
    "loha_factors",
    "lora_to_loha",
    "lora_to_lokr",
    "product_svd",
    "to_lora",
]
