"""Errors that the CLI turns into one clear line and a non-zero exit."""

from __future__ import annotations


class SurgeryError(Exception):
    """A problem with the user's input or request (not a bug in peft-surgery).

    The message should name the file and, where relevant, the tensor or module.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: object | None = None, tensor: str | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.tensor = tensor


class FormatError(SurgeryError):
    """A file is not in a format we can read, or is incomplete/ambiguous."""


class ShapeMismatchError(SurgeryError):
    """Tensors that must agree in shape do not."""


class NonFiniteError(SurgeryError):
    """A tensor contains NaN or Inf."""


class OutputExistsError(SurgeryError):
    """The output exists and --overwrite was not given, or it would overwrite an input."""
