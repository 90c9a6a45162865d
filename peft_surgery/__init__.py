"""peft-surgery: model surgery and adapter-format conversion on checkpoint tensors."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapter import Adapter, AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA
from .checkpoint import Checkpoint, load_checkpoint
from .errors import FormatError, SurgeryError
from .formats import load_adapter, save_adapter

__all__ = [
    "Adapter",
    "AdapterModule",
    "Checkpoint",
    "FormatError",
    "FullDiff",
    "Layout",
    "LoHa",
    "LoKr",
    "LoRA",
    "SurgeryError",
    "__version__",
    "load_adapter",
    "load_checkpoint",
    "save_adapter",
]
