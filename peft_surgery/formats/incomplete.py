"""Files that hold only one half of a LoRA (only A/down or only B/up matrices), such as a custom training
script that saved ``w_a_000 … w_a_023``. Nothing can be converted from them: the detector claims such files
with a low score so that ``inspect``/``convert``/``load_adapter`` fail with a precise message instead of
"unknown format", and no output is written.
"""

from __future__ import annotations

import re
from typing import Any

from ..checkpoint import Checkpoint
from ..errors import FormatError
from . import Detection, FormatSpec, register

# A key is an "A" (down) or "B" (up) half when one of its tokens says so; the rest of the key is the stem.
_A_RE = re.compile(r"(^|[._])(lora_A|lora_down|down|w_a|a)(?=$|[._])", re.IGNORECASE)
_B_RE = re.compile(r"(^|[._])(lora_B|lora_up|up|w_b|b)(?=$|[._])", re.IGNORECASE)
_HALF = {"lora_a": "A", "lora_down": "A", "down": "A", "w_a": "A", "a": "A",
         "lora_b": "B", "lora_up": "B", "up": "B", "w_b": "B", "b": "B"}


def _half(key: str) -> tuple[str, str] | None:
    """('A'|'B', stem) for a key naming one LoRA half (case-sensitive ``lora_A``/``lora_B`` included)."""
    for rx in (_A_RE, _B_RE):
        m = None
        for m in rx.finditer(key):
            pass
        if m is not None:
            token = m.group(2)
            stem = key[: m.start(2)] + "*" + key[m.end(2):]
            return _HALF[token.lower()], stem
    return None


def analyse(keys: list[str]) -> tuple[str, list[str]] | None:
    """If every key is a LoRA half and only one kind of half is present: ('A'|'B', keys); else None."""
    if not keys:
        return None
    halves = [_half(k) for k in keys]
    if any(h is None for h in halves):
        return None
    kinds = {h[0] for h in halves if h}
    if len(kinds) != 1:
        return None
    return kinds.pop(), keys


def detect(ckpt: Checkpoint) -> Detection | None:
    res = analyse(sorted(ckpt.keys()))
    if res is None:
        return None
    half, keys = res
    other = "B" if half == "A" else "A"
    return Detection("incomplete", 0.5, [f"{len(keys)} tensors, all LoRA {half} matrices "
                                         f"({keys[0]} … {keys[-1]}), no {other} matrix"])


def read(ckpt: Checkpoint, **_: Any) -> None:
    keys = sorted(ckpt.keys())
    res = analyse(keys)
    if res is None:
        raise FormatError("not an incomplete-LoRA file", path=ckpt.source)
    half, keys = res
    other = "B (up)" if half == "A" else "A (down)"
    name = "A (down)" if half == "A" else "B (up)"
    shape = tuple(ckpt.shape(keys[0]))
    raise FormatError(f"incomplete LoRA: {len(keys)} tensors ({keys[0]} … {keys[-1]}, shape {shape}) are LoRA "
                      f"{name} matrices without any {other} matrix, so ΔW = B·A cannot be formed; nothing can be "
                      "converted", path=ckpt.source)


register(FormatSpec("incomplete", detect, read, None, output_is_dir=False,
                    description="only one half of a LoRA (A without B, or B without A): reported, never converted"))
