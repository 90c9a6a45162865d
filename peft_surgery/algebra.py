"""Adapter algebra on files: merge / unmerge into checkpoints, combine, rescale and resize adapters.

Every entry point accepts paths (any adapter format :func:`peft_surgery.formats.load_adapter` reads, Hub ids)
or in-memory :class:`Adapter` objects, writes atomically, and returns a :class:`Report` subclass.

>>> merge("base-model/", ["adapter-a/", "adapter-b/"], "merged/", weights=[1.0, 0.5])   # doctest: +SKIP
>>> combine(["a/", "b/"], "ab/", method="svd", rank=16)                                   # doctest: +SKIP
>>> resize("adapter/", "adapter-r8/", rank=8)                                              # doctest: +SKIP

Merging streams the base one tensor at a time (memory ≈ one output shard) and reproduces the base's own file
layout: shard names and membership, index, dtypes, safetensors metadata and side files (config, tokenizer,
scheduler, ...). The arithmetic is in float32, cast once to each tensor's stored dtype.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .adapter import Adapter, AdapterModule, check_finite, frobenius
from .checkpoint import (DIFFUSERS_COMPONENTS, INDEX_NAMES, Checkpoint, ShardedWriter, atomic_output,
                         copy_side_files, read_safetensors_header, resolve_location)
from .errors import ShapeMismatchError, SurgeryError
from .formats import load_adapter, save_adapter
from .report import Report
from .surgery import combine as _combine
from .surgery import merge as _merge
from .surgery import rescale as _rescale
from .surgery import resize as _resize
from .surgery.delta import alpha_for_scale

AdapterLike = Any  # str | os.PathLike | Adapter


# ----------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------


@dataclass
class MergeReport(Report):
    base: str | None = None
    adapters: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    output: str | None = None
    files: list[str] = field(default_factory=list)


@dataclass
class CombineReport(Report):
    method: str = ""
    adapters: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    output: str | None = None


@dataclass
class RescaleReport(Report):
    operation: str = ""
    output: str | None = None


@dataclass
class ResizeReport(Report):
    output: str | None = None


# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------


def _load(a: AdapterLike, allow_pickle: bool = False) -> tuple[Adapter, str]:
    if isinstance(a, Adapter):
        return a, "<adapter>"
    return load_adapter(a, allow_pickle=allow_pickle), str(a)


# Formats whose module names may need the base model to be resolved (kohya's flattened names, Flux layouts).
BASE_AWARE_FORMATS = ("kohya", "flux", "diffusers")


def _load_for_base(a: AdapterLike, base: str | os.PathLike, allow_pickle: bool) -> tuple[Adapter, str]:
    """Load an adapter for merging into ``base``: name-resolving formats get ``base=`` to resolve names."""
    if isinstance(a, Adapter):
        return a, "<adapter>"
    from .formats import detect_format

    ckpt = Checkpoint.open(a, allow_pickle=allow_pickle)
    fmt = detect_format(ckpt).format
    if fmt in BASE_AWARE_FORMATS:
        try:
            return load_adapter(ckpt, format=fmt, base=str(base)), str(a)
        except SurgeryError:
            pass  # the base's tables could not help; fall back to the format's own name resolution
    return load_adapter(ckpt, format=fmt), str(a)


def _load_all(adapters: Sequence[AdapterLike] | AdapterLike, allow_pickle: bool,
              base: str | os.PathLike | None = None) -> tuple[list[Adapter], list[str]]:
    if isinstance(adapters, (str, os.PathLike, Adapter)):
        adapters = [adapters]
    loaded = [_load(a, allow_pickle) if base is None else _load_for_base(a, base, allow_pickle) for a in adapters]
    if not loaded:
        raise SurgeryError("no adapter given")
    return [a for a, _ in loaded], [s for _, s in loaded]


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise SurgeryError(f"--weights has {len(w)} value(s) but {n} adapter(s) were given; "
                           "give one weight per adapter")
    for x in w:
        if not math.isfinite(x):
            raise SurgeryError(f"--weights must be finite numbers, got {x}")
    return w


def check_adapter_finite(adapter: Adapter, source: object) -> None:
    """NonFiniteError naming the adapter file and module for any NaN/Inf tensor."""
    for name, m in adapter.modules.items():
        for tname, t in m.tensors():
            check_finite(t, path=source, tensor=f"{name}.{tname}")
    for key, t in adapter.modules_to_save.items():
        check_finite(t, path=source, tensor=key)


def _inputs(*groups: Iterable[AdapterLike]) -> list[str]:
    out: list[str] = []
    for g in groups:
        for x in g:
            if not isinstance(x, Adapter):
                out.append(str(x))
    return out


def _save(adapter: Adapter, output: str | os.PathLike, *, format: str, overwrite: bool, inputs: list[str],
          write_options: dict[str, Any] | None = None) -> list[str]:
    return save_adapter(adapter, output, format=format, overwrite=overwrite, inputs=inputs, **(write_options or {}))


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="module", leave=False)


# ----------------------------------------------------------------------------------------------------------
# Name resolution: adapter module path -> base tensor key
# ----------------------------------------------------------------------------------------------------------


def resolve_base_key(name: str, suffix: str, keys: Any) -> str | None:
    """The base tensor for ``<name>.<suffix>``: as is; else without a known component prefix (``unet.``…,
    for a bare component checkpoint); else with the one component prefix that matches (pipeline folders)."""
    cand = f"{name}.{suffix}" if suffix else name
    if cand in keys:
        return cand
    head, _, rest = cand.partition(".")
    if head in DIFFUSERS_COMPONENTS and rest and rest in keys:
        return rest
    hits = [f"{c}.{cand}" for c in DIFFUSERS_COMPONENTS if f"{c}.{cand}" in keys]
    return hits[0] if len(hits) == 1 else None


@dataclass
class _Step:
    adapter: int
    name: str
    module: AdapterModule
    weight: float


@dataclass
class _Plan:
    weights: dict[str, list[_Step]] = field(default_factory=dict)
    biases: dict[str, list[_Step]] = field(default_factory=dict)
    replace: dict[str, tuple[int, str, Tensor]] = field(default_factory=dict)


def plan_merge(ckpt: Checkpoint, adapters: Sequence[Adapter], weights: Sequence[float], sources: Sequence[str],
               *, with_modules_to_save: bool = True) -> _Plan:
    """Match every adapter module to a base tensor and check shapes before anything is written."""
    plan = _Plan()
    keys = ckpt.keys()
    for i, (ad, w, src) in enumerate(zip(adapters, weights, sources)):
        unmatched = []
        for name, m in ad.modules.items():
            key = resolve_base_key(name, "weight", keys)
            if key is None:
                unmatched.append(name)
                continue
            _check_shape(m, ckpt.shape(key), name, src)
            plan.weights.setdefault(key, []).append(_Step(i, name, m, w))
            if m.bias is not None:
                bkey = resolve_base_key(name, "bias", keys)
                if bkey is None:
                    raise SurgeryError("the adapter carries a bias delta but the base module has no bias", path=src,
                                       tensor=name)
                plan.biases.setdefault(bkey, []).append(_Step(i, name, m, w))
        if unmatched:
            more = f" (and {len(unmatched) - 3} more)" if len(unmatched) > 3 else ""
            raise SurgeryError(
                f"{len(unmatched)} adapter module(s) have no matching weight in the base {ckpt.source}: "
                f"{', '.join(unmatched[:3])}{more} (adapter made for another base?)", path=src)
        if not with_modules_to_save:
            continue
        for key, t in ad.modules_to_save.items():
            # PEFT saves a targeted embedding's full base weight as `<module>.base_layer.weight` (for resized
            # vocabularies); like modules_to_save, it replaces the base tensor (before ΔW is added).
            bkey = resolve_base_key(key.replace(".base_layer.", "."), "", keys)
            if bkey is None:
                raise SurgeryError(f"modules_to_save tensor has no matching tensor in the base {ckpt.source}",
                                   path=src, tensor=key)
            if tuple(ckpt.shape(bkey)) != tuple(t.shape):
                raise ShapeMismatchError(f"modules_to_save tensor has shape {tuple(t.shape)} but the base tensor "
                                         f"'{bkey}' is {tuple(ckpt.shape(bkey))}", path=src, tensor=key)
            if bkey in plan.replace:
                j, other, _ = plan.replace[bkey]
                raise SurgeryError(f"both adapter {j + 1} and adapter {i + 1} replace this tensor (modules_to_save)",
                                   path=src, tensor=bkey)
            plan.replace[bkey] = (i, key, t)
    return plan


def _check_shape(m: AdapterModule, base_shape: tuple[int, ...], name: str, src: str) -> None:
    """Cheap up-front check that the module's ΔW fits the base weight (out dim and element count)."""
    shape = _combine.math_shape(m)
    stored = (shape[1], shape[0], *shape[2:]) if m.layout.transposed and len(shape) >= 2 else shape
    if tuple(stored) == tuple(base_shape):
        return
    if math.prod(stored) == math.prod(base_shape) and stored[0] == base_shape[0] and not m.layout.transposed:
        return  # LoHa/LoKr conv product with the kernel folded: reshaped when merging
    raise ShapeMismatchError(f"adapter module has weight shape {tuple(stored)} but the base weight is "
                             f"{tuple(base_shape)} (adapter made for another base?)", path=src, tensor=name)


# ----------------------------------------------------------------------------------------------------------
# Streaming checkpoint rewrite with the base's layout
# ----------------------------------------------------------------------------------------------------------


def _layout_groups(ckpt: Checkpoint) -> dict[Path, list[Path]]:
    """Sub-folder (relative to the checkpoint root) → its weight files, in order."""
    groups: dict[Path, list[Path]] = {}
    for f in ckpt.files:
        try:
            rel = f.relative_to(ckpt.root)
        except ValueError:
            rel = Path(f.name)
        groups.setdefault(rel.parent, []).append(f)
    return groups


def _base_name(folder: Path, files: list[Path]) -> str:
    for name in INDEX_NAMES:
        if (folder / name).exists():
            return name[: -len(".safetensors.index.json")]
    if len(files) == 1:
        return files[0].name[: -len(".safetensors")] if files[0].name.endswith(".safetensors") else "model"
    return "model"


def rewrite_checkpoint(ckpt: Checkpoint, out: Path, transform, *, is_file: bool, progress: bool = False,
                       desc: str = "merge") -> list[str]:
    """Write ``transform(key, tensor)`` for every tensor of ``ckpt`` into ``out`` with ckpt's file layout.

    ``out`` is the temporary folder (or file, when ``is_file``) from :func:`atomic_output`. Returns the
    written file names relative to the output.
    """
    written: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for key in ckpt.keys():
        by_file.setdefault(ckpt.shard_of(key), []).append(key)
    groups = _layout_groups(ckpt)
    pipeline = any(str(sub) not in ("", ".") for sub in groups)
    work = out.parent / f"{out.name}.d" if is_file else out
    work.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ckpt), desc=desc, unit="tensor", leave=False, disable=not progress)
        for sub, files in groups.items():
            src_folder = ckpt.root / sub
            dst = work / sub
            dst.mkdir(parents=True, exist_ok=True)
            prefix = f"{sub.as_posix()}." if pipeline and str(sub) not in ("", ".") else ""
            if ckpt.is_pickle:
                plan_files = {k: "model.safetensors" for f in files for k in by_file[f]}
                base_name, meta = "model", {"format": "pt"}
            else:
                plan_files = {k[len(prefix):] if prefix and k.startswith(prefix) else k: f.name
                              for f in files for k in by_file[f]}
                base_name = _base_name(src_folder, files)
                meta = read_safetensors_header(files[0])[1]
            writer = ShardedWriter(dst, base_name=base_name, metadata=meta, plan=plan_files)
            for f in files:
                for key in by_file[f]:
                    t = transform(key, ckpt.get_tensor(key))
                    writer.add(key[len(prefix):] if prefix and key.startswith(prefix) else key, t)
                    bar.update(1)
            names = writer.close()
            written += [(Path(sub) / n).as_posix() for n in names]
            if (dst / f"{base_name}.safetensors.index.json").exists():
                written.append((Path(sub) / f"{base_name}.safetensors.index.json").as_posix())
            if not is_file:
                written += [(Path(sub) / n).as_posix() for n in copy_side_files(src_folder, dst)]
        if not is_file and pipeline:
            written += copy_side_files(ckpt.root, work)
            # components without exposed weights (scheduler, tokenizer, safety_checker, ...) are copied as is
            done = {str(s) for s in groups}
            for sub in sorted(ckpt.root.iterdir()):
                if sub.is_dir() and not sub.name.startswith(".") and sub.name not in done:
                    shutil.copytree(sub, work / sub.name)
                    written.append(sub.name + "/")
        bar.close()
        if is_file:
            produced = [p for p in work.iterdir() if p.suffix == ".safetensors"]
            if len(produced) != 1:
                raise SurgeryError("a single-file base produced several output files", path=ckpt.source)
            os.replace(produced[0], out)
            written = [out.name]
    finally:
        if is_file:
            shutil.rmtree(work, ignore_errors=True)
    return written


def _open_base(base: str | os.PathLike, allow_pickle: bool) -> tuple[Checkpoint, bool]:
    path = resolve_location(base, allow_pickle=allow_pickle)
    ckpt = Checkpoint.open(path, allow_pickle=allow_pickle)
    ckpt.source = str(base)
    return ckpt, path.is_file() and not ckpt.is_pickle


def _apply(ckpt: Checkpoint, adapters: list[Adapter], sources: list[str], weights: list[float], output,
           *, unmerge: bool, overwrite: bool, device: str, progress: bool, report: MergeReport,
           is_file: bool, ignore_modules_to_save: bool = False) -> None:
    plan = plan_merge(ckpt, adapters, weights, sources, with_modules_to_save=not unmerge)
    if unmerge:
        for i, (ad, src) in enumerate(zip(adapters, sources)):
            for name, m in ad.modules.items():
                _merge.check_unmergeable(m, name=name, path=src)  # refuse DoRA before writing anything
            if ad.modules_to_save and not ignore_modules_to_save:
                first = sorted(ad.modules_to_save)[0]
                raise SurgeryError(
                    f"the adapter replaces {len(ad.modules_to_save)} tensor(s) (modules_to_save, e.g. '{first}') "
                    "whose original values it does not store, so they cannot be unmerged; pass "
                    "--ignore-modules-to-save to leave them as they are", path=src)
        if ignore_modules_to_save and any(ad.modules_to_save for ad in adapters):
            report.notes.append("modules_to_save tensors were left as they are in the merged checkpoint "
                                "(their original values are not in the adapter)")
    rows = report.rows

    def transform(key: str, t: Tensor) -> Tensor:
        if key in plan.replace:
            i, mkey, new = plan.replace[key]
            new = new.to(t.dtype).contiguous()
            rows.append({"tensor": key, "adapters": f"{i + 1}:modules_to_save", "rel_change": _rel_change(t, new)})
            t = new
        steps = plan.weights.get(key) or plan.biases.get(key)
        if not steps:
            return t
        is_bias = key in plan.biases and key not in plan.weights
        work = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
        order = list(reversed(steps)) if unmerge else steps
        for st in order:
            if is_bias:
                work = _merge.merge_bias(work, st.module, strength=st.weight, sign=-1.0 if unmerge else 1.0,
                                         name=st.name, path=sources[st.adapter])
            elif unmerge:
                work = _merge.unmerge_weight(work, st.module, strength=st.weight, name=st.name,
                                             path=sources[st.adapter], device=device)
            else:
                work = _merge.merge_weight(work, st.module, strength=st.weight, name=st.name,
                                           path=sources[st.adapter], device=device)
        out = work.to(t.dtype)
        check_finite(out, path=ckpt.source, tensor=key)
        rows.append({"tensor": key, "adapters": " + ".join(
            f"{st.adapter + 1}:{st.module.kind}{'+dora' if st.module.is_dora else ''}×{st.weight:g}" for st in order),
            "rel_change": _rel_change(t, out)})
        return out

    with atomic_output(output, is_dir=not is_file, inputs=[ckpt.source, *sources], overwrite=overwrite) as tmp:
        report.files = rewrite_checkpoint(ckpt, tmp, transform, is_file=is_file, progress=progress,
                                          desc="unmerge" if unmerge else "merge")
    n_mod = sum(len(v) for v in plan.weights.values())
    dtypes: dict[str, int] = {}
    for k in ckpt.keys():
        dn = str(ckpt.dtype(k)).replace("torch.", "")
        dtypes[dn] = dtypes.get(dn, 0) + 1
    report.totals = {"tensors": len(ckpt), "modules " + ("unmerged" if unmerge else "merged"): n_mod,
                     "biases": sum(len(v) for v in plan.biases.values()), "replaced (modules_to_save)":
                     len(plan.replace), "files": len(report.files),
                     "dtypes": ", ".join(f"{k}×{v}" for k, v in sorted(dtypes.items()))}


def _rel_change(before: Tensor, after: Tensor) -> float:
    nb = frobenius(before)
    diff = frobenius(after.double() - before.double())
    return diff / nb if nb > 0 else diff


def merge(base: str | os.PathLike, adapters: Sequence[AdapterLike] | AdapterLike, output: str | os.PathLike, *,
          weights: Sequence[float] | None = None, overwrite: bool = False, allow_pickle: bool = False,
          device: str = "cpu", progress: bool = False) -> MergeReport:
    """Merge ``adapters`` (in order, each with its weight) into ``base``; write a checkpoint laid out like base.

    A single-file base gives a single file; a folder gives a folder with the same shards, index and side
    files; a diffusers pipeline folder gives a pipeline folder. LoRA/LoHa/LoKr are additive; DoRA rescales
    rows of the weight as merged so far (PEFT's sequential merge).
    """
    ads, sources = _load_all(adapters, allow_pickle, base=base)
    w = _weights(weights, len(ads))
    for ad, src in zip(ads, sources):
        check_adapter_finite(ad, src)
    ckpt, is_file = _open_base(base, allow_pickle)
    report = MergeReport(title=f"merge {len(ads)} adapter(s) into {base}", base=str(base), adapters=sources,
                         weights=w, output=str(output))
    _apply(ckpt, ads, sources, w, output, unmerge=False, overwrite=overwrite, device=device, progress=progress,
           report=report, is_file=is_file)
    report.notes.append("computed in float32 and cast once to each tensor's stored dtype")
    if any(m.is_dora for ad in ads for m in ad.modules.values()):
        report.notes.append("DoRA modules were merged as PEFT does (row-rescaled); they cannot be unmerged later")
    return report


def unmerge(merged: str | os.PathLike, adapters: Sequence[AdapterLike] | AdapterLike, output: str | os.PathLike, *,
            weights: Sequence[float] | None = None, overwrite: bool = False, allow_pickle: bool = False,
            device: str = "cpu", progress: bool = False, ignore_modules_to_save: bool = False) -> MergeReport:
    """Subtract ``adapters`` (in reverse order) from a merged checkpoint. DoRA is refused: see surgery.merge."""
    ads, sources = _load_all(adapters, allow_pickle, base=merged)
    w = _weights(weights, len(ads))
    for ad, src in zip(ads, sources):
        check_adapter_finite(ad, src)
    ckpt, is_file = _open_base(merged, allow_pickle)
    report = MergeReport(title=f"unmerge {len(ads)} adapter(s) from {merged}", base=str(merged),
                         adapters=sources, weights=w, output=str(output))
    _apply(ckpt, ads, sources, w, output, unmerge=True, overwrite=overwrite, device=device, progress=progress,
           report=report, is_file=is_file, ignore_modules_to_save=ignore_modules_to_save)
    report.notes.append("W = W' − ΔW in float32, cast once: BASE is recovered to within the dtype's rounding")
    return report


# ----------------------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------------------


def combine_adapters(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *, method: str = "stack",
                     rank: int | None = None, energy: float | None = None, density: float = 0.5, seed: int = 0,
                     majority: str = "total", sources: Sequence[str] | None = None,
                     progress: bool = False, device: str = "cpu") -> tuple[Adapter, CombineReport]:
    """In-memory combine: one output module per module path in any input (absent inputs contribute 0).

    ``device`` runs the factored SVD of ``svd``/``linear`` there (results come back to CPU); ``ties``/``dare``
    stay on CPU so their seeded random masks do not depend on the device.
    """
    if method not in _combine.METHODS:
        raise SurgeryError(f"unknown --method '{method}' (choose from {', '.join(_combine.METHODS)})")
    adapters = list(adapters)
    sources = list(sources) if sources else [f"adapter {i + 1}" for i in range(len(adapters))]
    w = _weights(weights, len(adapters))
    if rank is not None and rank < 1:
        raise SurgeryError(f"--rank must be ≥ 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SurgeryError(f"--energy must be in (0, 1], got {energy}")
    if method == "stack" and (rank is not None or energy is not None):
        raise SurgeryError("--method stack is exact and keeps every rank; use --method svd or linear with --rank")
    for ad, src in zip(adapters, sources):
        check_adapter_finite(ad, src)
    names: list[str] = []
    seen: set[str] = set()
    for ad in adapters:
        for n in ad.modules:
            if n not in seen:
                seen.add(n)
                names.append(n)
    if rank is not None and method in ("svd", "linear", "ties", "dare", "dare_ties"):
        combined = max(sum(ad.modules[n].rank for ad in adapters if n in ad.modules) for n in names) if names else 0
        if rank > combined:
            raise SurgeryError(f"--rank {rank} is larger than the adapters' combined rank ({combined}); "
                               "a larger rank cannot add information")
    report = CombineReport(title=f"combine {len(adapters)} adapters ({method})", method=method,
                           adapters=list(sources), weights=w)
    for n in names:  # validate everything before any compute
        _combine.check_compatible(n, [ad.modules.get(n) for ad in adapters], sources)
    modules: dict[str, AdapterModule] = {}
    dense = 0
    for n in _progress(names, len(names), f"combine ({method})", progress):
        mods = [ad.modules.get(n) for ad in adapters]
        on_device = device != "cpu" and method in ("svd", "linear")
        if on_device:
            mods = [m.to(device) if m is not None else None for m in mods]
        out, info = _combine.combine_modules(mods, w, method, name=n, rank=rank, energy=energy, density=density,
                                             seed=seed, majority=majority)  # type: ignore[arg-type]
        modules[n] = out.to("cpu") if on_device else out
        dense += info.path == "dense"
        report.rows.append({"module": n, "inputs": "+".join(str(r) for r in info.in_ranks), "rank": info.rank,
                            "path": info.path, "retained_energy": info.retained_energy, "rel_error": info.rel_error})
    mts: dict[str, Tensor] = {}
    for i, ad in enumerate(adapters):
        for key, t in ad.modules_to_save.items():
            if key in mts:
                raise SurgeryError("two adapters both replace this tensor (modules_to_save); PEFT refuses to "
                                   "combine them too", path=sources[i], tensor=key)
            mts[key] = t
    first = adapters[0]
    result = Adapter(modules=modules, modules_to_save=mts, base_model=first.base_model, config=dict(first.config),
                     metadata={}, source_format=first.source_format)
    kinds = sorted({m.kind + ("+dora" if m.is_dora else "") for ad in adapters for m in ad.modules.values()})
    if dense:
        report.notes.append(f"{dense} module(s) went through the dense ΔW"
                            + (f" (input types: {', '.join(kinds)})" if len(kinds) > 1 else "")
                            + "; an exact SVD re-factored them into LoRA")
    errs = [r["rel_error"] for r in report.rows]
    report.totals = {"modules": len(modules), "rank (max)": max((m.rank for m in modules.values()), default=0),
                     "parameters": result.num_params, "max rel_error": max(errs, default=0.0)}
    if method == "stack":
        report.notes.append("stack is exact: ΔW = Σ wᵢ·ΔWᵢ with each adapter's scale applied once")
    elif method in ("svd", "linear"):
        report.notes.append("rel_error is the Eckart–Young optimum ‖ΔW − ΔW_k‖/‖ΔW‖ of the exact sum")
    else:
        report.notes.append(f"{method} ran on the dense ΔWᵢ (density {density}, seed {seed}); rel_error is the "
                            "re-factorisation error of the merged ΔW")
    return result, report


def combine(adapters: Sequence[AdapterLike], output: str | os.PathLike, *, method: str = "stack",
            weights: Sequence[float] | None = None, rank: int | None = None, energy: float | None = None,
            density: float = 0.5, seed: int = 0, majority: str = "total", format: str = "peft",
            overwrite: bool = False, allow_pickle: bool = False, progress: bool = False,
            write_options: dict[str, Any] | None = None, device: str = "cpu") -> CombineReport:
    """Combine adapters into one and write it (see :func:`combine_adapters` and ``surgery.combine``)."""
    ads, sources = _load_all(adapters, allow_pickle)
    if len(ads) < 2 and method not in ("svd", "linear"):
        raise SurgeryError("combine needs at least two adapters")
    result, report = combine_adapters(ads, weights, method=method, rank=rank, energy=energy, density=density,
                                      seed=seed, majority=majority, sources=sources, progress=progress,
                                      device=device)
    report.output = str(output)
    report.notes += _save(result, output, format=format, overwrite=overwrite, inputs=_inputs(adapters),
                          write_options=write_options)
    return report


# ----------------------------------------------------------------------------------------------------------
# rescale
# ----------------------------------------------------------------------------------------------------------


def _alpha_of(m: AdapterModule) -> float:
    return m.alpha if m.alpha is not None else _rescale.snap(
        alpha_for_scale(m.scale, _rescale.alpha_rank(m), m.rslora and m.kind == "lora"))


def rescale_adapter(adapter: Adapter, *, to_rslora: bool = False, to_lora: bool = False, alpha: float | None = None,
                    strength: float | None = None, fold_scale: bool = False, config_only: bool = False,
                    source: str = "<adapter>") -> tuple[Adapter, RescaleReport]:
    """In-memory rescale; exactly one operation. ΔW is unchanged except under ``strength`` / ``config_only``."""
    ops = {"to-rslora": to_rslora, "to-lora": to_lora, "alpha": alpha is not None, "strength": strength is not None,
           "fold-scale": fold_scale}
    chosen = [k for k, v in ops.items() if v]
    if len(chosen) != 1:
        raise SurgeryError("give exactly one of --to-rslora, --to-lora, --alpha, --strength, --fold-scale")
    op = chosen[0]
    if config_only and op != "alpha":
        raise SurgeryError("--config-only only applies to --alpha")
    check_adapter_finite(adapter, source)
    report = RescaleReport(title=f"rescale ({op})", operation=op)
    modules: dict[str, AdapterModule] = {}
    untouched = 0
    half = False
    for n, m in adapter.modules.items():
        if op == "to-rslora":
            new = _rescale.to_rslora(m)
        elif op == "to-lora":
            new = _rescale.to_lora(m)
        elif op == "alpha":
            new = _rescale.set_alpha(m, float(alpha), config_only=config_only)  # type: ignore[arg-type]
        elif op == "strength":
            new = _rescale.set_strength(m, float(strength), name=n)  # type: ignore[arg-type]
        else:
            new = _rescale.fold_scale(m)
        untouched += new is m
        factor = float(strength) if op == "strength" else (new.scale / m.scale if config_only and m.scale else 1.0)
        changed_b = any(a is not b for (_, a), (_, b) in zip(m.tensors(), new.tensors()))
        half |= changed_b and m.dtype in (torch.float16, torch.bfloat16)
        report.rows.append({"module": n, "kind": m.kind, "rank": m.rank, "alpha": _alpha_of(m),
                            "new_alpha": _alpha_of(new), "scale": m.scale, "new_scale": new.scale,
                            "rslora": new.rslora, "delta_factor": factor, "factors_rescaled": changed_b})
        modules[n] = new
    if op in ("to-rslora", "to-lora"):
        skipped = sum(1 for m in adapter.modules.values() if m.kind != "lora")
        if skipped:
            report.notes.append(f"{skipped} LoHa/LoKr module(s) left as is: they have no rsLoRA variant")
    if op == "strength":
        report.notes.append(f"ΔW multiplied by {strength} through B (alpha unchanged)")
    elif config_only:
        report.notes.append("--config-only: only alpha changed, so ΔW is multiplied by new_scale/scale per module")
    else:
        report.notes.append("ΔW unchanged: scales are restated and B compensates where the scale changed")
    if half:
        report.notes.append("B was rescaled in float32 and stored back in half precision: one rounding per element")
    result = adapter.copy(modules=modules, config=dict(adapter.config))
    report.totals = {"modules": len(modules), "factors rescaled": sum(r["factors_rescaled"] for r in report.rows),
                     "unchanged": untouched}
    return result, report


def rescale(adapter: AdapterLike, output: str | os.PathLike, *, to_rslora: bool = False, to_lora: bool = False,
            alpha: float | None = None, strength: float | None = None, fold_scale: bool = False,
            config_only: bool = False, format: str = "peft", overwrite: bool = False, allow_pickle: bool = False,
            write_options: dict[str, Any] | None = None) -> RescaleReport:
    """Rescale an adapter file (see :func:`rescale_adapter`) and write it."""
    ad, src = _load(adapter, allow_pickle)
    result, report = rescale_adapter(ad, to_rslora=to_rslora, to_lora=to_lora, alpha=alpha, strength=strength,
                                     fold_scale=fold_scale, config_only=config_only, source=src)
    report.output = str(output)
    report.notes += _save(result, output, format=format, overwrite=overwrite, inputs=_inputs([adapter]),
                          write_options=write_options)
    return report


# ----------------------------------------------------------------------------------------------------------
# resize
# ----------------------------------------------------------------------------------------------------------


def resize_adapter(adapter: Adapter, *, rank: int | None = None, energy: float | None = None,
                   sv_ratio: float | None = None, max_rank: int | None = None, device: str = "cpu",
                   source: str = "<adapter>", progress: bool = False) -> tuple[Adapter, ResizeReport]:
    """In-memory resize of every LoRA module through the factored SVD (see ``surgery.resize``)."""
    if sum(x is not None for x in (rank, energy, sv_ratio)) != 1:
        raise SurgeryError("give exactly one of --rank, --energy, --sv-ratio")
    check_adapter_finite(adapter, source)
    lora_ranks = [m.rank for m in adapter.modules.values() if m.kind == "lora"]
    if not lora_ranks:
        raise SurgeryError("the adapter has no LoRA modules to resize (LoHa/LoKr: convert them first)", path=source)
    if rank is not None:
        if rank < 1:
            raise SurgeryError(f"--rank must be ≥ 1, got {rank}")
        if rank > max(lora_ranks):
            raise SurgeryError(f"--rank {rank} is larger than the adapter's rank ({max(lora_ranks)}); "
                               "resize only lowers ranks", path=source)
    if energy is not None and not 0 < energy <= 1:
        raise SurgeryError(f"--energy must be in (0, 1], got {energy}")
    if sv_ratio is not None and sv_ratio < 1:
        raise SurgeryError(f"--sv-ratio must be ≥ 1, got {sv_ratio}")
    mode = (f"rank {rank}" if rank is not None
            else f"energy {energy}" if energy is not None else f"sv_ratio {sv_ratio}")
    report = ResizeReport(title=f"resize ({mode})")
    modules: dict[str, AdapterModule] = {}
    skipped = 0
    for n, m in _progress(adapter.modules.items(), len(adapter.modules), "resize", progress):
        new, info = _resize.resize_module(m, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank,
                                          device=device)
        modules[n] = new
        skipped += info.path == "skipped"
        report.rows.append({"module": n, "old_rank": info.old_rank, "new_rank": info.new_rank,
                            "retained_energy": info.retained_energy, "fro_retained": math.sqrt(info.retained_energy),
                            "rel_error": info.rel_error, "path": info.path})
    result = adapter.copy(modules=modules, config=dict(adapter.config))
    fro = [r["fro_retained"] for r in report.rows if r["path"] != "skipped"]
    mean = sum(fro) / len(fro) if fro else 1.0
    std = math.sqrt(sum((x - mean) ** 2 for x in fro) / len(fro)) if fro else 0.0
    report.totals = {"modules": len(modules), "resized": sum(r["path"] in ("factored", "dense") for r in report.rows),
                     "parameters before": adapter.num_params, "parameters after": result.num_params,
                     "mean fro_retained": mean, "std fro_retained": std,
                     "min fro_retained": min(fro, default=1.0)}
    if skipped:
        report.notes.append(f"{skipped} non-LoRA module(s) (LoHa/LoKr/full) were left as they are")
    if any(m.is_dora for m in adapter.modules.values()):
        report.notes.append("DoRA: the low-rank direction was resized; the magnitude vector is kept")
    report.notes.append("retained_energy = Σ_{i<k} Sᵢ² / ‖ΔW‖²_F (exact spectrum); rel_error = √(1 − retained)")
    return result, report


def resize(adapter: AdapterLike, output: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
           sv_ratio: float | None = None, max_rank: int | None = None, device: str = "cpu", format: str = "peft",
           overwrite: bool = False, allow_pickle: bool = False, progress: bool = False,
           write_options: dict[str, Any] | None = None) -> ResizeReport:
    """Resize an adapter file (see :func:`resize_adapter`) and write it."""
    ad, src = _load(adapter, allow_pickle)
    result, report = resize_adapter(ad, rank=rank, energy=energy, sv_ratio=sv_ratio, max_rank=max_rank,
                                    device=device, source=src, progress=progress)
    report.output = str(output)
    report.notes += _save(result, output, format=format, overwrite=overwrite, inputs=_inputs([adapter]),
                          write_options=write_options)
    return report


__all__ = [
    "CombineReport",
    "MergeReport",
    "RescaleReport",
    "ResizeReport",
    "combine",
    "combine_adapters",
    "merge",
    "plan_merge",
    "rescale",
    "rescale_adapter",
    "resize",
    "resize_adapter",
    "resolve_base_key",
    "rewrite_checkpoint",
    "unmerge",
]
