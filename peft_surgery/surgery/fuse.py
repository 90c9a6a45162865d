"""Fused ↔ split projections (Flux qkv, linear1 = q,k,v,mlp, …) as exact math on adapter modules.

A fused Linear's output rows are the concatenation of its parts' rows. Both directions keep ΔW exactly:

* :func:`fuse_rows` (split → fused): LoRA parts become one LoRA with stacked A (Σr, in) and block-diagonal B
  (Σout, Σr) — what kohya's ``convert_flux_lora.py`` writes. Part scales that differ from the common scale are
  folded into their B block. Missing parts are zero rows. LoHa parts fuse the same way factor by factor;
  other mixes fall back to a full diff.
* :func:`split_rows` (fused → split): a LoRA whose B is block-diagonal with equal blocks is chunked (rank r/n
  each); otherwise A is copied to every part and B is split by rows (rank r each). Both are exact. LoHa splits
  its two ``a`` factors by rows; LoKr splits ``w1`` rows when every part size is a multiple of ``w2``'s rows.
* :func:`swap_halves`: the BFL ↔ diffusers final modulation (shift, scale) ↔ (scale, shift): a row permutation.

DoRA magnitudes and bias deltas are per output row, so they split and concatenate with the rows.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..adapter import AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA


def _block_diag(ups: Sequence[Tensor | None], sizes: Sequence[int], ranks: Sequence[int], like: Tensor) -> Tensor:
    out = like.new_zeros(sum(sizes), sum(ranks))
    r0 = c0 = 0
    for u, n, r in zip(ups, sizes, ranks):
        if u is not None:
            out[r0:r0 + n, c0:c0 + r] = u
        r0 += n
        c0 += r
    return out


def _linear_layout(out: int, inn: int) -> Layout:
    return Layout("linear", False, (out, inn))


def _rows(m: AdapterModule) -> int:
    d = m.delta
    if isinstance(d, LoRA):
        return int(d.up.shape[0])
    shape = m.layout.math_shape()
    return int(shape[0]) if shape is not None else int(m.delta_math().shape[0])


def _in_features(m: AdapterModule) -> int:
    d = m.delta
    if isinstance(d, LoRA):
        return int(d.down.shape[1])
    return int(m.delta_math().reshape(m.delta_math().shape[0], -1).shape[1])


def fuse_rows(parts: Sequence[AdapterModule | None], sizes: Sequence[int]) -> tuple[AdapterModule, str]:
    """One module whose ΔW stacks the parts' ΔW along rows (``None`` parts are zero rows).

    Returns (module, method): ``lora-shared-down`` (parts share one A, e.g. after a copy-down split: B rows
    stack and the rank stays), ``lora-block-diagonal``, ``loha-block-diagonal`` or ``full``.
    The scale is the first present part's scale; other parts' scale ratios are folded into their rows.
    """
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("nothing to fuse: every part is missing")
    if any(p.is_dora and p.magnitude_axis != "out" for p in present):
        raise ValueError("column-wise (input-axis) DoRA norms span every row; parts cannot be fused")
    for p, n in zip(parts, sizes):
        if p is not None and p.layout.kind != "linear":
            raise ValueError("only linear modules can be fused")
        if p is not None and _rows(p) != n:
            raise ValueError(f"part has {_rows(p)} rows, expected {n}")
    if any(p.is_dora for p in present) and (len(present) < len(parts) or not all(p.is_dora for p in present)):
        raise ValueError("cannot fuse DoRA parts when some parts are missing or not DoRA (their magnitudes "
                         "depend on the base weight)")
    scale = present[0].scale
    inn = _in_features(present[0])
    kinds = {p.kind for p in present}
    mags = [p.magnitude.reshape(-1) for p in present] if present[0].is_dora else None
    biases = None
    if any(p.bias is not None for p in present):
        biases = []
        for p, n in zip(parts, sizes):
            b = p.bias_delta() if p is not None else None
            biases.append(b / scale if b is not None else torch.zeros(n))
    bias = torch.cat(biases) if biases is not None else None
    magnitude = torch.cat(mags) if mags is not None else None
    layout = _linear_layout(sum(sizes), inn)
    if kinds == {"lora"} and all(p.delta.mid is None for p in present) and len(present) > 1 and all(
            p.scale == scale and p.delta.down.shape == present[0].delta.down.shape
            and torch.equal(p.delta.down, present[0].delta.down) for p in present):
        # Parts that share one A (what a copy-down split produced): B rows simply stack, rank unchanged.
        d0 = present[0].delta
        up = torch.cat([p.delta.up if p is not None else d0.up.new_zeros(n, d0.rank) for p, n in zip(parts, sizes)])
        mod = AdapterModule(LoRA(down=d0.down, up=up), scale=scale, layout=layout, magnitude=magnitude, bias=bias,
                            alpha=present[0].alpha, bias_scaled=True)
        return mod, "lora-shared-down"
    if kinds == {"lora"} and all(p.delta.mid is None for p in present):
        ref = present[0].delta.down
        downs, ups, ranks = [], [], []
        for p, n in zip(parts, sizes):
            if p is None:
                continue
            d = p.delta
            up = d.up if p.scale == scale else (d.up.to(torch.float32) * (p.scale / scale)).to(d.up.dtype)
            downs.append(d.down.to(ref.dtype))
            ups.append(up.to(ref.dtype))
            ranks.append(d.rank)
        # block rows of missing parts stay zero: insert empty rank blocks for them
        all_ups: list[Tensor | None] = []
        all_ranks: list[int] = []
        it = iter(zip(ups, ranks))
        for p in parts:
            if p is None:
                all_ups.append(None)
                all_ranks.append(0)
            else:
                u, r = next(it)
                all_ups.append(u)
                all_ranks.append(r)
        up = _block_diag(all_ups, sizes, all_ranks, ref)
        down = torch.cat(downs, dim=0)
        mod = AdapterModule(LoRA(down=down, up=up), scale=scale, layout=layout, magnitude=magnitude, bias=bias,
                            alpha=None, bias_scaled=True)
        return mod, "lora-block-diagonal"
    if kinds == {"loha"} and all(p.delta.t1 is None for p in present):
        ref = present[0].delta.w1a
        w1a, w1b, w2a, w2b, r1, r2 = [], [], [], [], [], []
        for p in parts:
            if p is None:
                w1a.append(None), w2a.append(None), r1.append(0), r2.append(0)
                continue
            d = p.delta
            a1 = d.w1a if p.scale == scale else (d.w1a.to(torch.float32) * (p.scale / scale)).to(d.w1a.dtype)
            w1a.append(a1.to(ref.dtype)), w2a.append(d.w2a.to(ref.dtype))
            w1b.append(d.w1b.to(ref.dtype)), w2b.append(d.w2b.to(ref.dtype))
            r1.append(d.w1b.shape[0]), r2.append(d.w2b.shape[0])
        delta = LoHa(w1a=_block_diag(w1a, sizes, r1, ref), w1b=torch.cat(w1b), w2a=_block_diag(w2a, sizes, r2, ref),
                     w2b=torch.cat(w2b))
        mod = AdapterModule(delta, scale=scale, layout=layout, magnitude=magnitude, bias=bias, alpha=None)
        return mod, "loha-block-diagonal"
    # Anything else (LoKr, mixed types, Tucker): the exact dense ΔW.
    rows = []
    dtype = present[0].dtype
    for p, n in zip(parts, sizes):
        if p is None:
            rows.append(torch.zeros(n, inn))
        else:
            d = p.delta_math()
            rows.append(d.reshape(d.shape[0], -1) / scale)
    diff = torch.cat(rows).to(dtype)
    return AdapterModule(FullDiff(diff), scale=scale, layout=layout, magnitude=magnitude, bias=bias), "full"


def _is_block_diagonal(up: Tensor, sizes: Sequence[int]) -> bool:
    n = len(sizes)
    r = up.shape[1]
    if r % n:
        return False
    k = r // n
    r0 = 0
    for j, s in enumerate(sizes):
        row = up[r0:r0 + s]
        for c in range(n):
            if c != j and bool(row[:, c * k:(c + 1) * k].any()):
                return False
        r0 += s
    return True


def split_rows(m: AdapterModule, sizes: Sequence[int], *, drop_zero: bool = True
               ) -> tuple[list[AdapterModule | None], str]:
    """Split a fused module into ``len(sizes)`` row blocks. Parts whose ΔW is exactly zero are ``None`` when
    ``drop_zero``. Returns (parts, method): ``chunk``, ``copy-down``, ``loha-rows``, ``lokr-w1-rows``, ``full``.
    """
    if m.is_dora and m.magnitude_axis != "out":
        raise ValueError("column-wise (input-axis) DoRA norms span every row; the module cannot be split")
    total = sum(sizes)
    shape = m.layout.math_shape()
    d = m.delta
    out_rows = shape[0] if shape is not None else None
    if isinstance(d, LoRA):
        out_rows = d.up.shape[0]
    if out_rows is not None and out_rows != total:
        raise ValueError(f"module has {out_rows} output rows but the parts add up to {total}")
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    mags = [m.magnitude.reshape(-1)[o:o + s] for o, s in zip(offsets, sizes)] if m.is_dora else [None] * len(sizes)
    biases = [m.bias[o:o + s] for o, s in zip(offsets, sizes)] if m.bias is not None else [None] * len(sizes)

    def make(delta, j, inn) -> AdapterModule:
        return m.replace(delta=delta, layout=_linear_layout(sizes[j], inn), magnitude=mags[j], bias=biases[j])

    parts: list[AdapterModule | None] = []
    if isinstance(d, LoRA) and d.mid is None and d.down.dim() == 2:
        inn = d.down.shape[1]
        if _is_block_diagonal(d.up, sizes):
            k = d.rank // len(sizes)
            method = "chunk"
            for j, (o, s) in enumerate(zip(offsets, sizes)):
                parts.append(make(LoRA(down=d.down[j * k:(j + 1) * k].contiguous(),
                                       up=d.up[o:o + s, j * k:(j + 1) * k].contiguous()), j, inn))
        else:
            method = "copy-down"
            for j, (o, s) in enumerate(zip(offsets, sizes)):
                parts.append(make(LoRA(down=d.down.clone(), up=d.up[o:o + s].contiguous()), j, inn))
        zero = [not bool(p.delta.up.any()) for p in parts]
    elif isinstance(d, LoHa) and d.t1 is None:
        inn = d.w1b.shape[1]
        method = "loha-rows"
        for j, (o, s) in enumerate(zip(offsets, sizes)):
            parts.append(make(LoHa(w1a=d.w1a[o:o + s].contiguous(), w1b=d.w1b.clone(),
                                   w2a=d.w2a[o:o + s].contiguous(), w2b=d.w2b.clone()), j, inn))
        zero = [not bool(p.delta.w1a.any()) or not bool(p.delta.w2a.any()) for p in parts]
    elif isinstance(d, LoKr) and d.t2 is None and (d.w2 is None or d.w2.dim() == 2) \
            and all(s % _lokr_out_k(d) == 0 for s in sizes):
        ok = _lokr_out_k(d)
        inn = (d.w1.shape[1] if d.w1 is not None else d.w1b.shape[1]) * \
              (d.w2.shape[1] if d.w2 is not None else d.w2b.shape[1])
        method = "lokr-w1-rows"
        for j, (o, s) in enumerate(zip(offsets, sizes)):
            a, b = o // ok, (o + s) // ok
            if d.w1 is not None:
                nd = LoKr(w1=d.w1[a:b].contiguous(), w2=d.w2, w2a=d.w2a, w2b=d.w2b)
            else:
                nd = LoKr(w1a=d.w1a[a:b].contiguous(), w1b=d.w1b, w2=d.w2, w2a=d.w2a, w2b=d.w2b)
            parts.append(make(nd, j, inn))
        zero = [not bool((p.delta.w1 if p.delta.w1 is not None else p.delta.w1a).any()) for p in parts]
    else:
        full = m.delta.product(shape if not isinstance(d, LoRA) else None)
        full = full.reshape(full.shape[0], -1).to(m.dtype)
        inn = full.shape[1]
        method = "full"
        for j, (o, s) in enumerate(zip(offsets, sizes)):
            parts.append(make(FullDiff(full[o:o + s].contiguous()), j, inn))
        zero = [not bool(p.delta.diff.any()) for p in parts]
    if drop_zero:
        parts = [None if z and (p.bias is None or not bool(p.bias.any())) and p.magnitude is None else p
                 for p, z in zip(parts, zero)]
    return parts, method


def _lokr_out_k(d: LoKr) -> int:
    return int(d.w2.shape[0] if d.w2 is not None else d.w2a.shape[0])


def permute_rows(m: AdapterModule, perm: Tensor) -> tuple[AdapterModule, str]:
    """The module whose ΔW rows are ``ΔW[perm]`` (exact for LoRA / LoHa / full; LoKr becomes a full diff)."""
    d = m.delta
    mag = m.magnitude.reshape(-1)[perm] if m.magnitude is not None else None
    bias = m.bias[perm] if m.bias is not None else None
    if isinstance(d, LoRA) and d.mid is None:
        nd, how = LoRA(down=d.down, up=d.up[perm].contiguous()), "lora-up-rows"
    elif isinstance(d, LoHa) and d.t1 is None:
        nd, how = LoHa(w1a=d.w1a[perm].contiguous(), w1b=d.w1b, w2a=d.w2a[perm].contiguous(), w2b=d.w2b), "loha-rows"
    else:
        full = d.product(m.layout.math_shape() if not isinstance(d, LoRA) else None)
        full = full.reshape(full.shape[0], -1)
        nd, how = FullDiff(full[perm].contiguous().to(m.dtype)), "full"
    return m.replace(delta=nd, magnitude=mag, bias=bias), how


def swap_halves(m: AdapterModule) -> tuple[AdapterModule, str]:
    """Swap the two output halves (BFL (shift, scale) ↔ diffusers (scale, shift)). Its own inverse."""
    shape = m.layout.math_shape()
    rows = shape[0] if shape is not None else (m.delta.up.shape[0] if isinstance(m.delta, LoRA) else None)
    if rows is None:
        rows = m.delta_math().shape[0]
    if rows % 2:
        raise ValueError(f"cannot swap halves of {rows} rows")
    h = rows // 2
    perm = torch.cat([torch.arange(h, rows), torch.arange(0, h)])
    return permute_rows(m, perm)


__all__ = ["fuse_rows", "permute_rows", "split_rows", "swap_halves"]
