"""Apply and remove one adapter module's ΔW on a base weight tensor (pure tensor math, no files).

Everything is computed in float32 (float64 when the weight is float64) and cast back to the weight's own
dtype at the end, as PEFT's ``safe_merge`` does. ``strength`` multiplies the module's contribution.

>>> import torch
>>> from peft_surgery.adapter import AdapterModule, LoRA
>>> W = torch.zeros(2, 3)
>>> m = AdapterModule(LoRA(down=torch.ones(1, 3), up=torch.ones(2, 1)), scale=0.5)
>>> merge_weight(W, m, strength=2.0)
tensor([[1., 1., 1.],
        [1., 1., 1.]])
>>> bool((unmerge_weight(merge_weight(W, m), m) == W).all())
True

DoRA (``module.magnitude`` set) rescales each output row of ``W + ΔW`` to the learned magnitude. With
``strength`` w the result is interpolated, ``W + w·(W_dora − W)``, so strength 0 leaves W untouched and 1 is
exactly PEFT's merge. It cannot be undone without the pre-merge row norms, which a merged checkpoint does not
keep, so :func:`unmerge_weight` refuses DoRA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..adapter import AdapterModule, check_finite
from ..errors import ShapeMismatchError, SurgeryError
from . import delta as _delta


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fit_to_weight(delta: Tensor, weight_shape: tuple[int, ...], *, module: str | None = None,
                  path: object = None) -> Tensor:
    """Return ``delta`` in the base weight's stored shape.

    LoHa/LoKr conv deltas read without the base come out as ``(out, in·kh·kw)``; same element count means
    the kernel was folded, so reshape. A real mismatch (an adapter for another base) is an error naming the
    module.
    """
    shape = tuple(int(s) for s in weight_shape)
    if tuple(delta.shape) == shape:
        return delta
    if delta.numel() == torch.Size(shape).numel() and delta.shape[0] == shape[0]:
        return delta.reshape(shape)
    raise ShapeMismatchError(
        f"adapter ΔW has shape {tuple(delta.shape)} but the base weight is {shape} (adapter made for another base?)",
        path=path, tensor=module)


def module_delta(module: AdapterModule, weight: Tensor, *, name: str | None = None, path: object = None) -> Tensor:
    """ΔW of a non-DoRA ``module`` in the stored orientation and shape of ``weight`` (float32/64).

    The module's tensors must already be on ``weight``'s device (see :func:`module_to`).
    """
    w_math = module.from_stored(weight) if weight.dim() >= 2 else weight
    d = fit_to_weight(module.delta_math(), tuple(w_math.shape), module=name, path=path)
    d = module.to_stored(d) if d.dim() >= 2 else d
    return d.to(_work_dtype(weight))


def module_to(module: AdapterModule, device: str | torch.device) -> AdapterModule:
    """The module with every tensor moved to ``device`` (compute happens where the weight is)."""
    from dataclasses import fields, replace

    device = torch.device(device)
    delta = module.delta
    changes = {f.name: getattr(delta, f.name).to(device) for f in fields(delta)
               if isinstance(getattr(delta, f.name), Tensor)}
    out = module.replace(delta=replace(delta, **changes))
    if module.magnitude is not None:
        out = out.replace(magnitude=module.magnitude.to(device))
    if module.bias is not None:
        out = out.replace(bias=module.bias.to(device))
    return out


def _prepare(weight: Tensor, module: AdapterModule, device: str | torch.device | None):
    dev = torch.device(device) if device is not None else weight.device
    w = weight.to(dev, _work_dtype(weight))
    mod = module_to(module, dev) if any(t.device != dev for _, t in module.tensors()) else module
    return w, mod


def merge_weight(weight: Tensor, module: AdapterModule, *, strength: float = 1.0, name: str | None = None,
                 path: object = None, device: str | torch.device | None = None) -> Tensor:
    """``W + strength·ΔW`` (DoRA: the interpolated DoRA merge), computed in fp32 and cast to ``weight.dtype``."""
    w, mod = _prepare(weight, module, device)
    if mod.magnitude is None:
        d = module_delta(mod, w, name=name, path=path)
        out = w + d if strength == 1.0 else w + d * strength
    else:
        w_math = mod.from_stored(w)
        d = fit_to_weight(mod.delta_math().to(w.dtype), tuple(w_math.shape), module=name, path=path)
        mag = mod.magnitude.to(w.dtype)
        if getattr(mod, "magnitude_axis", "out") == "in":  # kohya-style DoRA: one magnitude per input column
            merged_math = _delta.dora_weight(w_math.transpose(0, 1), d.transpose(0, 1), mag).transpose(0, 1)
        else:
            merged_math = _delta.dora_weight(w_math, d, mag)
        merged = mod.to_stored(merged_math)
        out = merged if strength == 1.0 else w + (merged - w) * strength
    check_finite(out, path=path, tensor=name)
    return out.to(weight.dtype).to(weight.device)


def check_unmergeable(module: AdapterModule, *, name: str | None = None, path: object = None) -> None:
    """Raise for modules whose merge cannot be undone from the merged weight alone (DoRA)."""
    if module.magnitude is not None:
        raise SurgeryError(
            "DoRA cannot be unmerged from a merged checkpoint alone: the merge rescaled each row by "
            "m/‖W+ΔW‖, and recovering W needs those pre-merge norms, which only the original base holds",
            path=path, tensor=name)


def unmerge_weight(weight: Tensor, module: AdapterModule, *, strength: float = 1.0, name: str | None = None,
                   path: object = None, device: str | torch.device | None = None) -> Tensor:
    """``W' − strength·ΔW`` computed in fp32 and cast back. DoRA is refused (see the module docstring)."""
    check_unmergeable(module, name=name, path=path)
    w, mod = _prepare(weight, module, device)
    d = module_delta(mod, w, name=name, path=path)
    out = w - d if strength == 1.0 else w - d * strength
    check_finite(out, path=path, tensor=name)
    return out.to(weight.dtype).to(weight.device)


def merge_bias(bias: Tensor | None, module: AdapterModule, *, strength: float = 1.0, sign: float = 1.0,
               name: str | None = None, path: object = None) -> Tensor | None:
    """Add (``sign=1``) or remove (``sign=-1``) the module's bias delta; None when the module has none."""
    b = module.bias_delta()
    if b is None:
        return bias
    if bias is None:
        raise SurgeryError("the adapter carries a bias delta but the base module has no bias", path=path,
                           tensor=name)
    b = b.to(bias.device).reshape(bias.shape) if b.numel() == bias.numel() else None
    if b is None:
        raise ShapeMismatchError(f"bias delta has {module.bias.numel()} elements, base bias has {bias.numel()}",
                                 path=path, tensor=name)
    out = bias.to(_work_dtype(bias)) + b * (sign * strength)
    check_finite(out, path=path, tensor=name)
    return out.to(bias.dtype)


__all__ = ["check_unmergeable", "fit_to_weight", "merge_bias", "merge_weight", "module_delta", "module_to",
           "unmerge_weight"]
