"""Library entry point for format (and adapter-type) conversion."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .adapter import Adapter
from .formats import load_adapter, save_adapter
from .report import Report


@dataclass
class ConvertReport(Report):
    source_format: str | None = None
    target_format: str | None = None
    output: str | None = None
    num_modules: int = 0


def convert_adapter(adapter: Adapter, *, to_type: str | None = None, rank: int | None = None,
                    energy: float | None = None, report: ConvertReport | None = None) -> Adapter:
    """Convert the adapter type (LoRA ↔ LoHa/LoKr) in memory; formats are handled by save_adapter."""
    if to_type is None:
        return adapter
    from .surgery.types import convert_type  # written with the formats work

    return convert_type(adapter, to_type, rank=rank, energy=energy, report=report)


# Generic targets that have a dedicated writer for Flux adapters (Flux's kohya/diffusers layouts are not the
# SD ones: fused BFL names for kohya, split transformer.* names for diffusers).
FLUX_TARGETS = {"kohya": "flux-kohya", "diffusers": "flux-diffusers"}


def _route_target(adapter: Adapter, to: str) -> str:
    if to not in FLUX_TARGETS:
        return to
    from .formats.flux import is_flux_adapter

    return FLUX_TARGETS[to] if is_flux_adapter(adapter) else to


def convert(
    input_path: str | os.PathLike | Adapter,
    output: str | os.PathLike,
    *,
    to: str = "peft",
    from_format: str = "auto",
    to_type: str | None = None,
    base: str | None = None,
    arch: str = "auto",
    rank: int | None = None,
    energy: float | None = None,
    skip_unresolved: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    **write_options: Any,
) -> ConvertReport:
    """Read ``input_path`` in any supported format and write it to ``output`` in format ``to``.

    >>> report = convert("corpus/peft_opt125m", "out/opt-peft", to="peft")  # doctest: +SKIP
    """
    read_options: dict[str, Any] = {}
    if base is not None:
        read_options["base"] = base
    if arch != "auto":
        read_options["arch"] = arch
    if skip_unresolved:
        read_options["skip_unresolved"] = True
    if isinstance(input_path, Adapter):
        adapter = input_path
        inputs: list = []
    else:
        adapter = load_adapter(input_path, format=from_format, allow_pickle=allow_pickle, **read_options)
        inputs = [input_path]
    report = ConvertReport(title=f"convert {adapter.source_format} → {to}", source_format=adapter.source_format,
                           target_format=to, output=str(output))
    report.notes.extend(adapter.config.get("_notes", []) if isinstance(adapter.config.get("_notes"), list) else [])
    adapter = convert_adapter(adapter, to_type=to_type, rank=rank, energy=energy, report=report)
    if base is not None:
        write_options.setdefault("base", base)
    if arch != "auto":
        write_options.setdefault("arch", arch)
    target = _route_target(adapter, to)
    if target != to:
        report.notes.append(f"Flux adapter: wrote '--to {to}' with the {target} writer (Flux's own {to} layout)")
        report.target_format = target
    notes = save_adapter(adapter, output, format=target, overwrite=overwrite, inputs=inputs, **write_options)
    report.notes.extend(notes)
    report.num_modules = len(adapter.modules)
    report.totals = {"modules": len(adapter.modules), "parameters": adapter.num_params}
    return report


__all__ = ["ConvertReport", "convert", "convert_adapter"]
