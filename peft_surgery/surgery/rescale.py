"""Re-express an adapter module's scale without (or, for ``strength``, with a known) change to ΔW.

PEFT's LoRA scale is s = alpha/r (rsLoRA: alpha/√r); LoHa/LoKr always use alpha/r. ΔW = s·(product).

* :func:`to_rslora` / :func:`to_lora`: keep s, rewrite alpha for the other convention (alpha·√r ↔ alpha/√r).
* :func:`set_alpha`: new alpha; B (LoHa ``w1a``, LoKr ``w1``/``w1a``) is multiplied by s_old/s_new so ΔW is
  unchanged, or with ``config_only`` only alpha changes (ΔW is multiplied by s_new/s_old).
* :func:`set_strength`: ΔW ← S·ΔW through B; alpha unchanged.
* :func:`fold_scale`: B ← s·B and alpha = r (s = 1), for runtimes that ignore alpha.

Factors are rescaled in float32 and cast back: bit-exact for float32 when the factor is a power of two,
otherwise one rounding per element in the storage dtype (reported by the callers).
Alphas that land within 1e-12 of a short decimal are snapped to it (2·√8·… → 16.0), so
LoRA → rsLoRA → LoRA returns the original alpha and scale exactly.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from ..adapter import AdapterModule, FullDiff, LoHa, LoKr, LoRA
from ..errors import SurgeryError
from .delta import alpha_for_scale, rank_scale


def snap(x: float, digits: int = 6, rel_tol: float = 1e-12) -> float:
    """``x`` rounded to ``digits`` decimals when that is within ``rel_tol`` (undoes float round-off)."""
    r = round(x, digits)
    return float(r) if math.isclose(x, r, rel_tol=rel_tol, abs_tol=0.0) else float(x)


def alpha_rank(m: AdapterModule) -> int:
    """The r that alpha is divided by for this module (the LoKr config r is recovered from the alpha hint)."""
    if isinstance(m.delta, LoKr) and m.alpha is not None and m.scale not in (0.0,) and not m.rslora:
        r = m.alpha / m.scale
        if r > 0 and math.isclose(r, round(r), rel_tol=1e-9):
            return int(round(r))
    return max(m.rank, 1)


def _first_factor_name(m: AdapterModule) -> str:
    d = m.delta
    if isinstance(d, LoRA):
        return "up"
    if isinstance(d, LoHa):
        return "w1a"
    if isinstance(d, LoKr):
        return "w1" if d.w1 is not None else "w1a"
    if isinstance(d, FullDiff):
        return "diff"
    raise SurgeryError(f"unknown delta type {type(d).__name__}")


def _mul(t: Tensor, f: float) -> Tensor:
    if f == 1.0:
        return t
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    return (t.to(work) * f).to(t.dtype)


def scale_delta(m: AdapterModule, factor: float) -> AdapterModule:
    """The module with its ΔW (and bias delta) multiplied by ``factor`` through its first factor."""
    if factor == 1.0:
        return m
    if not math.isfinite(factor):
        raise SurgeryError(f"scale factor {factor} is not finite")
    fname = _first_factor_name(m)
    delta = replace(m.delta, **{fname: _mul(getattr(m.delta, fname), factor)})
    bias = _mul(m.bias, factor) if m.bias is not None else None
    return m.replace(delta=delta, bias=bias)


def _restate(m: AdapterModule, *, new_scale: float, keep_delta: bool, alpha: float | None,
             rslora: bool) -> AdapterModule:
    """Set the module's scale; when ``keep_delta`` compensate in B so ΔW = s·product is unchanged.

    A bias delta that PEFT scales by s (``bias_scaled``) is compensated like B.
    """
    if new_scale == 0.0 and keep_delta:
        raise SurgeryError("alpha 0 gives scale 0; ΔW cannot be kept (use --config-only to zero it)")
    out = m
    if keep_delta and new_scale != m.scale:
        f = m.scale / new_scale
        fname = _first_factor_name(m)
        delta = replace(m.delta, **{fname: _mul(getattr(m.delta, fname), f)})
        bias = _mul(m.bias, f) if (m.bias is not None and m.bias_scaled) else m.bias
        out = m.replace(delta=delta, bias=bias)
    return out.replace(scale=new_scale, alpha=alpha, rslora=rslora)


def to_rslora(m: AdapterModule) -> AdapterModule:
    """Same ΔW, expressed as rsLoRA (alpha = s·√r). LoHa/LoKr have no rsLoRA: returned unchanged."""
    if not isinstance(m.delta, LoRA) or m.rslora:
        return m
    r = m.rank
    alpha = snap(alpha_for_scale(m.scale, r, True))
    s = rank_scale(alpha, r, True)
    # keep the exact scale unless the snapped alpha reproduces it to float64 round-off (what readers compute)
    s = s if math.isclose(s, m.scale, rel_tol=1e-12, abs_tol=0.0) else m.scale
    return m.replace(scale=s, alpha=alpha, rslora=True)


def to_lora(m: AdapterModule) -> AdapterModule:
    """Same ΔW, expressed as plain LoRA (alpha = s·r)."""
    if not isinstance(m.delta, LoRA) or not m.rslora:
        return m
    r = m.rank
    alpha = snap(alpha_for_scale(m.scale, r, False))
    s = rank_scale(alpha, r, False)
    s = s if math.isclose(s, m.scale, rel_tol=1e-12, abs_tol=0.0) else m.scale
    return m.replace(scale=s, alpha=alpha, rslora=False)


def set_alpha(m: AdapterModule, alpha: float, *, config_only: bool = False) -> AdapterModule:
    """New alpha; ΔW unchanged (B compensates) unless ``config_only``."""
    if not math.isfinite(alpha):
        raise SurgeryError(f"alpha must be finite, got {alpha}")
    rs = m.rslora and isinstance(m.delta, LoRA)
    new_scale = rank_scale(alpha, alpha_rank(m), rs)
    return _restate(m, new_scale=new_scale, keep_delta=not config_only, alpha=float(alpha), rslora=rs)


def set_strength(m: AdapterModule, strength: float, *, name: str | None = None) -> AdapterModule:
    """ΔW ← strength·ΔW (through B), scale and alpha unchanged. Refused for DoRA (not linear in B)."""
    if not math.isfinite(strength):
        raise SurgeryError(f"strength must be finite, got {strength}")
    if m.is_dora:
        raise SurgeryError("DoRA's merged change is not linear in its factors, so --strength cannot scale it; "
                           "use `merge --weights` instead", tensor=name)
    return scale_delta(m, strength)  # the bias delta scales with ΔW whether or not PEFT multiplies it by s


def fold_scale(m: AdapterModule) -> AdapterModule:
    """B ← s·B, scale 1, alpha = r (plain, not rsLoRA): the same ΔW for runtimes that ignore alpha."""
    r = alpha_rank(m)
    return _restate(m, new_scale=1.0, keep_delta=True, alpha=float(r), rslora=False)


__all__ = ["alpha_rank", "fold_scale", "scale_delta", "set_alpha", "set_strength", "snap", "to_lora", "to_rslora"]
