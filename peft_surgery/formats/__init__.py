"""Adapter formats: one reader, one writer and one detector per format, all through the canonical Adapter.

Formats register themselves with :func:`register`. :func:`load_adapter` detects the format (or takes the one
the user named), :func:`save_adapter` writes atomically. A format never does math: when a target format cannot
express something exactly, the writer asks surgery for the transformation and reports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..adapter import Adapter
from ..checkpoint import Checkpoint, atomic_output, resolve_location
from ..errors import FormatError, SurgeryError


@dataclass
class Detection:
    """A detector's verdict: how sure it is (0 = not this format) and the evidence it saw."""

    format: str
    score: float
    evidence: list[str] = field(default_factory=list)


@dataclass
class FormatSpec:
    name: str
    detect: Callable[[Checkpoint], Detection | None]
    read: Callable[..., Adapter]
    write: Callable[..., list[str]] | None
    output_is_dir: bool = True
    description: str = ""
    default_filename: str | None = None


FORMATS: dict[str, FormatSpec] = {}


def register(spec: FormatSpec) -> FormatSpec:
    FORMATS[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    # Import every format module once so they register themselves.
    import importlib

    for mod in ("peft", "diffusers", "kohya", "lycoris", "flux", "mlx"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def detect_format(ckpt: Checkpoint) -> Detection:
    """The single best-matching format, or a FormatError listing what was seen."""
    _ensure_loaded()
    found = []
    for spec in FORMATS.values():
        d = spec.detect(ckpt)
        if d is not None and d.score > 0:
            found.append(d)
    found.sort(key=lambda d: -d.score)
    if not found:
        sample = ", ".join(sorted(ckpt.keys())[:5]) or "no tensors"
        raise FormatError(f"unknown adapter format: no reader recognises its keys (first keys: {sample})",
                          path=ckpt.source)
    if len(found) > 1 and found[0].score == found[1].score:
        raise FormatError(
            "ambiguous adapter format: "
            + "; ".join(f"{d.format} ({', '.join(d.evidence)})" for d in found if d.score == found[0].score),
            path=ckpt.source,
        )
    return found[0]


def open_adapter_checkpoint(location: str | os.PathLike, *, allow_pickle: bool = False,
                            subfolder: str | None = None, revision: str | None = None) -> Checkpoint:
    return Checkpoint.open(location, allow_pickle=allow_pickle, subfolder=subfolder, revision=revision)


def load_adapter(
    location: str | os.PathLike | Checkpoint,
    *,
    format: str = "auto",
    allow_pickle: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    **options: Any,
) -> Adapter:
    """Read an adapter in any supported format into the canonical :class:`Adapter`.

    ``options`` go to the format's reader (e.g. ``base=`` to resolve kohya names).
    """
    _ensure_loaded()
    ckpt = location if isinstance(location, Checkpoint) else open_adapter_checkpoint(
        location, allow_pickle=allow_pickle, subfolder=subfolder, revision=revision)
    if format == "auto":
        det = detect_format(ckpt)
        spec = FORMATS[det.format]
    else:
        if format not in FORMATS:
            raise SurgeryError(f"unknown format '{format}' (known: {', '.join(sorted(FORMATS))})")
        spec = FORMATS[format]
    adapter = spec.read(ckpt, **options)
    adapter.source_format = adapter.source_format or spec.name
    return adapter


def save_adapter(
    adapter: Adapter,
    path: str | os.PathLike,
    *,
    format: str = "peft",
    overwrite: bool = False,
    inputs: list[str | os.PathLike] | tuple = (),
    **options: Any,
) -> list[str]:
    """Write ``adapter`` to ``path`` atomically in ``format``; return the notes the writer made.

    Notes describe anything that was transformed to fit the format (e.g. per-module alpha folded into B).
    """
    _ensure_loaded()
    if format not in FORMATS or FORMATS[format].write is None:
        known = sorted(n for n, s in FORMATS.items() if s.write is not None)
        raise SurgeryError(f"cannot write format '{format}' (writable: {', '.join(known)})")
    spec = FORMATS[format]
    if not adapter.modules and not adapter.modules_to_save:
        raise SurgeryError("the adapter is empty; nothing to write", path=path)
    with atomic_output(path, is_dir=spec.output_is_dir, inputs=inputs, overwrite=overwrite) as tmp:
        notes = spec.write(adapter, tmp, **options)
    return list(notes or [])


__all__ = [
    "Detection",
    "FORMATS",
    "FormatSpec",
    "detect_format",
    "load_adapter",
    "register",
    "resolve_location",
    "save_adapter",
    "Path",
]
