"""peft-surgery: model surgery and adapter-format conversion on checkpoint tensors.

The library API mirrors the command line (see :mod:`peft_surgery.api`)::

    import peft_surgery as ps
    adapter, report = ps.extract("org/base", "org/finetuned", rank=16)
    adapter.save("adapter", format="kohya")

Names are imported lazily (on first use), so ``import peft_surgery`` is fast and does not load torch.

Note: ``peft_surgery.extract`` and ``peft_surgery.convert`` are the API *functions*. Their implementation modules
are still importable by their full names (``from peft_surgery.extract import ...``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute). Functions that mirror CLI commands live in .api.
_LAZY: dict[str, tuple[str, str]] = {
    # canonical objects
    "Adapter": (".adapter", "Adapter"),
    "AdapterModule": (".adapter", "AdapterModule"),
    "LoRA": (".adapter", "LoRA"),
    "LoHa": (".adapter", "LoHa"),
    "LoKr": (".adapter", "LoKr"),
    "FullDiff": (".adapter", "FullDiff"),
    "Layout": (".adapter", "Layout"),
    "Checkpoint": (".checkpoint", "Checkpoint"),
    "Report": (".report", "Report"),
    # errors
    "SurgeryError": (".errors", "SurgeryError"),
    "FormatError": (".errors", "FormatError"),
    "ShapeMismatchError": (".errors", "ShapeMismatchError"),
    "NonFiniteError": (".errors", "NonFiniteError"),
    "OutputExistsError": (".errors", "OutputExistsError"),
    # operations (the library API)
    "load_adapter": (".api", "load_adapter"),
    "load_checkpoint": (".api", "load_checkpoint"),
    "save_adapter": (".api", "save_adapter"),
    "convert": (".api", "convert"),
    "extract": (".api", "extract"),
    "init_pissa": (".api", "init_pissa"),
    "push_to_hub": (".api", "push_to_hub"),
    "merge": (".api", "merge"),
    "combine": (".api", "combine"),
    "quantize_nf4": (".api", "quantize_nf4"),
}
# API functions whose names are also submodules: keep the function on the package when the submodule is imported.
_SHADOWED = frozenset({"extract", "convert"})


__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Keeps ``ps.extract`` / ``ps.convert`` the API functions after their same-named submodules are imported."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the import system binding the submodule; it stays reachable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .adapter import Adapter, AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA
    from .api import (combine, convert, extract, init_pissa, load_adapter, load_checkpoint, merge, push_to_hub,
                      quantize_nf4, save_adapter)
    from .checkpoint import Checkpoint
    from .errors import FormatError, NonFiniteError, OutputExistsError, ShapeMismatchError, SurgeryError
    from .report import Report
