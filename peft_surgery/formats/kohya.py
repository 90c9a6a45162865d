"""kohya sd-scripts / LyCORIS single-file adapters (``lora_unet_…``, ``lora_te_…``, ``lycoris_…``).

One ``.safetensors`` file; every module is ``<prefix>_<module path with dots → _>.<param>``:

* LoRA / LoCon: ``lora_down.weight`` (r, in[, kh, kw]), ``lora_up.weight`` (out, r[, 1, 1]), optional Tucker
  ``lora_mid.weight`` (r, r, kh, kw) with a 1×1 down, ``alpha`` (0-dim). Scale = alpha / r; no alpha → 1.
* LoHa: ``hada_w1_a/b``, ``hada_w2_a/b`` (+ Tucker ``hada_t1/t2``). Scale = alpha / r.
* LoKr: ``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b`` (+ ``lokr_t2``). Scale = alpha / r when a
  factor is low rank; **1 when both factors are full** (LyCORIS forces alpha = dim there, alpha is ignored).
  Conv kernels may be folded into the factors: the product is (out, in·kh·kw).
* Full diff: ``diff`` (the whole ΔW) and ``diff_b`` (bias delta, not scaled).
* DoRA: ``dora_scale`` (out, 1[, 1, 1]) = per-output-row magnitude (PEFT's ``lora_magnitude_vector``), or legacy
  (1, in[, 1, 1]) = per-input-column magnitude (kept as such; PEFT cannot express it).

Flattened names are resolved *forward* against module tables (:mod:`.arch`): built-in SD1/SD2/SDXL tables
(diffusers and SGM spellings) or ``--base``. Canonical names are ``unet.<diffusers path>``,
``text_encoder.<transformers path>``, ``text_encoder_2.…``.

Format ``kohya`` writes LoRA with ``networks.lora`` metadata (LyCORIS types with ``lycoris.kohya``); format
``lycoris`` writes the same keys (LyCORIS' kohya integration uses kohya's naming) but always declares
``lycoris.kohya`` with the LyCORIS ``algo`` (plain LoRA becomes ``locon``).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..adapter import Adapter, AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA
from ..checkpoint import Checkpoint, save_tensors
from ..errors import FormatError, SurgeryError
from ..surgery.delta import rank_scale
from . import Detection, FormatSpec, register
from .arch import (ModuleInfo, ModuleTable, Tables, builtin_tables, flatten, infer_component, resolve_flat_names,
                   split_component, tables_from_base)

#: file prefix → diffusers component (longest prefixes first when matching)
PREFIXES: dict[str, str] = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_te_": "text_encoder",
    "lycoris_": "unet",
}
_PREFIX_ORDER = sorted(PREFIXES, key=len, reverse=True)

#: kohya/LyCORIS parameter suffix → (delta kind, canonical field)
SUFFIXES: dict[str, tuple[str, str]] = {
    "lora_down.weight": ("lora", "down"),
    "lora_up.weight": ("lora", "up"),
    "lora_mid.weight": ("lora", "mid"),
    "hada_w1_a": ("loha", "w1a"), "hada_w1_b": ("loha", "w1b"), "hada_w2_a": ("loha", "w2a"),
    "hada_w2_b": ("loha", "w2b"), "hada_t1": ("loha", "t1"), "hada_t2": ("loha", "t2"),
    "lokr_w1": ("lokr", "w1"), "lokr_w1_a": ("lokr", "w1a"), "lokr_w1_b": ("lokr", "w1b"),
    "lokr_w2": ("lokr", "w2"), "lokr_w2_a": ("lokr", "w2a"), "lokr_w2_b": ("lokr", "w2b"),
    "lokr_t2": ("lokr", "t2"),
    "diff": ("full", "diff"),
    "diff_b": ("", "bias"),
    "alpha": ("", "alpha"),
    "dora_scale": ("", "dora_scale"),
}
#: names that say "another helper's architecture" (Flux kohya/OneTrainer/ComfyUI files)
FOREIGN_MARKERS = ("double_blocks", "single_blocks", "single_transformer_blocks")
SD_ARCHES = ("sd1", "sd2", "sdxl")
NETWORK_MODULE_LORA = "networks.lora"
NETWORK_MODULE_LYCORIS = "lycoris.kohya"


# --------------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------------


def split_key(key: str) -> tuple[str, str, str] | None:
    """``lora_unet_down_blocks_0_x.lora_down.weight`` → (``lora_unet_``, ``down_blocks_0_x``, ``lora_down.weight``).

    None for keys that are not kohya/LyCORIS adapter keys (the module part must hold no dots).
    """
    flat, dot, suffix = key.partition(".")
    if not dot:
        return None
    for p in _PREFIX_ORDER:
        if flat.startswith(p) and len(flat) > len(p):
            return p, flat[len(p):], suffix
    return None


def group_tensors(keys: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group kohya keys by flat module name (with prefix): {flat: {suffix: key}}, plus keys that don't fit."""
    groups: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for k in keys:
        parts = split_key(k)
        if parts is None:
            other.append(k)
            continue
        prefix, rest, suffix = parts
        groups.setdefault(prefix + rest, {})[suffix] = k
    return groups, other


# --------------------------------------------------------------------------------------------------------
# One module: kohya tensors ↔ AdapterModule (public helpers, reused by the Flux formats)
# --------------------------------------------------------------------------------------------------------


def _kernel_layout(out: int, flat_in: int, info: ModuleInfo | None) -> Layout:
    """Layout for a LoHa/LoKr product of shape (out, flat_in): conv when the module table says so."""
    if info is not None and info.kind == "conv" and info.kernel:
        k = math.prod(info.kernel)
        if flat_in % k == 0:
            return Layout("conv", False, (out, flat_in // k, *info.kernel))
    if info is not None and info.shape is not None and info.kind == "linear" and tuple(info.shape) == (out, flat_in):
        return Layout("linear", False, (out, flat_in))
    return Layout("linear", False, (out, flat_in) if info is None or info.kind != "conv" else None)


def parse_kohya_module(tensors: Mapping[str, Tensor], *, name: str = "", info: ModuleInfo | None = None,
                       rs_lora: bool = False, path: object = None) -> AdapterModule:
    """kohya/LyCORIS tensors of one module (suffix → tensor) → canonical :class:`AdapterModule`.

    ``info`` (from the module table) tells whether a LoHa/LoKr product (out, in·kh·kw) is a conv and its kernel.
    ``rs_lora``: the file was written by LyCORIS with ``rs_lora`` (stored alpha = α·√r), so the hint is α.

    >>> m = parse_kohya_module({"lora_down.weight": torch.ones(2, 3), "lora_up.weight": torch.ones(4, 2),
    ...                         "alpha": torch.tensor(1.0)})
    >>> m.scale
    0.5
    """
    unknown = sorted(set(tensors) - set(SUFFIXES))
    if unknown:
        raise FormatError(f"unsupported adapter tensors {', '.join(unknown)} (supported: LoRA/LoCon, LoHa, LoKr, "
                          "full diff, dora_scale)", path=path, tensor=name)
    kinds = {SUFFIXES[s][0] for s in tensors} - {""}
    if len(kinds) > 1:
        raise FormatError(f"module mixes adapter types {sorted(kinds)}", path=path, tensor=name)
    t = {SUFFIXES[s][1]: v for s, v in tensors.items()}
    alpha_t = t.get("alpha")
    alpha = None if alpha_t is None else float(alpha_t.float().reshape(-1)[0])
    kind = kinds.pop() if kinds else ""
    if kind == "lora":
        if "down" not in t or "up" not in t:
            have, miss = ("lora_down", "lora_up") if "down" in t else ("lora_up", "lora_down")
            raise FormatError(f"incomplete LoRA: module has {have} without {miss}", path=path, tensor=name)
        down, up, mid = t["down"], t["up"], t.get("mid")
        rank = int(down.shape[0])
        if up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
            raise FormatError(f"lora_up {tuple(up.shape)} / lora_mid does not match lora_down {tuple(down.shape)}",
                              path=path, tensor=name)
        delta: Any = LoRA(down=down, up=up, mid=mid)
        out, cin = int(up.shape[0]), int(down.shape[1])
        if down.dim() > 2:
            kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
            layout = Layout("conv", False, (out, cin, *kernel))
        else:
            layout = Layout("linear", False, (out, cin))
    elif kind == "loha":
        need = ("w1a", "w1b", "w2a", "w2b")
        missing = [f"hada_{n[:2]}_{n[2]}" for n in need if n not in t]
        if missing:
            raise FormatError(f"incomplete LoHa: missing {', '.join(missing)}", path=path, tensor=name)
        delta = LoHa(t["w1a"], t["w1b"], t["w2a"], t["w2b"], t.get("t1"), t.get("t2"))
        rank = delta.rank
        if delta.t1 is not None:
            layout = Layout("conv", False, (int(delta.w1a.shape[1]), int(delta.w1b.shape[1]), *delta.t1.shape[2:]))
        else:
            layout = _kernel_layout(int(delta.w1a.shape[0]), int(delta.w1b.shape[1]), info)
    elif kind == "lokr":
        delta = LoKr(**{k: t.get(k) for k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")})
        if delta.w1 is None and (delta.w1a is None or delta.w1b is None):
            raise FormatError("incomplete LoKr: needs lokr_w1 or both lokr_w1_a and lokr_w1_b", path=path, tensor=name)
        if delta.w2 is None and (delta.w2a is None or delta.w2b is None):
            raise FormatError("incomplete LoKr: needs lokr_w2 or both lokr_w2_a and lokr_w2_b", path=path, tensor=name)
        rank = delta.rank
        f1 = delta.w1.shape if delta.w1 is not None else (delta.w1a.shape[0], delta.w1b.shape[1])
        if delta.w2 is not None:
            f2 = tuple(delta.w2.shape)
        elif delta.t2 is not None:
            f2 = (delta.w2a.shape[1], delta.w2b.shape[1], *delta.t2.shape[2:])
        else:
            f2 = (delta.w2a.shape[0], delta.w2b.shape[1])
        out, cin = int(f1[0]) * int(f2[0]), int(f1[1]) * int(f2[1])
        layout = Layout("conv", False, (out, cin, *f2[2:])) if len(f2) > 2 else _kernel_layout(out, cin, info)
    elif kind == "full":
        diff = t["diff"]
        delta = FullDiff(diff)
        rank = 0
        layout = Layout("conv", False, tuple(diff.shape)) if diff.dim() > 2 else Layout(
            "linear", False, tuple(diff.shape) if diff.dim() == 2 else None)
    else:
        have = ", ".join(sorted(tensors))
        raise FormatError(f"no adapter weights for this module (only {have})", path=path, tensor=name)

    # scale: alpha/r, missing alpha → 1; full LoKr and full diffs ignore alpha (scale 1)
    full_lokr = kind == "lokr" and rank == 0
    if kind == "full" or full_lokr or alpha is None:
        scale, hint, rs = 1.0, (None if (kind == "full" or full_lokr) else None), False
    elif rs_lora:
        scale, hint, rs = alpha / rank, alpha / math.sqrt(rank), True
    else:
        scale, hint, rs = rank_scale(alpha, rank), alpha, False

    magnitude, axis = None, "out"
    dora = t.get("dora_scale")
    if dora is not None:
        ws = layout.weight_shape
        out_dim = ws[0] if ws else None
        nonunit = [i for i, n in enumerate(dora.shape) if n != 1]
        if dora.dim() < 2 or len(nonunit) > 1 or (nonunit and nonunit[0] not in (0, 1)):
            raise FormatError(f"dora_scale has unsupported shape {tuple(dora.shape)}", path=path, tensor=name)
        axis = "in" if nonunit == [1] else "out"
        if axis == "out" and out_dim is not None and dora.shape[0] != out_dim:
            raise FormatError(f"dora_scale {tuple(dora.shape)} does not match {out_dim} output rows", path=path,
                              tensor=name)
        magnitude = dora.reshape(-1)
    return AdapterModule(delta=delta, scale=scale, layout=layout, magnitude=magnitude, bias=t.get("bias"),
                         alpha=hint, rslora=rs, bias_scaled=False, magnitude_axis=axis)


def lokr_factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's LoKr ``factorization``: ``(factor, dim/factor)`` when factor > 0 divides dim (not sorted), otherwise
    the pair m ≤ n, m·n = dim with the smallest m + n (m ≤ factor when factor > 0)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def peft_lokr_factors(m: AdapterModule) -> set[int]:
    """Every PEFT ``decompose_factor`` for which PEFT's LoKr layer creates exactly this module's factor shapes
    (empty when none does). Factors above max(out_l, in_m) behave like -1, so checking 1..max and -1 is complete."""
    d = m.delta
    if not isinstance(d, LoKr):
        return {-1}
    out_l, in_m = d.w1.shape if d.w1 is not None else (d.w1a.shape[0], d.w1b.shape[1])
    if d.w2 is not None:
        out_k, in_n = d.w2.shape[0], d.w2.shape[1]
    elif d.t2 is not None:
        out_k, in_n = d.w2a.shape[1], d.w2b.shape[1]
    else:
        out_k, in_n = d.w2a.shape[0], d.w2b.shape[1]
        ws = m.layout.weight_shape
        if ws is not None and len(ws) > 2:  # PEFT folds the kernel into w2_b only: in_n·k = w2_b columns
            k = math.prod(ws[2:])
            if in_n % k:
                return set()
            in_n //= k
    return {f for f in [*range(1, int(max(out_l, in_m)) + 1), -1]
            if lokr_factorization(int(out_l * out_k), f) == (out_l, out_k)
            and lokr_factorization(int(in_m * in_n), f) == (in_m, in_n)}


def _alpha_value(m: AdapterModule) -> float:
    """The ``alpha`` tensor a kohya reader divides by r to get ``m.scale``."""
    r = m.rank
    if m.alpha is not None and not m.rslora and rank_scale(m.alpha, r) == m.scale:
        return float(m.alpha)
    a = m.scale * r
    return float(round(a)) if math.isclose(a, round(a), rel_tol=1e-12, abs_tol=0.0) else a


def _alpha_tensor(value: float, like: Tensor) -> Tensor:
    dt = like.dtype if like.is_floating_point() else torch.float32
    t = torch.tensor(value, dtype=dt)
    return t if float(t) == value else torch.tensor(value, dtype=torch.float32)


def kohya_module_tensors(m: AdapterModule, *, name: str = "") -> tuple[dict[str, Tensor], list[str]]:
    """Canonical module → kohya/LyCORIS tensors (suffix → tensor) plus notes on anything folded.

    Scales that kohya cannot carry (full LoKr, full diff) are folded into the weights; PEFT's scaled
    ``lora_B.bias`` becomes an unscaled ``diff_b``.
    """
    notes: list[str] = []
    out: dict[str, Tensor] = {}
    d = m.delta
    if m.layout.kind == "embedding":
        raise SurgeryError("kohya/LyCORIS files cannot hold embedding LoRA", tensor=name)
    if isinstance(d, LoRA):
        up = d.up
        if d.down.dim() > 2 and up.dim() == 2:
            up = up.reshape(*up.shape, *([1] * (d.down.dim() - 2)))
        out["lora_down.weight"] = d.down
        out["lora_up.weight"] = up
        if d.mid is not None:
            out["lora_mid.weight"] = d.mid
        out["alpha"] = _alpha_tensor(_alpha_value(m), d.down)
    elif isinstance(d, LoHa):
        for f, s in (("w1a", "hada_w1_a"), ("w1b", "hada_w1_b"), ("w2a", "hada_w2_a"), ("w2b", "hada_w2_b"),
                     ("t1", "hada_t1"), ("t2", "hada_t2")):
            if getattr(d, f) is not None:
                out[s] = getattr(d, f)
        out["alpha"] = _alpha_tensor(_alpha_value(m), d.w1a)
    elif isinstance(d, LoKr):
        fields = {f: getattr(d, f) for f in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")}
        if d.rank == 0:
            # LyCORIS ignores alpha for full LoKr (scale 1): fold any other scale into w2
            if m.scale != 1.0:
                fields["w2"] = (d.w2.double() * m.scale).to(d.w2.dtype)
                notes.append(f"{name}: full-matrix LoKr has scale 1 in LyCORIS; folded scale {m.scale:g} into lokr_w2")
            alpha = 1.0
        else:
            alpha = _alpha_value(m)
        for f, s in (("w1", "lokr_w1"), ("w1a", "lokr_w1_a"), ("w1b", "lokr_w1_b"), ("w2", "lokr_w2"),
                     ("w2a", "lokr_w2_a"), ("w2b", "lokr_w2_b"), ("t2", "lokr_t2")):
            if fields[f] is not None:
                out[s] = fields[f]
        out["alpha"] = _alpha_tensor(alpha, next(v for v in fields.values() if v is not None))
    elif isinstance(d, FullDiff):
        diff = d.diff
        if m.scale != 1.0:
            diff = (diff.double() * m.scale).to(diff.dtype)
            notes.append(f"{name}: full diff has no scale in LyCORIS; folded scale {m.scale:g} into diff")
        out["diff"] = diff
    else:  # pragma: no cover - exhaustive
        raise SurgeryError(f"unknown delta type {type(d).__name__}", tensor=name)
    if m.bias is not None:
        b = m.bias
        if m.bias_scaled and m.scale != 1.0:
            b = (b.double() * m.scale).to(b.dtype)
            notes.append(f"{name}: bias delta is unscaled in LyCORIS (diff_b); folded scale {m.scale:g} into it")
        out["diff_b"] = b
    if m.magnitude is not None:
        ndim = len(m.layout.weight_shape) if m.layout.weight_shape else (4 if m.layout.kind == "conv" else 2)
        n = m.magnitude.numel()
        shape = (n, *([1] * (ndim - 1))) if m.magnitude_axis == "out" else (1, n, *([1] * (ndim - 2)))
        out["dora_scale"] = m.magnitude.reshape(shape)
    return out, notes


# --------------------------------------------------------------------------------------------------------
# Name resolution
# --------------------------------------------------------------------------------------------------------


def _network_args(metadata: Mapping[str, str]) -> dict[str, Any]:
    try:
        args = json.loads(metadata.get("ss_network_args", "") or "{}")
        return args if isinstance(args, dict) else {}
    except json.JSONDecodeError:
        return {}


def arch_hint(metadata: Mapping[str, str]) -> str | None:
    """sd1/sd2/sdxl from ``ss_base_model_version`` / ``modelspec.architecture`` / ``ss_v2``, if present."""
    v = str(metadata.get("ss_base_model_version", "")) + " " + str(metadata.get("modelspec.architecture", ""))
    if "sdxl" in v or "stable-diffusion-xl" in v:
        return "sdxl"
    if "sd_v2" in v or "stable-diffusion-v2" in v or str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    if "sd_v1" in v or "stable-diffusion-v1" in v:
        return "sd1"
    return None


def _resolve_component(flat: list[str], table: ModuleTable | None) -> tuple[dict[str, str], list[str]]:
    if table is None:
        return {}, list(flat)
    res = resolve_flat_names(flat, table.candidates())
    return res.mapping, res.unresolved


def resolve_names(flat_by_prefix: Mapping[str, list[str]], tables: Tables) -> tuple[dict[str, str], list[str]]:
    """{prefix: [flat names]} → ({prefixed flat: canonical name}, [unresolved prefixed flats])."""
    mapping: dict[str, str] = {}
    unresolved: list[str] = []
    for prefix, flats in flat_by_prefix.items():
        comp = PREFIXES[prefix]
        table = tables.get(comp)
        if prefix == "lycoris_" and table is None:
            table = tables.get("transformer")
            comp = "transformer"
        m, u = _resolve_component(flats, table)
        mapping.update({prefix + f: f"{comp}.{n}" for f, n in m.items()})
        unresolved += [prefix + f for f in u]
    return mapping, unresolved


def choose_tables(flat_by_prefix: Mapping[str, list[str]], *, base: str | None = None, arch: str | None = None,
                  metadata: Mapping[str, str] | None = None) -> tuple[Tables, str]:
    """The module tables to resolve against: ``--base``, ``--arch``, or the built-in SD arch that resolves the
    most names (ties broken by the file's metadata, then sd1 < sd2 < sdxl)."""
    if base is not None:
        return tables_from_base(base), f"--base {base}"
    if arch and arch != "auto":
        return builtin_tables(arch), f"built-in {arch} tables"
    hint = arch_hint(metadata or {})
    best = None
    for i, a in enumerate(SD_ARCHES):
        tables = builtin_tables(a)
        _, unresolved = resolve_names(flat_by_prefix, tables)
        key = (len(unresolved), 0 if a == hint else 1, i)
        if best is None or key < best[0]:
            best = (key, a, tables)
    assert best is not None
    return best[2], f"built-in {best[1]} tables"


def _info(tables: Tables, canonical: str) -> ModuleInfo | None:
    comp, rest = split_component(canonical)
    t = tables.get(comp or "")
    return t.modules.get(rest) if t is not None else None


# --------------------------------------------------------------------------------------------------------
# Detection and reading
# --------------------------------------------------------------------------------------------------------


def detect(ckpt: Checkpoint) -> Detection | None:
    keys = list(ckpt.keys())
    groups, other = group_tensors(keys)
    if not groups:
        return None
    if any(m in flat for flat in groups for m in FOREIGN_MARKERS):
        return None  # Flux kohya / OneTrainer files: the Flux format reads them
    known = [s for g in groups.values() for s in g if s in SUFFIXES]
    if not known:
        return None
    prefixes = Counter(next(p for p in _PREFIX_ORDER if flat.startswith(p)) for flat in groups)
    algos = Counter()
    for g in groups.values():
        ks = {SUFFIXES[s][0] for s in g if s in SUFFIXES} - {""}
        algos[(ks.pop() if len(ks) == 1 else "mixed") if ks else "none"] += 1
        if "dora_scale" in g:
            algos["dora"] += 1
    evidence = [f"{len(groups)} modules named " + ", ".join(f"{p}… ×{n}" for p, n in prefixes.most_common()),
                "types: " + ", ".join(f"{k} ×{n}" for k, n in algos.most_common())]
    score = 2.0 if not other else 1.0
    if other:
        evidence.append(f"{len(other)} keys that are not kohya/LyCORIS keys, e.g. {other[0]}")
    meta = ckpt.metadata or {}
    if "ss_network_module" in meta:
        evidence.append(f"metadata ss_network_module={meta['ss_network_module']}")
        score += 0.5
    if "modelspec.architecture" in meta:
        evidence.append(f"metadata modelspec.architecture={meta['modelspec.architecture']}")
    return Detection("kohya", score, evidence)


def read(ckpt: Checkpoint, *, base: str | None = None, arch: str | None = None, skip_unresolved: bool = False,
         **_: Any) -> Adapter:
    """Read a kohya/LyCORIS file into a canonical Adapter with ``<component>.<diffusers path>`` names."""
    groups, other = group_tensors(ckpt.keys())
    if other:
        raise FormatError(f"{len(other)} tensors are not kohya/LyCORIS adapter keys: "
                          f"{', '.join(sorted(other)[:5])}{' …' if len(other) > 5 else ''}", path=ckpt.source)
    if not groups:
        raise FormatError("no kohya/LyCORIS adapter tensors", path=ckpt.source)
    meta = dict(ckpt.metadata or {})
    args = _network_args(meta)
    rs_lora = str(args.get("rs_lora", "false")).lower() in ("true", "1")
    flat_by_prefix: dict[str, list[str]] = {}
    for flat in groups:
        p = next(p for p in _PREFIX_ORDER if flat.startswith(p))
        flat_by_prefix.setdefault(p, []).append(flat[len(p):])
    tables, source = choose_tables(flat_by_prefix, base=base, arch=arch, metadata=meta)
    mapping, unresolved = resolve_names(flat_by_prefix, tables)
    notes: list[str] = [f"module names resolved against {source}"]
    if unresolved:
        listed = ", ".join(sorted(unresolved)[:8]) + (f" … ({len(unresolved)} in all)" if len(unresolved) > 8 else "")
        if not skip_unresolved:
            raise FormatError(f"cannot resolve {len(unresolved)} module names against {source}: {listed} "
                              "(pass --base with the target model, or --skip-unresolved to drop them)",
                              path=ckpt.source)
        notes.append(f"dropped {len(unresolved)} unresolved modules (--skip-unresolved): {listed}")
    modules: dict[str, AdapterModule] = {}
    for flat, canonical in mapping.items():
        if canonical in modules:
            raise FormatError(f"two file modules resolve to {canonical} (one of them is {flat})", path=ckpt.source)
        tensors = {s: ckpt.get_tensor(k) for s, k in groups[flat].items()}
        modules[canonical] = parse_kohya_module(tensors, name=flat, info=_info(tables, canonical), rs_lora=rs_lora,
                                                path=ckpt.source)
    if not modules:
        raise FormatError("no module could be resolved", path=ckpt.source)
    lokr = {n: peft_lokr_factors(m) for n, m in modules.items() if m.kind == "lokr"}
    if lokr:
        common = set.intersection(*lokr.values())
        odd = [n for n, f in lokr.items() if not f]
        if odd:
            notes.append(f"{len(odd)} of {len(lokr)} LoKr modules have Kronecker factor shapes that PEFT's LoKr "
                         "layer cannot create with any decompose_factor (e.g. {odd[0]}): a PEFT LoKr written from "
                         "this file is exact and reads back in peft-surgery, but PEFT's own loader rejects those "
                         "modules' shapes".replace("{odd[0]}", odd[0]))
        elif not common:
            notes.append("the LoKr modules need different PEFT decompose_factor values; PEFT has a single one, so "
                         "PEFT's own loader rejects some modules' shapes (peft-surgery reads them exactly)")
    config: dict[str, Any] = {"_notes": notes}
    return Adapter(modules=modules, base_model=meta.get("ss_sd_model_name"), config=config, metadata=meta,
                   source_format="kohya")


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _canonical_names(adapter: Adapter, tables_hint: Tables | None) -> dict[str, str]:
    """module key in the adapter → component-prefixed canonical name (un-prefixed PEFT names get their
    component from the architecture tables)."""
    names = list(adapter.modules)
    out: dict[str, str] = {}
    unprefixed = [n for n in names if split_component(n)[0] is None]
    comp = None
    if unprefixed:
        if tables_hint and len(tables_hint) == 1:
            comp = next(iter(tables_hint))
        else:
            comp = infer_component(unprefixed)
    for n in names:
        out[n] = n if split_component(n)[0] is not None else f"{comp}.{n}"
    return out


def writer_arch(canonical: Iterable[str], *, arch: str | None, metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """Which SD arch the adapter is for (decides SGM naming and metadata): --arch, then names, then metadata."""
    if arch and arch != "auto":
        return arch, "--arch"
    names = list(canonical)
    fits = []
    for a in SD_ARCHES:
        tables = builtin_tables(a)
        if all(split_component(n)[0] in tables and split_component(n)[1] in tables[split_component(n)[0]].modules
               for n in names):
            fits.append(a)
    hint = arch_hint(metadata)
    if hint in fits:
        return hint, "source metadata"
    if len(fits) == 1:
        return fits[0], "module names"
    if "sd1" in fits and "sd2" in fits and "sdxl" not in fits:
        return "sd1", "module names (SD1/SD2 share UNet names)"
    return None, "module names fit several SD versions"


def state_dict(adapter: Adapter, *, arch: str | None = None, base: str | None = None, naming: str = "auto",
               lycoris: bool = False) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """The kohya tensors, the metadata and notes for ``adapter``."""
    if adapter.modules_to_save:
        raise SurgeryError("kohya/LyCORIS files cannot hold full replacement tensors (modules_to_save: "
                           f"{', '.join(sorted(adapter.modules_to_save)[:3])})")
    base_tables = tables_from_base(base) if base is not None else None
    names = _canonical_names(adapter, base_tables)
    notes: list[str] = []
    if any(split_component(n)[0] is None for n in adapter.modules):
        comp = split_component(next(iter(names.values())))[0]
        notes.append(f"un-prefixed module names (a PEFT adapter on one component) were written as {comp} modules")
    arch_used, why = writer_arch(names.values(), arch=arch, metadata=adapter.metadata)
    comps = {split_component(n)[0] for n in names.values()}
    if naming == "auto":
        naming = "sgm" if arch_used == "sdxl" else "diffusers"
    if arch_used is None and "unet" in comps:
        notes.append("could not tell SD1/SD2 from SDXL from the module names; wrote diffusers-style UNet names "
                     "(kohya, ComfyUI and diffusers accept them; pass --arch sdxl for SGM names)")
    sgm_names: dict[str, str] = {}
    if naming == "sgm" and "unet" in comps:
        unet_table = (base_tables or {}).get("unet") or builtin_tables(arch_used or "sdxl")["unet"]
        sgm_names = unet_table.reverse_aliases()
    sdxl_te = arch_used == "sdxl" or "text_encoder_2" in comps
    te_prefix = {"text_encoder": "lora_te1_" if sdxl_te else "lora_te_", "text_encoder_2": "lora_te2_",
                 "text_encoder_3": "lora_te3_", "unet": "lora_unet_"}
    tensors: dict[str, Tensor] = {}
    for key, m in adapter.modules.items():
        comp, rest = split_component(names[key])
        if comp not in te_prefix:
            raise SurgeryError(f"kohya naming has no prefix for component '{comp}'", tensor=key)
        if comp == "unet" and naming == "sgm":
            if rest not in sgm_names:
                raise SurgeryError(f"no SGM name for UNet module {rest} (write with naming='diffusers')", tensor=key)
            rest = sgm_names[rest]
        flat = te_prefix[comp] + flatten(rest)
        mod_tensors, mod_notes = kohya_module_tensors(m, name=key)
        notes += mod_notes
        for suffix, t in mod_tensors.items():
            tensors[f"{flat}.{suffix}"] = t
    metadata = kohya_metadata(adapter, arch_used, lycoris=lycoris)
    return tensors, metadata, notes


def kohya_metadata(adapter: Adapter, arch: str | None, *, lycoris: bool = False) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` metadata describing the written network (source ``ss_*`` keys kept)."""
    from .arch.sd import ARCH_INFO

    mods = list(adapter.modules.values())
    kinds = Counter(m.kind for m in mods)
    algo = kinds.most_common(1)[0][0] if kinds else "lora"
    uses_lycoris = lycoris or algo != "lora" or any(m.is_dora for m in mods) or any(
        isinstance(m.delta, LoRA) and m.delta.mid is not None for m in mods)
    ranks = Counter(m.rank for m in mods if m.layout.kind != "conv" and m.rank)
    conv_ranks = Counter(m.rank for m in mods if m.layout.kind == "conv" and m.rank)
    dim = ranks.most_common(1)[0][0] if ranks else (conv_ranks.most_common(1)[0][0] if conv_ranks else 1)
    alphas = Counter(_alpha_value(m) for m in mods if m.layout.kind != "conv" and m.rank)
    alpha = alphas.most_common(1)[0][0] if alphas else float(dim)
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith("ss_") and not k.startswith("sshs_")}
    args: dict[str, Any] = {}
    if uses_lycoris:
        args["algo"] = {"lora": "locon", "loha": "loha", "lokr": "lokr", "full": "full"}[algo]
    if conv_ranks:
        conv_alphas = Counter(_alpha_value(m) for m in mods if m.layout.kind == "conv" and m.rank)
        args["conv_dim"] = str(conv_ranks.most_common(1)[0][0])
        args["conv_alpha"] = str(conv_alphas.most_common(1)[0][0])
    if any(getattr(m.delta, "mid", None) is not None or getattr(m.delta, "t1", None) is not None
           or getattr(m.delta, "t2", None) is not None for m in mods):
        args["use_tucker"] = "True"
    if mods and all(m.rslora for m in mods):
        args["rs_lora"] = "True"  # LyCORIS convention: the stored alpha is α·√r, so alpha/r readers stay exact
    if any(m.is_dora for m in mods):
        args["dora_wd"] = "True"
        if all(m.magnitude_axis == "out" for m in mods if m.is_dora):
            args["wd_on_output"] = "True"
    meta.update({
        "ss_network_module": NETWORK_MODULE_LYCORIS if uses_lycoris else NETWORK_MODULE_LORA,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
    })
    if args:
        meta["ss_network_args"] = json.dumps(args)
    else:
        meta.pop("ss_network_args", None)
    info = ARCH_INFO.get(arch or "", {})
    if info:
        meta["ss_base_model_version"] = info["ss_base_model_version"]
        meta["ss_v2"] = str(arch == "sd2")
        meta["modelspec.architecture"] = info["modelspec.architecture"]
        meta["modelspec.implementation"] = info["modelspec.implementation"]
        meta["modelspec.resolution"] = adapter.metadata.get("modelspec.resolution", info["resolution"])
    meta["modelspec.sai_model_spec"] = "1.0.1"
    meta["modelspec.title"] = adapter.metadata.get("modelspec.title") or adapter.metadata.get(
        "ss_output_name") or "peft-surgery conversion"
    meta["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    meta["modelspec.implementation_version"] = "peft-surgery"
    return meta


def kohya_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sd-scripts' ``sshs_model_hash`` / ``sshs_legacy_hash`` and ModelSpec's ``modelspec.hash_sha256``.

    As sd-scripts computes them: serialise the tensors with only the ``ss_*`` metadata; the model hash is the
    SHA-256 of the bytes after the header (the tensor data), the legacy hash the first 8 hex digits of the
    SHA-256 of the 64 KiB at offset 1 MiB (sd-webui-additional-networks' "addnet" hash).
    """
    import hashlib

    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={k: v for k, v in metadata.items() if k.startswith("ss_") and not k.startswith("sshs_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, "modelspec.hash_sha256": "0x" + model_hash}


def write(adapter: Adapter, path: Path, *, arch: str | None = None, base: str | None = None, naming: str = "auto",
          lycoris: bool = False, **_: Any) -> list[str]:
    """Write one kohya ``.safetensors`` file (hashes recomputed for the new tensors)."""
    tensors, metadata, notes = state_dict(adapter, arch=arch, base=base, naming=naming, lycoris=lycoris)
    metadata = {**metadata, **kohya_hashes(tensors, metadata)}
    save_tensors(tensors, path, metadata)
    return notes


def write_lycoris(adapter: Adapter, path: Path, **kwargs: Any) -> list[str]:
    """``--to lycoris``: kohya naming (what LyCORIS' kohya integration writes), declared as ``lycoris.kohya``."""
    kwargs["lycoris"] = True
    return write(adapter, path, **kwargs)


register(FormatSpec("kohya", detect, read, write, output_is_dir=False,
                    description="kohya sd-scripts / LyCORIS single file (lora_unet_…, lora_te_…)",
                    default_filename="lora.safetensors"))
register(FormatSpec("lycoris", lambda ckpt: None, read, write_lycoris, output_is_dir=False,
                    description="LyCORIS (LoCon/LoHa/LoKr/full) in kohya naming; read through 'kohya'",
                    default_filename="lycoris.safetensors"))

from . import incomplete as _incomplete  # noqa: E402,F401  (registers the incomplete-LoRA detector)

__all__ = [
    "PREFIXES",
    "SUFFIXES",
    "arch_hint",
    "choose_tables",
    "detect",
    "group_tensors",
    "kohya_metadata",
    "kohya_module_tensors",
    "parse_kohya_module",
    "read",
    "resolve_names",
    "split_key",
    "state_dict",
    "write",
]
