"""The one canonical in-memory adapter.

An :class:`Adapter` maps a module path *in the base model's own namespace* (``model.layers.0.self_attn.q_proj``,
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``) to an :class:`AdapterModule`: one delta
(:class:`LoRA`, :class:`LoHa`, :class:`LoKr` or :class:`FullDiff`) with an explicit ``scale``, an optional
DoRA magnitude and bias, and a :class:`Layout` that says how ΔW maps onto the base weight tensor.

Formats translate names and layouts to and from this. Surgery does math on it. Nothing here knows about
any file format.

Conventions
-----------
* Factors are kept in PEFT's orientation: LoRA ``down``/A is ``(r, in[, *k])``, ``up``/B is ``(out, r[, 1..])``.
* ``scale`` is the factor PEFT multiplies the product by (alpha/r, alpha/√r, MLX's absolute scale, 1 for
  LyCORIS full LoKr, ...). ``alpha`` and ``rslora`` are only hints recording how the source expressed it.
* :meth:`AdapterModule.delta_weight` returns ΔW in the orientation of the *stored base weight*:
  ``(out, in)`` for Linear, ``(in, out)`` for GPT-2 Conv1D (``fan_in_fan_out``), ``(V, D)`` for embeddings,
  ``(out, in, kh, kw)`` for convs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Literal, Union

import torch
from torch import Tensor

from .surgery import delta as _delta

LayoutKind = Literal["linear", "conv", "embedding"]


@dataclass(frozen=True)
class Layout:
    """How a delta maps onto the base module's weight tensor.

    ``kind``: ``linear``, ``conv`` (kernel in ``weight_shape[2:]``) or ``embedding``.
    ``fan_in_fan_out``: the base stores the weight as ``(in, out)`` (GPT-2 ``Conv1D``).
    ``weight_shape``: the base weight's stored shape when known (needed to un-fold LoHa/LoKr conv deltas).
    """

    kind: LayoutKind = "linear"
    fan_in_fan_out: bool = False
    weight_shape: tuple[int, ...] | None = None

    @property
    def transposed(self) -> bool:
        """True when the stored weight is the transpose of the math orientation (Conv1D, embeddings)."""
        return self.fan_in_fan_out or self.kind == "embedding"

    def math_shape(self) -> tuple[int, ...] | None:
        """The weight shape in math orientation ``(out, in, *k)``."""
        if self.weight_shape is None:
            return None
        if self.transposed:
            return (self.weight_shape[1], self.weight_shape[0], *self.weight_shape[2:])
        return tuple(self.weight_shape)


@dataclass
class LoRA:
    """ΔW = up @ down (· scale). ``mid`` is an optional Tucker core ``(r, r, *k)`` for conv layers."""

    down: Tensor
    up: Tensor
    mid: Tensor | None = None

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def product(self, shape: tuple[int, ...] | None = None) -> Tensor:
        d = _delta.lora_delta(self.down, self.up, self.mid)
        if shape is not None and tuple(d.shape) != tuple(shape):
            d = d.reshape(shape)
        return d


@dataclass
class LoHa:
    """ΔW = (w1a@w1b) ⊙ (w2a@w2b) (· scale), optionally with Tucker cores t1/t2."""

    w1a: Tensor
    w1b: Tensor
    w2a: Tensor
    w2b: Tensor
    t1: Tensor | None = None
    t2: Tensor | None = None

    kind = "loha"

    @property
    def rank(self) -> int:
        # Tucker layout stores w1a as (r, out); plain layout as (out, r).
        return int(self.w1b.shape[0])

    def product(self, shape: tuple[int, ...] | None = None) -> Tensor:
        return _delta.loha_delta(self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2, shape)


@dataclass
class LoKr:
    """ΔW = kron(w1, w2) (· scale). Each factor is full (``w1``) or low rank (``w1a@w1b``); ``t2`` is a Tucker core."""

    w1: Tensor | None = None
    w1a: Tensor | None = None
    w1b: Tensor | None = None
    w2: Tensor | None = None
    w2a: Tensor | None = None
    w2b: Tensor | None = None
    t2: Tensor | None = None

    kind = "lokr"

    @property
    def rank(self) -> int:
        """The low-rank dimension (0 when both factors are full, as in LyCORIS 'full' LoKr)."""
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        return 0

    def product(self, shape: tuple[int, ...] | None = None) -> Tensor:
        return _delta.lokr_delta(self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2, shape)


@dataclass
class FullDiff:
    """A full ΔW stored as is (LyCORIS ``diff``), in math orientation."""

    diff: Tensor

    kind = "full"

    @property
    def rank(self) -> int:
        d = self.diff
        return int(min(d.shape[0], d[0].numel())) if d.dim() >= 2 else int(d.numel())

    def product(self, shape: tuple[int, ...] | None = None) -> Tensor:
        d = self.diff.to(_delta.compute_dtype(self.diff))
        return d.reshape(shape) if shape is not None else d


Delta = Union[LoRA, LoHa, LoKr, FullDiff]


def _tensors_of(obj: Any) -> Iterator[tuple[str, Tensor]]:
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, Tensor):
            yield f.name, v


@dataclass
class AdapterModule:
    """One adapted module: a delta, its explicit scale, and how it maps onto the base weight."""

    delta: Delta
    scale: float = 1.0
    layout: Layout = field(default_factory=Layout)
    magnitude: Tensor | None = None  # DoRA magnitude, ``out`` elements (PEFT's lora_magnitude_vector, reshaped)
    bias: Tensor | None = None  # bias delta (PEFT lora_B.bias before scaling, LyCORIS diff_b)
    alpha: float | None = None  # how the source expressed the scale (hint for writers)
    rslora: bool = False  # scale = alpha/√r in the source
    bias_scaled: bool = True  # whether ``bias`` is multiplied by ``scale`` (PEFT lora_B.bias) or added as is
    # DoRA normalisation axis: "out" = per output row (PEFT, LyCORIS wd_on_out), "in" = per input column
    # (legacy LyCORIS ``dora_scale`` of shape (1, in)); ``magnitude`` then has ``in`` elements.
    magnitude_axis: str = "out"

    @property
    def kind(self) -> str:
        return self.delta.kind

    @property
    def rank(self) -> int:
        return self.delta.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) for every tensor this module holds (factors, magnitude, bias)."""
        yield from _tensors_of(self.delta)
        if self.magnitude is not None:
            yield "magnitude", self.magnitude
        if self.bias is not None:
            yield "bias", self.bias

    @property
    def num_params(self) -> int:
        return sum(t.numel() for _, t in self.tensors())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.tensors())[1].dtype

    def delta_math(self) -> Tensor:
        """Scaled ΔW = scale·product in math orientation ``(out, in, *k)``, float32 (without DoRA)."""
        shape = self.layout.math_shape()
        d = self.delta.product(shape if self.kind != "lora" else None)
        if shape is not None and tuple(d.shape) != shape:
            d = d.reshape(shape)
        return d * self.scale

    def to_stored(self, math_tensor: Tensor) -> Tensor:
        """Turn a math-orientation tensor into the base weight's stored orientation."""
        return math_tensor.transpose(0, 1) if self.layout.transposed else math_tensor

    def from_stored(self, stored: Tensor) -> Tensor:
        return stored.transpose(0, 1) if self.layout.transposed else stored

    def delta_weight(self, base_weight: Tensor | None = None) -> Tensor:
        """ΔW exactly as PEFT applies it, in the base weight's stored orientation, float32.

        For DoRA the base weight is required and the result is ``W' − W`` (PEFT's merge).
        """
        d = self.delta_math()
        if base_weight is not None and not self.layout.transposed and tuple(d.shape) != tuple(base_weight.shape) \
                and d.numel() == base_weight.numel():
            # LoHa/LoKr conv deltas read without the base come out as (out, in·kh·kw): fold the kernel back.
            d = d.reshape(base_weight.shape)
        if self.magnitude is None:
            return self.to_stored(d)
        if base_weight is None:
            raise ValueError("a DoRA module needs the base weight to compute ΔW")
        w = self.from_stored(base_weight.to(d.dtype))
        if self.magnitude_axis == "in":
            # normalise per input column: DoRA on the transposed weight
            merged = _delta.dora_weight(w.transpose(0, 1), d.transpose(0, 1), self.magnitude.to(d.dtype)).transpose(0, 1)
        else:
            merged = _delta.dora_weight(w, d, self.magnitude.to(d.dtype))
        return self.to_stored(merged - w)

    def delta_norm(self) -> float:
        """‖ΔW‖_F (without DoRA); from the factors for plain LoRA, never forming the dense matrix there."""
        if isinstance(self.delta, LoRA) and self.delta.mid is None:
            return abs(self.scale) * _delta.lora_frobenius(self.delta.down, self.delta.up)
        return frobenius(self.delta_math())

    def bias_delta(self) -> Tensor | None:
        if self.bias is None:
            return None
        b = self.bias.to(_delta.compute_dtype(self.bias))
        return b * self.scale if self.bias_scaled else b

    def replace(self, **changes: Any) -> "AdapterModule":
        return replace(self, **changes)

    def to(self, device: Any) -> "AdapterModule":
        """A copy with every tensor (factors, magnitude, bias) on ``device``."""
        delta = replace(self.delta, **{n: t.to(device) for n, t in _tensors_of(self.delta)})
        return replace(self, delta=delta,
                       magnitude=None if self.magnitude is None else self.magnitude.to(device),
                       bias=None if self.bias is None else self.bias.to(device))


@dataclass
class Adapter:
    """Module path → :class:`AdapterModule`, plus everything an adapter file carries besides deltas.

    ``modules_to_save``: full tensors that replace base parameters (``classifier.weight``, ...), keyed by
    the parameter's name in the base model. ``config``: the source configuration, unknown fields included,
    so writers can keep them. ``metadata``: the source safetensors header metadata.
    """

    modules: dict[str, AdapterModule] = field(default_factory=dict)
    modules_to_save: dict[str, Tensor] = field(default_factory=dict)
    base_model: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> AdapterModule:
        return self.modules[name]

    def items(self):
        return self.modules.items()

    @property
    def num_params(self) -> int:
        return sum(m.num_params for m in self.modules.values()) + sum(
            t.numel() for t in self.modules_to_save.values()
        )

    def module_types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            key = m.kind + ("+dora" if m.is_dora else "")
            out[key] = out.get(key, 0) + 1
        return out

    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    def scales(self) -> dict[str, float]:
        return {k: m.scale for k, m in self.modules.items()}

    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.modules.values():
            for _, t in m.tensors():
                name = str(t.dtype).replace("torch.", "")
                out[name] = out.get(name, 0) + 1
        for t in self.modules_to_save.values():
            name = str(t.dtype).replace("torch.", "")
            out[name] = out.get(name, 0) + 1
        return out

    def delta_weights(self) -> Iterator[tuple[str, Tensor]]:
        """(module, ΔW) for every non-DoRA module (DoRA needs the base; see AdapterModule.delta_weight)."""
        for name, m in self.modules.items():
            yield name, m.delta_weight()

    def copy(self, **changes: Any) -> "Adapter":
        return replace(self, **changes)

    def save(self, path, format: str = "peft", **kwargs: Any):
        """Write this adapter in ``format`` (see :func:`peft_surgery.formats.save_adapter`)."""
        from .formats import save_adapter

        return save_adapter(self, path, format=format, **kwargs)

    def rescale(self, *, to_rslora: bool = False, to_lora: bool = False, alpha: float | None = None,
                strength: float | None = None, fold_scale: bool = False, config_only: bool = False):
        """A rescaled copy and its report: ``(Adapter, RescaleReport)``; exactly one operation.

        ``to_rslora``/``to_lora``/``alpha``/``fold_scale`` restate the scale with ΔW unchanged; ``strength``
        multiplies ΔW (see :func:`peft_surgery.algebra.rescale_adapter`).

        >>> import torch
        >>> a = Adapter({"fc": AdapterModule(LoRA(torch.ones(2, 4), torch.ones(4, 2)), scale=1.0, alpha=2.0)})
        >>> b, report = a.rescale(strength=0.5)
        >>> float(b["fc"].delta_weight()[0, 0]), float(a["fc"].delta_weight()[0, 0])
        (1.0, 2.0)
        """
        from .algebra import rescale_adapter

        return rescale_adapter(self, to_rslora=to_rslora, to_lora=to_lora, alpha=alpha, strength=strength,
                               fold_scale=fold_scale, config_only=config_only)

    def resize(self, *, rank: int | None = None, energy: float | None = None, sv_ratio: float | None = None,
               device: str = "cpu"):
        """A lower-rank copy (optimal truncated SVD of each ΔW) and its report: ``(Adapter, ResizeReport)``."""
        from .algebra import resize_adapter

        return resize_adapter(self, rank=rank, energy=energy, sv_ratio=sv_ratio, device=device)


def frobenius(t: Tensor) -> float:
    """‖t‖_F in float64 (robust for large tensors)."""
    return float(torch.linalg.vector_norm(t.reshape(-1).to(torch.float64)))


def check_finite(t: Tensor, *, path: object = None, tensor: str | None = None) -> None:
    """Raise NonFiniteError naming the file and tensor if ``t`` has NaN/Inf."""
    from .errors import NonFiniteError

    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(f"contains {n_nan} NaN and {n_inf} Inf values", path=path, tensor=tensor)


__all__ = [
    "Adapter",
    "AdapterModule",
    "Delta",
    "FullDiff",
    "Layout",
    "LoHa",
    "LoKr",
    "LoRA",
    "check_finite",
    "frobenius",
]
