"""Checkpoint-level NF4/FP4 quantization (bitsandbytes layout), dequantization and error reports.

* :func:`quantize_checkpoint` streams a model checkpoint one tensor at a time, writes every ``nn.Linear``
  weight in the layout ``bitsandbytes.nn.Linear4bit`` saves (six keys per weight) and adds a matching
  ``quantization_config`` to config.json, so ``AutoModelForCausalLM.from_pretrained(OUT)`` loads it as a
  bitsandbytes 4-bit model. Embeddings, norms and the output head stay unquantized.
* :func:`dequantize_checkpoint` turns such a checkpoint (ours or one saved by transformers) back into a plain one.
* :func:`quant_error_report` measures, per tensor, what NF4 / FP4 / int4-absmax would lose, without writing.

Which weights are quantized mirrors transformers: when the checkpoint has a config.json, the model is built on
the ``meta`` device and its ``nn.Linear`` (and GPT-2 ``Conv1D``) modules are the candidates, minus
transformers' own ``get_keys_to_not_convert`` (output embeddings, tied weights, last module) and ``--skip``.
Without a config, 2-D ``*.weight`` tensors whose names do not look like embeddings, norms or heads are used.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .adapter import check_finite
from .checkpoint import Checkpoint, ShardedWriter, atomic_output, copy_side_files, write_json
from .errors import SurgeryError
from .report import Report
from .surgery import nf4 as _nf4

QUANT_KEY_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                      "quant_state.bitsandbytes__fp4")
_QSTATE_RE = re.compile(r"^(?P<prefix>.+)\.quant_state\.bitsandbytes__(?P<type>nf4|fp4)$")
# Name fragments of tensors that stay unquantized when there is no config.json to build the model from.
NAME_SKIP_PATTERNS = (r"(^|\.)lm_head(\.|$)", r"embed", r"(^|\.)wte(\.|$)", r"(^|\.)wpe(\.|$)", r"norm",
                      r"(^|\.)ln_", r"(^|\.)ln_f(\.|$)", r"(^|\.)output(\.|$)", r"(^|\.)head(\.|$)",
                      r"(^|\.)classifier(\.|$)", r"(^|\.)score(\.|$)")
COMPUTE_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
                  "bf16": "bfloat16", "bfloat16": "bfloat16"}


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


@dataclass
class QuantReport(Report):
    """Result of quantize / quant-error / dequantize.

    ``rows``: one per tensor (error metrics per method when an error report was asked for);
    ``comparison``: one row per method with the totals (the NF4 / FP4 / int4 side-by-side);
    ``worst``: the tensors with the largest relative error under the primary method.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    methods: list[str] = field(default_factory=list)
    comparison: list[dict[str, Any]] = field(default_factory=list)
    worst: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    output: str | None = None

    def to_text(self, max_rows: int | None = 40) -> str:
        text = super().to_text(max_rows)
        extra = []
        if self.skipped:
            more = f" (+{len(self.skipped) - 8} more)" if len(self.skipped) > 8 else ""
            extra += [f"kept unquantized: {', '.join(self.skipped[:8])}{more}"]
        if self.comparison:
            extra += ["", "side by side (all quantized tensors):", _table(self.comparison)]
        if self.worst:
            label = self.comparison[0]["method"] if self.comparison else self.quant_type
            extra += ["", f"worst tensors ({label}):",
                      _table(self.worst)]
        return text + ("\n" + "\n".join(extra) if extra else "")

    def to_markdown(self, max_rows: int | None = None) -> str:
        md = super().to_markdown(max_rows)
        if self.comparison:
            heads = list(self.comparison[0])
            md += "\n\n| " + " | ".join(heads) + " |\n|" + "|".join("---" for _ in heads) + "|\n"
            md += "\n".join("| " + " | ".join(_fmt(r[h]) for h in heads) + " |" for r in self.comparison)
        return md


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _table(rows: list[dict[str, Any]]) -> str:
    heads = list(rows[0])
    cells = [[_fmt(r.get(h, "")) for h in heads] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells])


# --------------------------------------------------------------------------------------------------------
# Which tensors to quantize
# --------------------------------------------------------------------------------------------------------


@dataclass
class QuantPlan:
    """Checkpoint key → whether the module is a GPT-2 style ``Conv1D`` (stored transposed)."""

    targets: dict[str, bool]
    default_skip: list[str]
    source: str  # "model" (built from config.json) or "names"
    notes: list[str] = field(default_factory=list)


def skip_matches(module: str, patterns: Iterable[str]) -> bool:
    """transformers' ``llm_int8_skip_modules`` rule: a pattern matches from the start up to a module boundary
    (as a regex), or as a suffix of the module name."""
    for p in patterns:
        try:
            if re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module):
                return True
        except re.error:
            pass
        if module.endswith(p):
            return True
    return False


def _meta_model(config: dict[str, Any], keys: set[str]) -> Any | None:
    """Build the model skeleton on the meta device (no memory, no download); None when that fails."""
    try:
        import transformers
        from transformers import AutoConfig

        cfg_dict = {k: v for k, v in config.items() if k != "quantization_config"}
        cfg = AutoConfig.for_model(**cfg_dict)
    except Exception:
        return None
    best, best_hits = None, -1
    for auto in ("AutoModelForCausalLM", "AutoModel", "AutoModelForSeq2SeqLM"):
        try:
            with torch.device("meta"):
                model = getattr(transformers, auto).from_config(cfg)
        except Exception:
            continue
        hits = sum(1 for k in model.state_dict() if k in keys)
        if hits > best_hits:
            best, best_hits = model, hits
    return best


def plan_quantization(ckpt: Checkpoint, skip: Sequence[str] | None = None) -> QuantPlan:
    """Decide which checkpoint tensors to quantize (see the module docstring)."""
    keys = set(ckpt.keys())
    skip = list(skip or [])
    config = ckpt.config()
    model = _meta_model(config, keys) if config and config.get("model_type") else None
    if model is not None:
        from torch import nn
        from transformers.quantizers.base import get_keys_to_not_convert

        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover
            Conv1D = ()  # type: ignore[assignment]
        default = sorted(set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or []))
        targets: dict[str, bool] = {}
        missing = []
        for name, mod in model.named_modules():
            if not (type(mod) is nn.Linear or (Conv1D and isinstance(mod, Conv1D))):
                continue
            if skip_matches(name, default) or skip_matches(name, skip):
                continue
            key = f"{name}.weight"
            if key in keys:
                targets[key] = bool(Conv1D) and isinstance(mod, Conv1D)
            else:
                missing.append(key)
        notes = []
        if missing:
            notes.append(f"{len(missing)} linear weights of the model are not in the checkpoint (e.g. {missing[0]}); "
                         "they were left alone")
        return QuantPlan(targets, default, "model", notes)
    targets = {}
    for k in ckpt.keys():
        if not k.endswith(".weight") or len(ckpt.shape(k)) != 2:
            continue
        module = k[: -len(".weight")]
        if any(re.search(p, module) for p in NAME_SKIP_PATTERNS) or skip_matches(module, skip):
            continue
        targets[k] = False
    note = ("no usable config.json: quantized the 2-D '*.weight' tensors whose names are not embeddings, norms or "
            "heads (the output is loadable by transformers only with a config.json)")
    return QuantPlan(targets, ["lm_head"], "names", [note])


def quantized_prefixes(ckpt: Checkpoint) -> dict[str, str]:
    """Weight prefix → quant type for every bitsandbytes 4-bit weight in ``ckpt``."""
    out = {}
    for k in ckpt.keys():
        m = _QSTATE_RE.match(k)
        if m:
            out[m.group("prefix")] = m.group("type")
    return out


def _refuse_quantized(ckpt: Checkpoint, where: object) -> None:
    pre = quantized_prefixes(ckpt)
    if pre:
        raise SurgeryError(f"checkpoint is already quantized (bitsandbytes 4-bit, {len(pre)} weights, e.g. "
                           f"{next(iter(pre))}); run 'peft-surgery dequantize' first", path=where)
    if any(k.endswith(".SCB") for k in ckpt.keys()):
        raise SurgeryError("checkpoint is already quantized (bitsandbytes 8-bit, '.SCB' tensors)", path=where)
    qc = (ckpt.config() or {}).get("quantization_config")
    if qc:
        raise SurgeryError(f"checkpoint is already quantized (config.json has a quantization_config, "
                           f"quant_method={qc.get('quant_method', '?')})", path=where)


def _open(model: str | os.PathLike | Checkpoint, allow_pickle: bool) -> Checkpoint:
    return model if isinstance(model, Checkpoint) else Checkpoint.open(model, allow_pickle=allow_pickle)


def _device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SurgeryError(f"device {device} requested but CUDA is not available")
    return str(device)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False, disable=not enabled)


def _target_tensor(ckpt: Checkpoint, key: str, transpose: bool, device: str) -> Tensor:
    t = ckpt.get_tensor(key)
    where = ckpt.shard_of(key)
    if t.dtype not in _nf4.FLOAT_DTYPES:
        what = "not a floating-point tensor" if not t.is_floating_point() else "an unsupported float dtype"
        raise SurgeryError(f"is {what} ({str(t.dtype).removeprefix('torch.')}); only float32, float16 and bfloat16 "
                           "weights can be 4-bit quantized", path=where, tensor=key)
    check_finite(t, path=where, tensor=key)
    if transpose:  # Conv1D stores (in, out); bitsandbytes quantizes the (out, in) Linear weight
        t = t.t().contiguous()
    return t.to(device)


# --------------------------------------------------------------------------------------------------------
# Error statistics
# --------------------------------------------------------------------------------------------------------


class _Totals:
    def __init__(self) -> None:
        self.sse = 0.0
        self.ssw = 0.0
        self.n = 0
        self.max_abs = 0.0
        self.bits = 0.0

    def add(self, st: dict[str, float], bits: float) -> None:
        self.sse += st["sse"]
        self.ssw += st["ssw"]
        self.n += st["numel"]
        self.max_abs = max(self.max_abs, st["max_abs"])
        self.bits += bits * st["numel"]

    def row(self, method: str) -> dict[str, Any]:
        return {"method": method, "params": self.n, "mse": self.sse / max(1, self.n),
                "rel_fro": math.sqrt(self.sse / self.ssw) if self.ssw > 0 else 0.0,
                "sqnr_db": 10 * math.log10(self.ssw / self.sse) if self.sse > 0 and self.ssw > 0 else math.inf,
                "max_abs": self.max_abs, "bits_per_param": self.bits / max(1, self.n)}


def _method_label(method: str, double_quant: bool) -> str:
    return f"{method}+dq" if double_quant and method in _nf4.QUANT_TYPES else method


def _error_row(key: str, t: Tensor, methods: Sequence[str], blocksize: int, double_quant: bool,
               totals: dict[str, _Totals], primary: tuple[Tensor, Any] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"tensor": key, "shape": "x".join(map(str, t.shape)), "params": t.numel()}
    for i, m in enumerate(methods):
        if i == 0 and primary is not None:
            w_hat = _nf4.dequantize_4bit(primary[0], primary[1], dtype=torch.float32)
            bits = primary[1].bits_per_param()
        else:
            w_hat, bits = _nf4.roundtrip(t, m, blocksize, double_quant)
        st = _nf4.error_stats(t, w_hat)
        totals.setdefault(m, _Totals()).add(st, bits)
        if i == 0:
            row.update(mse=st["mse"], rel_fro=st["rel_fro"], sqnr_db=st["sqnr_db"], max_abs=st["max_abs"],
                       bits_per_param=bits)
        else:
            row[f"{m}_rel_fro"] = st["rel_fro"]
            row[f"{m}_sqnr_db"] = st["sqnr_db"]
    return row


def _finish_error_report(report: QuantReport, totals: dict[str, _Totals], double_quant: bool, top: int) -> None:
    report.comparison = [totals[m].row(_method_label(m, double_quant)) for m in report.methods if m in totals]
    if report.rows:
        worst = sorted(report.rows, key=lambda r: -(r["rel_fro"] if math.isfinite(r["rel_fro"]) else math.inf))
        report.worst = [{k: r[k] for k in ("tensor", "shape", "rel_fro", "sqnr_db", "max_abs")} for r in worst[:top]]
    if len(report.comparison) > 1:
        order = sorted(report.comparison, key=lambda r: r["rel_fro"])
        report.notes.append("error ordering (relative Frobenius, lower is better): "
                            + " < ".join(f"{r['method']} {r['rel_fro']:.4g}" for r in order))
    report.notes.append("bits_per_param counts the 4-bit codes and the per-block constants (absmax; with double "
                        "quantization the uint8 absmax codes, nested_absmax and offset); int4 is symmetric absmax "
                        "round-to-nearest in [-7, 7] with float32 block scales")


# --------------------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------------------


def quantization_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "bfloat16",
                        quant_storage: str = "uint8", skip_modules: list[str] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` transformers' ``BitsAndBytesConfig.to_dict()`` writes for these settings."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": quant_storage,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quantize_checkpoint(
    model: str | os.PathLike | Checkpoint,
    out: str | os.PathLike,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str = "bf16",
    quant_storage: str = "uint8",
    skip: Sequence[str] | None = None,
    device: str | None = "auto",
    error_report: bool = False,
    methods: Sequence[str] = _nf4.METHODS,
    top: int = 10,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> QuantReport:
    """Write a bitsandbytes-4-bit copy of ``model`` to the folder ``out`` (one tensor in memory at a time).

    ``skip``: module names/patterns kept unquantized in addition to transformers' defaults (they are written to
    ``llm_int8_skip_modules``). ``error_report=True`` adds per-tensor error metrics for the written weights and,
    side by side, for the other ``methods`` (roughly three times the work).

    >>> report = quantize_checkpoint("tiny-llama", "tiny-llama-nf4")  # doctest: +SKIP
    >>> report.totals["bits_per_param"]  # doctest: +SKIP
    4.127
    """
    _nf4._check_quant_type(quant_type)
    if blocksize not in _nf4.BLOCKSIZES:
        raise SurgeryError(f"blocksize must be one of {', '.join(map(str, _nf4.BLOCKSIZES))}, got {blocksize}")
    cdt = COMPUTE_DTYPES.get(str(compute_dtype).lower())
    if cdt is None:
        raise SurgeryError(f"unknown compute dtype '{compute_dtype}' (use bf16, fp16 or fp32)")
    if quant_storage not in _nf4.STORAGE_DTYPES:
        raise SurgeryError(f"unknown quant storage '{quant_storage}' (use one of {', '.join(_nf4.STORAGE_DTYPES)})")
    storage = _nf4.STORAGE_DTYPES[quant_storage]
    dev = _device(device)
    ckpt = _open(model, allow_pickle)
    _refuse_quantized(ckpt, ckpt.source)
    plan = plan_quantization(ckpt, skip)
    if not plan.targets:
        raise SurgeryError("no linear weights to quantize (everything is skipped or not a 2-D weight)", path=ckpt.source)
    methods = [quant_type] + [m for m in methods if m != quant_type]
    report = QuantReport(title=f"{quant_type}{'+dq' if double_quant else ''} quantization (blocksize {blocksize})",
                         quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                         methods=methods if error_report else [quant_type], output=str(out), notes=list(plan.notes))
    totals: dict[str, _Totals] = {}
    n_params = stored = raw = code_bytes = 0
    inputs = [ckpt.root] if isinstance(model, Checkpoint) else [model]
    with atomic_output(out, is_dir=True, inputs=inputs, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        with _progress(len(ckpt), "quantize", progress) as bar:
            for key in ckpt.keys():
                if key in plan.targets:
                    t = _target_tensor(ckpt, key, plan.targets[key], dev)
                    packed, state = _nf4.quantize_4bit(t, blocksize, quant_type, double_quant,
                                                       quant_storage=storage, name=key)
                    if error_report:
                        report.rows.append(_error_row(key, t, report.methods, blocksize, double_quant, totals,
                                                      primary=(packed, state)))
                    tensors = state.to("cpu").to_state_dict(packed.cpu(), prefix=key)
                    for k, v in tensors.items():
                        writer.add(k, v)
                        stored += v.numel() * v.element_size()
                    n_params += t.numel()
                    raw += t.numel() * t.element_size()
                    code_bytes += (t.numel() + 1) // 2 + state.constant_bytes()
                    del t, packed, state
                else:
                    writer.add(key, ckpt.get_tensor(key))
                    if key.endswith(".weight") and len(ckpt.shape(key)) == 2:
                        report.skipped.append(key)
                bar.update(1)
        writer.close()
        if ckpt.root.is_dir() and not ckpt.is_pickle:
            copy_side_files(ckpt.root, tmp)
        config = ckpt.config()
        if config is not None:
            skip_modules = sorted(set(plan.default_skip) | set(skip)) if skip else None
            config["quantization_config"] = quantization_config(quant_type, double_quant, cdt, quant_storage,
                                                                skip_modules)
            write_json(tmp / "config.json", config, sort_keys=False)
        else:
            report.notes.append("no config.json next to the weights: wrote tensors only")
    report.totals = {"quantized_tensors": len(plan.targets), "quantized_params": n_params,
                     "bits_per_param": 8.0 * code_bytes / max(1, n_params),
                     "quantized_bytes_in": raw, "quantized_bytes_out": stored,
                     "unquantized_2d_weights": len(report.skipped)}
    if blocksize != 64:
        report.notes.append("blocksize is not 64: transformers' BitsAndBytesConfig cannot produce this, but it "
                            "reads the blocksize from each weight's quant_state when loading")
    if error_report:
        _finish_error_report(report, totals, double_quant, top)
    return report


# --------------------------------------------------------------------------------------------------------
# quant-error (no output)
# --------------------------------------------------------------------------------------------------------


def quant_error_report(
    model: str | os.PathLike | Checkpoint,
    *,
    methods: Sequence[str] = _nf4.METHODS,
    double_quant: bool = True,
    blocksize: int = 64,
    skip: Sequence[str] | None = None,
    device: str | None = "auto",
    top: int = 10,
    allow_pickle: bool = False,
    progress: bool = False,
) -> QuantReport:
    """Per-tensor error of 4-bit quantization (MSE, relative Frobenius, SQNR, max |err|, bits/param) for each
    of ``methods`` (nf4, fp4, int4) side by side, on the tensors :func:`quantize_checkpoint` would quantize."""
    for m in methods:
        if m not in _nf4.METHODS:
            raise SurgeryError(f"unknown method '{m}' (use {', '.join(_nf4.METHODS)})")
    if not methods:
        raise SurgeryError("give at least one method")
    dev = _device(device)
    ckpt = _open(model, allow_pickle)
    _refuse_quantized(ckpt, ckpt.source)
    plan = plan_quantization(ckpt, skip)
    if not plan.targets:
        raise SurgeryError("no linear weights to quantize (everything is skipped or not a 2-D weight)", path=ckpt.source)
    primary = methods[0]
    report = QuantReport(title=f"4-bit quantization error (blocksize {blocksize}, double quant "
                               f"{'on' if double_quant else 'off'})", quant_type=primary if primary != "int4" else "nf4",
                         double_quant=double_quant, blocksize=blocksize, methods=list(methods), notes=list(plan.notes))
    totals: dict[str, _Totals] = {}
    with _progress(len(plan.targets), "quant-error", progress) as bar:
        for key in ckpt.keys():
            if key not in plan.targets:
                continue
            t = _target_tensor(ckpt, key, plan.targets[key], dev)
            report.rows.append(_error_row(key, t, methods, blocksize, double_quant, totals))
            bar.update(1)
    report.skipped = [k for k in ckpt.keys() if k not in plan.targets and k.endswith(".weight")
                      and len(ckpt.shape(k)) == 2]
    _finish_error_report(report, totals, double_quant, top)
    first = report.comparison[0]
    report.totals = {"tensors": len(report.rows), "params": first["params"], "method": first["method"],
                     "mse": first["mse"], "rel_fro": first["rel_fro"], "sqnr_db": first["sqnr_db"],
                     "max_abs": first["max_abs"], "bits_per_param": first["bits_per_param"]}
    return report


def plot_error_report(report: QuantReport, path: str | os.PathLike) -> Path:
    """Draw the relative error per tensor for each method (PNG/SVG/PDF by suffix). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SurgeryError("--plot needs matplotlib (pip install matplotlib)") from None
    if not report.rows:
        raise SurgeryError("nothing to plot: the report has no per-tensor rows")
    xs = list(range(len(report.rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, min(24.0, 0.12 * len(xs) + 4)), 4))
    for i, m in enumerate(report.methods):
        col = "rel_fro" if i == 0 else f"{m}_rel_fro"
        ax.plot(xs, [r[col] for r in report.rows], marker=".", lw=1,
                label=_method_label(m, report.double_quant and m != "int4"))
    ax.set_xlabel("quantized tensor (checkpoint order)")
    ax.set_ylabel("relative Frobenius error ‖W−Q(W)‖/‖W‖")
    ax.set_title(report.title)
    ax.legend()
    ax.grid(alpha=0.3)
    if len(xs) <= 40:
        ax.set_xticks(xs)
        ax.set_xticklabels([r["tensor"].removesuffix(".weight")[-32:] for r in report.rows], rotation=90, fontsize=6)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


# --------------------------------------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------------------------------------


def dequantize_checkpoint(
    qmodel: str | os.PathLike | Checkpoint,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = "auto",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> QuantReport:
    """Turn a bitsandbytes 4-bit checkpoint (ours or transformers') into a plain one.

    Quantized weights come back in ``dtype`` (default: the dtype recorded in each quant_state); other floating
    tensors are cast to ``dtype`` when given. config.json loses its ``quantization_config``.
    """
    dev = _device(device)
    ckpt = _open(qmodel, allow_pickle)
    prefixes = quantized_prefixes(ckpt)
    if not prefixes:
        raise SurgeryError("not a bitsandbytes 4-bit checkpoint (no '*.quant_state.bitsandbytes__nf4|fp4' tensors)",
                           path=ckpt.source)
    aux = {f"{p}.{s}" for p in prefixes for s in QUANT_KEY_SUFFIXES}
    conv1d: set[str] = set()
    config = ckpt.config()
    if config and config.get("model_type"):
        model = _meta_model(config, {k for k in ckpt.keys() if k not in aux})
        if model is not None:
            try:
                from transformers.pytorch_utils import Conv1D

                conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
            except ImportError:  # pragma: no cover
                pass
    types = sorted(set(prefixes.values()))
    report = QuantReport(title=f"dequantized {len(prefixes)} {'/'.join(types)} weights", quant_type=types[0],
                         output=str(out))
    n_params = 0
    inputs = [ckpt.root] if isinstance(qmodel, Checkpoint) else [qmodel]
    with atomic_output(out, is_dir=True, inputs=inputs, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        with _progress(len(ckpt), "dequantize", progress) as bar:
            for key in ckpt.keys():
                bar.update(1)
                if key in aux:
                    continue
                if key in prefixes:
                    group = {k: ckpt.get_tensor(k) for k in [key, *(f"{key}.{s}" for s in QUANT_KEY_SUFFIXES)]
                             if k in ckpt}
                    packed, state = _nf4.QuantState4bit.from_state_dict(group, key, path=ckpt.shard_of(key))
                    w = _nf4.dequantize_4bit(packed.to(dev), state.to(dev), dtype=dtype or state.dtype).cpu()
                    if key in conv1d:
                        w = w.t().contiguous()
                    writer.add(key, w)
                    n_params += w.numel()
                    report.rows.append({"tensor": key, "shape": "x".join(map(str, w.shape)),
                                        "quant_type": state.quant_type, "double_quant": state.nested,
                                        "blocksize": state.blocksize, "dtype": str(w.dtype).removeprefix("torch.")})
                    continue
                t = ckpt.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                writer.add(key, t)
        writer.close()
        if ckpt.root.is_dir() and not ckpt.is_pickle:
            copy_side_files(ckpt.root, tmp)
        if config is not None:
            config.pop("quantization_config", None)
            if dtype is not None:
                name = _nf4.DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
                for k in ("dtype", "torch_dtype"):
                    if k in config:
                        config[k] = name
            write_json(tmp / "config.json", config, sort_keys=False)
    report.totals = {"dequantized_tensors": len(prefixes), "dequantized_params": n_params}
    return report


__all__ = [
    "QuantPlan",
    "QuantReport",
    "dequantize_checkpoint",
    "plan_quantization",
    "plot_error_report",
    "quant_error_report",
    "quantization_config",
    "quantize_checkpoint",
    "quantized_prefixes",
    "skip_matches",
]
