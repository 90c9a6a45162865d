"""Describe a checkpoint or adapter (what ``peft-surgery inspect`` prints)."""

from __future__ import annotations

import os
from typing import Any

from .adapter import Adapter
from .checkpoint import Checkpoint, math_prod
from .errors import FormatError, SurgeryError
from .formats import FORMATS, detect_format, load_adapter


def _looks_like_model(ckpt: Checkpoint) -> bool:
    if (ckpt.root / "config.json").exists() or (ckpt.root / "model_index.json").exists():
        return True
    keys = list(ckpt.keys())
    return bool(keys) and sum(k.endswith((".weight", ".bias")) for k in keys) >= 0.8 * len(keys)


def describe_adapter(adapter: Adapter, *, norms: bool = False, evidence: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "format": adapter.source_format,
        "evidence": evidence or [],
        "num_modules": len(adapter.modules),
        "module_types": adapter.module_types(),
        "ranks": adapter.ranks(),
        "scales": adapter.scales(),
        "num_params": adapter.num_params,
        "dtypes": adapter.dtypes(),
        "modules_to_save": sorted(adapter.modules_to_save),
        "base_model": adapter.base_model,
        "config": adapter.config or None,
    }
    if norms:
        out["norms"] = {
            name: (None if m.is_dora else m.delta_norm()) for name, m in adapter.modules.items()
        }
    return out


def describe_checkpoint(ckpt: Checkpoint) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    params = 0
    for k in ckpt.keys():
        info = ckpt.info(k)
        params += math_prod(info.shape)
        name = str(info.dtype).replace("torch.", "")
        dtypes[name] = dtypes.get(name, 0) + 1
    return {
        "format": "checkpoint",
        "evidence": ["no adapter format matched; tensors read as a plain model checkpoint"],
        "num_tensors": len(ckpt),
        "num_files": len(ckpt.files),
        "num_params": params,
        "dtypes": dtypes,
        "config": ckpt.config(),
        "metadata": ckpt.metadata or None,
    }


def describe(location: str | os.PathLike, *, norms: bool = False, allow_pickle: bool = False,
             format: str = "auto", **options: Any) -> dict[str, Any]:
    """A JSON-able description: detected format and evidence, modules, ranks, scales, params, dtypes."""
    ckpt = Checkpoint.open(location, allow_pickle=allow_pickle)
    if format == "auto":
        try:
            det = detect_format(ckpt)
        except FormatError:
            if _looks_like_model(ckpt):
                return describe_checkpoint(ckpt)
            raise
        adapter = FORMATS[det.format].read(ckpt, **options)
        adapter.source_format = det.format
        return describe_adapter(adapter, norms=norms, evidence=det.evidence)
    if format == "checkpoint":
        return describe_checkpoint(ckpt)
    adapter = load_adapter(ckpt, format=format, **options)
    return describe_adapter(adapter, norms=norms)


__all__ = ["describe", "describe_adapter", "describe_checkpoint", "SurgeryError"]
