"""Report dataclasses shared by every operation: ``to_dict``, ``to_json``, ``to_markdown``, ``to_text``.

A report has optional per-module ``rows`` (dicts with the same keys) and ``totals`` (a dict), plus ``notes``
(lines about anything lossy or transformed). Subclasses add their own fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (str, int, bool)) or o is None:
        return o
    return str(o)


def format_cell(v: Any) -> str:
    """One table cell: floats to 4 significant digits (scientific when tiny or huge)."""
    if isinstance(v, float):
        if v == 0 or (1e-3 <= abs(v) < 1e6):
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)


@dataclass
class Report:
    """Base report. ``rows``: per-module dicts; ``totals``: summary numbers; ``notes``: human remarks."""

    title: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _clean(dataclasses.asdict(self))

    def to_json(self, **kwargs: Any) -> str:
        kwargs.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kwargs)

    def save_json(self, path: str) -> None:
        with open(path, "w") as fh:
            fh.write(self.to_json() + "\n")

    def _table(self, max_rows: int | None, sep: str, markdown: bool) -> list[str]:
        if not self.rows:
            return []
        headers = list(self.rows[0].keys())
        rows = self.rows if max_rows is None or len(self.rows) <= max_rows else self.rows[:max_rows]
        cells = [[format_cell(r.get(h, "")) for h in headers] for r in rows]
        if markdown:
            lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
            lines += ["| " + " | ".join(c) + " |" for c in cells]
        else:
            widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
            lines = [sep.join(h.ljust(w) for h, w in zip(headers, widths)), sep.join("-" * w for w in widths)]
            lines += [sep.join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        if len(rows) < len(self.rows):
            lines.append(f"... {len(self.rows) - len(rows)} more rows")
        return lines

    def to_markdown(self, max_rows: int | None = None) -> str:
        lines = [f"### {self.title}"] if self.title else []
        lines += self._table(max_rows, " | ", markdown=True)
        if self.totals:
            lines += ["", "| total | value |", "|---|---|"]
            lines += [f"| {k} | {format_cell(v)} |" for k, v in self.totals.items()]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def to_text(self, max_rows: int | None = 40) -> str:
        lines = [self.title] if self.title else []
        lines += self._table(max_rows, "  ", markdown=False)
        if self.totals:
            lines.append("")
            lines += [f"{k}: {format_cell(v)}" for k, v in self.totals.items()]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def require_matplotlib():
    """matplotlib with the non-interactive backend, or a SurgeryError saying how to get it (for --plot).

    Commands call this before doing any work, so a missing matplotlib never leaves a finished output behind an
    error.
    """
    from .errors import SurgeryError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        raise SurgeryError("--plot needs matplotlib (pip install 'peft-surgery[plot]' or pip install matplotlib)") \
            from None
    return matplotlib


__all__ = ["Report", "format_cell", "require_matplotlib"]
