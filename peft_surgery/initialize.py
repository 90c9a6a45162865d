"""``peft-surgery init``: PiSSA / OLoRA / MiLoRA on checkpoints, the residual base, and conversion back to LoRA.

:func:`init_adapter` streams BASE one tensor at a time. Every targeted weight ``W`` is split into an adapter
``s·B·A`` (see :mod:`peft_surgery.surgery.init`) and a residual ``W − s·B·A``; everything else is copied as is.
The output folder holds

* ``adapter/``: a PEFT LoRA adapter (``init_lora_weights: true``, see below) ready to train;
* ``residual/``: BASE with the same file names, sharding, dtypes, safetensors metadata and side files
  (config, tokenizer), where each targeted weight is the residual;
* ``report.json``: the per-module report.

Why ``init_lora_weights: true`` and not ``"pissa"``: when PEFT loads an adapter whose config says ``pissa``/``olora``,
``LoraLayer.update_layer`` re-runs the mutating init on the model it is given (SVD of its weight, subtraction of the
principal part), then overwrites A/B with the saved tensors. On our residual that would subtract the principal part
a second time. ``true`` makes PEFT create ordinary layers and load our A/B, so ``residual + adapter = BASE``.
The method is recorded in ``adapter/peft_surgery_init.json`` and in ``report.json`` instead.

:func:`to_lora` turns a trained PiSSA/OLoRA/MiLoRA adapter into a plain LoRA on the original BASE with PEFT's
``[A; A0]``, ``[B, −B0]`` construction (rank and alpha doubled), from the initial adapter or, for deterministic
inits, from A0/B0 recomputed from BASE.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .adapter import Adapter, AdapterModule, Layout, LoRA, check_finite
from .checkpoint import INDEX_NAMES, Checkpoint, ShardedWriter, atomic_output, copy_side_files, write_json
from .errors import FormatError, ShapeMismatchError, SurgeryError
from .report import Report
from .surgery import init as _init
from .surgery.delta import rank_scale

INIT_SIDE_FILE = "peft_surgery_init.json"
# NF4 settings for --quantize: transformers/QLoRA defaults (blocksize 64, double quantization)
NF4_BLOCKSIZE = 64
NF4_DOUBLE_QUANT = True
COMPUTE_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# --------------------------------------------------------------------------------------------------------
# Architecture knowledge (data, not code)
# --------------------------------------------------------------------------------------------------------

# model_type (config.json) → module-name suffixes stored as transformers ``Conv1D`` (weight is (in, out)).
CONV1D_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "openai-gpt": ("c_attn", "c_proj", "c_fc"),
    "imagegpt": ("c_attn", "c_proj", "c_fc", "q_attn"),
    "decision_transformer": ("c_attn", "c_proj", "c_fc", "q_attn"),
}
# Default targets when --target-modules is not given (PEFT's defaults for these model types).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "mixtral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gemma2": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "t5": ("q", "v"),
}
# Last name components of embedding tables and output heads: never picked by ``all-linear`` (as in PEFT),
# and refused when targeted explicitly when they are embeddings (PEFT has no PiSSA/OLoRA for nn.Embedding).
EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_positions", "shared", "embed_in", "tok_embeddings", "embeddings")
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "output", "score", "classifier", "qa_outputs")
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
              ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"))


def conv1d_suffixes(config: dict[str, Any] | None) -> tuple[str, ...]:
    """Module-name suffixes that are ``Conv1D`` (fan_in_fan_out) for this model config."""
    return CONV1D_MODULES.get(str((config or {}).get("model_type", "")), ())


def task_type_for(config: dict[str, Any] | None) -> str | None:
    for arch in (config or {}).get("architectures") or []:
        for suffix, task in TASK_TYPES:
            if str(arch).endswith(suffix):
                return task
    return None


# --------------------------------------------------------------------------------------------------------
# Target selection (PEFT semantics)
# --------------------------------------------------------------------------------------------------------


def parse_target_modules(text: str | Sequence[str] | None) -> str | list[str] | None:
    """CLI text → PEFT ``target_modules``: ``all-linear``, a list (comma-separated), or None (model default)."""
    if text is None:
        return None
    if not isinstance(text, str):
        return list(text)
    text = text.strip()
    if text.lower() in ("all-linear", "all_linear"):
        return "all-linear"
    return [t.strip() for t in text.split(",") if t.strip()]


def module_matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's ``check_target_module_exists``: a string is a full-match regex, a list matches the exact name or a
    dot-bounded suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _last(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def select_targets(ckpt: Checkpoint, target_modules: str | Sequence[str]) -> list[str]:
    """Module names (weight key without ``.weight``) that the targets select, in checkpoint order.

    ``all-linear``: every 2-D ``*.weight`` except embeddings and the output head (PEFT's rule).
    """
    candidates = [k[: -len(".weight")] for k in ckpt.keys() if k.endswith(".weight")]
    if target_modules == "all-linear":
        return [m for m in candidates if len(ckpt.shape(m + ".weight")) == 2
                and _last(m) not in EMBEDDING_NAMES and _last(m) not in OUTPUT_HEAD_NAMES]
    out = [m for m in candidates if module_matches(m, target_modules)]
    for m in out:
        shape = ckpt.shape(m + ".weight")
        if len(shape) != 2:
            raise SurgeryError(f"targeted module is not a Linear/Conv1D layer (weight shape {list(shape)}); "
                               "PiSSA/OLoRA/MiLoRA apply to 2-D weights only", path=ckpt.source, tensor=m + ".weight")
        if _last(m) in EMBEDDING_NAMES:
            raise SurgeryError("targeted module is an embedding table; PiSSA/OLoRA/MiLoRA apply to linear layers",
                               path=ckpt.source, tensor=m + ".weight")
    return out


# --------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------


@dataclass
class InitReport(Report):
    method: str = ""
    base: str = ""
    output: str = ""
    rank: int = 0
    alpha: float = 0.0
    rslora: bool = False
    scale: float = 1.0
    niter: int | None = None
    seed: int | None = None
    target_modules: Any = None
    quantize: str | None = None


@dataclass
class ToLoraReport(Report):
    trained: str = ""
    output: str = ""
    source: str = ""  # "initial" or "base"
    method: str | None = None
    rank: int | None = None


def _rel(num: float, den: float) -> float:
    return num / den if den > 0 else num


def _frob(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


# --------------------------------------------------------------------------------------------------------
# init
# --------------------------------------------------------------------------------------------------------


def _shard_plan(ckpt: Checkpoint) -> tuple[dict[str, str], str]:
    """(key → output file name, base_name) reproducing BASE's sharding."""
    if ckpt.index is not None:
        base_name = "model"
        for name in INDEX_NAMES:
            if (ckpt.root / name).exists():
                base_name = name[: -len(".safetensors.index.json")]
        return {k: Path(ckpt.shard_of(k)).name for k in ckpt.keys()}, base_name
    files = ckpt.files
    if ckpt.is_pickle or not files:
        return {k: "model.safetensors" for k in ckpt.keys()}, "model"
    if len(files) == 1:
        name = files[0].name
        return {k: name for k in ckpt.keys()}, name[: -len(".safetensors")]
    return {k: Path(ckpt.shard_of(k)).name for k in ckpt.keys()}, "model"


def _ordered_keys(ckpt: Checkpoint) -> list[str]:
    """Keys grouped by shard (so the planned writer can flush one shard at a time), stable within a shard."""
    order = {f: i for i, f in enumerate(ckpt.files)}
    return sorted(ckpt.keys(), key=lambda k: order.get(ckpt.shard_of(k), 0))


def _check_weight(ckpt: Checkpoint, key: str, method: str) -> None:
    dt = ckpt.dtype(key)
    if dt not in SUPPORTED_WEIGHT_DTYPES:
        raise SurgeryError(f"weight has dtype {str(dt).replace('torch.', '')}; {method} needs a floating-point "
                           "(fp32/fp16/bf16) weight. Initialise on the full-precision checkpoint and quantize the "
                           "residual afterwards (--quantize nf4)", path=ckpt.shard_of(key), tensor=key)


def init_adapter(
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "pissa",
    rank: int = 16,
    target_modules: str | Sequence[str] | None = None,
    alpha: float | None = None,
    rslora: bool = False,
    niter: int | None = None,
    seed: int | None = 0,
    device: str = "cpu",
    adapter_dtype: torch.dtype | None = None,
    quantize: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    progress: bool = False,
) -> InitReport:
    """Initialise a PiSSA/OLoRA/MiLoRA adapter on BASE and write ``OUT/adapter`` + ``OUT/residual``.

    ``alpha`` defaults to ``rank`` (scale 1, the PiSSA authors' setting). ``adapter_dtype`` defaults to float32
    (PEFT keeps PiSSA factors in fp32). ``quantize="nf4"`` stores the residual NF4-quantized (QPiSSA).

    >>> init_adapter("tiny-llama", "out", method="pissa", rank=8, target_modules="q_proj,v_proj")  # doctest: +SKIP
    """
    if method not in _init.INIT_METHODS:
        raise SurgeryError(f"unknown init method '{method}' (known: {', '.join(_init.INIT_METHODS)})")
    if niter is not None and method != "pissa":
        raise SurgeryError(f"--niter only applies to pissa, not {method}")
    if rank < 1:
        raise SurgeryError(f"--rank must be ≥ 1, got {rank}")
    if quantize not in (None, "nf4"):
        raise SurgeryError(f"unknown --quantize '{quantize}' (supported: nf4)")
    alpha = float(rank) if alpha is None else float(alpha)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise SurgeryError(f"--alpha must be a positive number, got {alpha}")
    scale = rank_scale(alpha, rank, rslora)
    adapter_dtype = adapter_dtype or torch.float32

    ckpt = Checkpoint.open(base, allow_pickle=allow_pickle, subfolder=subfolder, revision=revision)
    if getattr(ckpt, "_prefixes", None):
        raise SurgeryError("BASE is a diffusers pipeline folder; point it at one component (e.g. BASE/unet)",
                           path=ckpt.source)
    config = ckpt.config() or {}
    targets_spec = parse_target_modules(target_modules)
    if targets_spec is None:
        default = DEFAULT_TARGETS.get(str(config.get("model_type", "")))
        if default is None:
            raise SurgeryError("no default target modules for this model; pass --target-modules "
                               "(e.g. q_proj,v_proj or all-linear)", path=ckpt.source)
        targets_spec = list(default)
    targets = select_targets(ckpt, targets_spec)
    if not targets:
        sample = sorted({_last(k[: -len(".weight")]) for k in ckpt.keys()
                         if k.endswith(".weight") and len(ckpt.shape(k)) == 2})
        raise SurgeryError(f"target modules {targets_spec} match no 2-D weight in the checkpoint "
                           f"(linear layer names: {', '.join(sample[:12]) or 'none'})", path=ckpt.source)
    conv1d = conv1d_suffixes(config)
    for m in targets:
        _check_weight(ckpt, m + ".weight", method)
        shape = ckpt.shape(m + ".weight")
        if rank > min(shape):
            raise SurgeryError(f"--rank {rank} is larger than the matrix allows (shape {list(shape)}, max rank "
                               f"{min(shape)})", path=ckpt.shard_of(m + ".weight"), tensor=m + ".weight")
    fifo_flags = {_last(m) in conv1d for m in targets}
    if len(fifo_flags) > 1:
        raise SurgeryError("targets mix Conv1D (fan_in_fan_out) and Linear layers, which one PEFT adapter "
                           "cannot hold; target them in separate runs", path=ckpt.source)
    fan_in_fan_out = fifo_flags.pop()

    quantizer = _nf4_quantizer() if quantize == "nf4" else None
    if quantizer is not None:
        _checkpoint_quantizer()  # fail before any work when this build cannot store the residual in NF4
    dev = torch.device(device)
    target_set = set(targets)
    modules: dict[str, AdapterModule] = {}
    report = InitReport(title=f"init {method}: rank {rank}, alpha {alpha:g}{' (rsLoRA)' if rslora else ''}, "
                              f"scale {scale:.4g}", method=method, base=str(base), output=str(output), rank=rank,
                        alpha=alpha, rslora=rslora, scale=scale, niter=niter, seed=seed if niter is not None else None,
                        target_modules=targets_spec, quantize=quantize)
    plan, base_name = _shard_plan(ckpt)
    inputs = [ckpt.root] if ckpt.is_pickle or ckpt.index is not None or Path(str(base)).is_dir() else list(ckpt.files)
    keys = _ordered_keys(ckpt)
    sq = {"w": 0.0, "recon": 0.0, "q_lora": 0.0, "q_pissa": 0.0}
    with atomic_output(output, is_dir=True, inputs=inputs, overwrite=overwrite) as tmp, \
            _progress(len(targets), progress, method) as bar:
        # With --quantize the full-precision residual is an intermediate, quantized into residual/ at the end.
        res_dir = tmp / (".residual-full" if quantizer is not None else "residual")
        res_dir.mkdir()
        writer = ShardedWriter(res_dir, base_name=base_name, metadata=ckpt.metadata or None, plan=plan)
        for key in keys:
            t = ckpt.get_tensor(key)
            module = key[: -len(".weight")] if key.endswith(".weight") else None
            if module not in target_set:
                writer.add(key, t)
                continue
            check_finite(t, path=ckpt.shard_of(key), tensor=key)
            W = t.to(dev)
            Wm = W.T if fan_in_fan_out else W  # math orientation (out, in)
            try:
                f = _init.init_factors(method, Wm, rank, scale, niter=niter, seed=seed)
            except ValueError as exc:
                raise SurgeryError(str(exc), path=ckpt.shard_of(key), tensor=key) from None
            up = f.up.to(adapter_dtype)
            down = f.down.to(adapter_dtype)
            res_m = f.residual.to(t.dtype)
            res_stored = (res_m.T if fan_in_fan_out else res_m).contiguous()
            # What a user gets back: stored residual + stored adapter, against the original W (fp32).
            Wf = Wm.to(torch.float32)
            delta = scale * (up.float() @ down.float())
            w_norm = _frob(Wf)
            recon_err = _frob(res_m.float() + delta - Wf)
            row: dict[str, Any] = {
                "module": module,
                "shape": "x".join(str(s) for s in Wm.shape),
                "energy": _init.captured_energy(Wf, up.float(), down.float(), scale),
                "recon_error": _rel(recon_err, w_norm),
            }
            sq["w"] += w_norm ** 2
            sq["recon"] += recon_err ** 2
            if quantizer is not None:
                # NF4 blocks run over the (out, in) layout: transformers transposes Conv1D weights before
                # quantizing them into bitsandbytes Linear4bit layers, so math orientation is the stored one.
                q = nf4_comparison(Wm, res_m, delta, quantizer)
                sq["q_lora"] += q.pop("_sq_qlora")
                sq["q_pissa"] += q.pop("_sq_qpissa")
                row.update(q)
            writer.add(key, res_stored.cpu())
            report.rows.append(row)
            layout = Layout("linear", fan_in_fan_out, tuple(t.shape))
            modules[module] = AdapterModule(LoRA(down=down.cpu().contiguous(), up=up.cpu().contiguous()),
                                            scale=scale, layout=layout, alpha=alpha, rslora=rslora)
            bar.update(1)
        writer.close()
        if ckpt.root.is_dir() and (Path(str(base)).is_dir() or not Path(str(base)).exists()):
            copy_side_files(ckpt.root, res_dir)
        if quantizer is not None:
            _quantize_residual(res_dir, tmp / "residual", device=device,
                               compute_dtype=COMPUTE_DTYPE_NAMES.get(ckpt.dtype(targets[0] + ".weight"), "fp32"))
            shutil.rmtree(res_dir)

        peft_cfg = _peft_config(targets_spec, targets, rank, alpha, rslora, fan_in_fan_out, config,
                                base_model=str(Path(output) / "residual"))
        adapter = Adapter(modules=modules, base_model=peft_cfg["base_model_name_or_path"], config=peft_cfg,
                          source_format="peft")
        from .formats import save_adapter

        save_adapter(adapter, tmp / "adapter", format="peft")
        side = {"method": method, "niter": niter, "seed": seed if niter is not None else None, "rank": rank,
                "alpha": alpha, "rslora": rslora, "base": str(base), "quantize": quantize,
                "init_lora_weights": _peft_init_name(method, niter)}
        write_json(tmp / "adapter" / INIT_SIDE_FILE, side)
        _fill_totals(report, sq, modules, quantizer is not None)
        report.save_json(str(tmp / "report.json"))
    return report


def _peft_init_name(method: str, niter: int | None) -> str:
    """The ``init_lora_weights`` string PEFT would use for this method (MiLoRA has none in PEFT)."""
    if method == "pissa":
        return "pissa" if niter is None else f"pissa_niter_{niter}"
    return method


def _peft_config(targets_spec: Any, targets: list[str], rank: int, alpha: float, rslora: bool, fifo: bool,
                 model_config: dict[str, Any], *, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": task_type_for(model_config),
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "use_rslora": rslora,
        # all-linear is written as the explicit list so PEFT targets exactly the modules we initialised.
        "target_modules": sorted(targets) if targets_spec == "all-linear" else targets_spec,
        "init_lora_weights": True,  # see the module docstring: "pissa"/"olora" would re-mutate the residual
        "fan_in_fan_out": fifo,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "revision": None,
    }


def _fill_totals(report: InitReport, sq: dict[str, float], modules: dict[str, AdapterModule], nf4: bool) -> None:
    rows = report.rows
    report.totals = {
        "modules": len(rows),
        "adapter_params": sum(m.num_params for m in modules.values()),
        "mean_energy": sum(r["energy"] for r in rows) / len(rows) if rows else 0.0,
        "min_energy": min((r["energy"] for r in rows), default=0.0),
        "max_recon_error": max((r["recon_error"] for r in rows), default=0.0),
        "total_recon_error": _rel(math.sqrt(sq["recon"]), math.sqrt(sq["w"])),
    }
    if nf4:
        ql, qp = math.sqrt(sq["q_lora"]), math.sqrt(sq["q_pissa"])
        report.totals.update({
            "qlora_error": _rel(ql, math.sqrt(sq["w"])),
            "qpissa_error": _rel(qp, math.sqrt(sq["w"])),
            "error_reduction": 1 - qp / ql if ql > 0 else 0.0,
        })
        report.notes.append("qlora_error = ‖W − nf4(W)‖_F/‖W‖_F, qpissa_error = ‖W − (nf4(W_res) + s·BA)‖_F/‖W‖_F "
                            "(over all targeted modules); error_reduction = 1 − qpissa/qlora. Per module also the "
                            "nuclear-norm reduction the PiSSA authors report (nuc_reduction).")
    if report.method == "olora" and any(r["energy"] > 1 for r in rows):
        report.notes.append("OLoRA energy can exceed 1: with scale s ≠ 1 the adapter holds s·Q_rQ_rᵀW")
    report.notes.append("the adapter config says init_lora_weights=true on purpose: PEFT re-runs pissa/olora on "
                        "load, which would subtract the principal part from the residual a second time")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # leave=False: the bar is erased when closed, so an error message stands alone on its line
    return tqdm(total=total, desc=desc, disable=not enabled, unit="module", leave=False)


# --------------------------------------------------------------------------------------------------------
# NF4 (QPiSSA): peft_surgery.surgery.nf4 for the error report, peft_surgery.quantize for the stored residual
# --------------------------------------------------------------------------------------------------------


def _nf4_quantizer():
    """(quantize, dequantize) from peft_surgery.surgery.nf4, or a clear error when this build lacks it."""
    try:
        from .surgery.nf4 import dequantize, quantize_nf4
    except ImportError:
        raise SurgeryError("--quantize nf4 needs the NF4 quantizer (peft_surgery.surgery.nf4), which is not "
                           "available in this build") from None
    return quantize_nf4, dequantize


def _nf4_roundtrip(t: Tensor, quantizer) -> Tensor:
    quantize_nf4, dequantize = quantizer
    packed, state = quantize_nf4(t, blocksize=NF4_BLOCKSIZE, double_quant=NF4_DOUBLE_QUANT)
    return dequantize(packed, state, dtype=torch.float32)


def nf4_comparison(W: Tensor, residual: Tensor, delta: Tensor, quantizer=None) -> dict[str, float]:
    """QLoRA vs QPiSSA quantization error for one weight, all in (out, in) orientation as Linear4bit stores it.

    QLoRA: ``E = W − nf4(W)``; QPiSSA: ``E = W − (nf4(W_res) + s·B·A)``. Returns the relative Frobenius errors,
    ``error_reduction`` = 1 − qpissa/qlora, and the PiSSA authors' nuclear-norm reduction
    ``1 − ‖E_qpissa‖_* / ‖E_qlora‖_*``.
    """
    quantizer = quantizer or _nf4_quantizer()
    Wf = W.float()
    e_lora = Wf - _nf4_roundtrip(W, quantizer)
    e_pissa = Wf - (_nf4_roundtrip(residual, quantizer) + delta.float())
    w = _frob(Wf)
    fl, fp = _frob(e_lora), _frob(e_pissa)
    nl = float(torch.linalg.svdvals(e_lora).double().sum())
    npi = float(torch.linalg.svdvals(e_pissa).double().sum())
    return {
        "qlora_error": _rel(fl, w),
        "qpissa_error": _rel(fp, w),
        "error_reduction": 1 - fp / fl if fl > 0 else 0.0,
        "nuc_reduction": 1 - npi / nl if nl > 0 else 0.0,
        "_sq_qlora": fl ** 2,
        "_sq_qpissa": fp ** 2,
    }


def _checkpoint_quantizer():
    try:
        from .quantize import quantize_checkpoint
    except ImportError:
        raise SurgeryError("--quantize nf4 needs the checkpoint quantizer (peft_surgery.quantize), which is not "
                           "available in this build") from None
    return quantize_checkpoint


def _quantize_residual(src: Path, dst: Path, *, device: str, compute_dtype: str) -> None:
    """Write ``src`` (full-precision residual) NF4-quantized into ``dst`` with the checkpoint quantizer: every
    linear layer as transformers' ``load_in_4bit`` would, the adapted ones holding their residual."""
    quantize_checkpoint = _checkpoint_quantizer()
    quantize_checkpoint(src, dst, quant_type="nf4", blocksize=NF4_BLOCKSIZE, double_quant=NF4_DOUBLE_QUANT,
                        compute_dtype=compute_dtype, device=device)


# --------------------------------------------------------------------------------------------------------
# to-lora
# --------------------------------------------------------------------------------------------------------


def _read_side(*folders: str | os.PathLike | None) -> dict[str, Any]:
    for f in folders:
        if f is None:
            continue
        p = Path(str(f)) / INIT_SIDE_FILE
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except json.JSONDecodeError:
                raise FormatError("invalid JSON", path=p) from None
    return {}


def _method_from(init_value: Any) -> tuple[str | None, bool]:
    """(method, is_randomized) from a PEFT ``init_lora_weights`` value."""
    if not isinstance(init_value, str):
        return None, False
    v = init_value.lower()
    if v.startswith("pissa"):
        return "pissa", "_niter_" in v
    if v in ("olora", "milora"):
        return v, False
    return None, False


def _load_lora(location: str | os.PathLike, *, allow_pickle: bool, what: str) -> Adapter:
    from .formats import load_adapter

    adapter = load_adapter(location, allow_pickle=allow_pickle)
    for name, m in adapter.modules.items():
        if m.kind != "lora" or m.layout.kind != "linear":
            raise SurgeryError(f"{what} module is {m.kind}/{m.layout.kind}; to-lora handles linear LoRA only",
                               path=location, tensor=name)
        if m.is_dora:
            raise SurgeryError(f"{what} module is DoRA; PiSSA/OLoRA conversion is defined for plain LoRA only",
                               path=location, tensor=name)
    return adapter


def _convert_module(name: str, m: AdapterModule, initial: tuple[Tensor, Tensor, float], new_cfg: dict[str, Any],
                    rslora: bool, rank: int | None, device: str) -> tuple[AdapterModule, dict[str, Any]]:
    from .formats.peft import resolve_rank_alpha

    up0, down0, s0 = initial
    # ΔW = s·B·A − s0·B0·A0; fold s0/s into B0 (exactly 1 in PEFT's setting, where both scales agree).
    ratio = s0 / m.scale
    up, down = _init.to_lora((m.delta.up, m.delta.down), (up0 * ratio if ratio != 1 else up0, down0))
    dt = m.delta.up.dtype
    row: dict[str, Any] = {"module": name, "rank_in": m.rank, "rank_out": 2 * m.rank}
    if rank is None:
        r_new, a_new = resolve_rank_alpha(new_cfg, name)
        return m.replace(delta=LoRA(down=down.to(dt), up=up.to(dt)), scale=rank_scale(a_new, r_new, rslora),
                         alpha=a_new, rslora=rslora), row
    nu, nd, err = _init.recompress(up.to(device), down.to(device), rank, m.scale)
    k = int(nd.shape[0])
    row.update({"rank_out": k, "recompress_error": err})
    return m.replace(delta=LoRA(down=nd.cpu().to(dt), up=nu.cpu().to(dt)), scale=1.0, alpha=float(k),
                     rslora=False), row


def to_lora(
    trained: str | os.PathLike,
    output: str | os.PathLike,
    *,
    initial: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    method: str | None = None,
    rank: int | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> ToLoraReport:
    """Turn a trained PiSSA/OLoRA/MiLoRA adapter into a plain LoRA for the original BASE (PEFT's conversion).

    Give ``initial`` (the adapter as initialised, e.g. ``OUT/adapter``) or ``base`` (the original checkpoint; A0/B0
    are recomputed, exact for deterministic inits; randomized ``pissa_niter_K`` is refused). ``rank`` recompresses
    the doubled-rank result with a factored SVD and reports the error.
    """
    if (initial is None) == (base is None):
        raise SurgeryError("give exactly one of --initial (the adapter as initialised) or --base (the original "
                           "checkpoint, to recompute it)")
    if rank is not None and rank < 1:
        raise SurgeryError(f"--rank must be ≥ 1, got {rank}")
    tr = _load_lora(trained, allow_pickle=allow_pickle, what="trained")
    cfg = dict(tr.config)
    rslora = bool(cfg.get("use_rslora", False))
    if rslora and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
        raise SurgeryError("rsLoRA with rank_pattern/alpha_pattern cannot be converted (PEFT refuses it too: the "
                           "pattern alphas would need a √2 factor)", path=trained)
    side = _read_side(trained, initial)
    cfg_method, randomized = _method_from(cfg.get("init_lora_weights"))
    side_method, side_random = _method_from(side.get("init_lora_weights"))
    method = method or cfg_method or side_method
    randomized = randomized or side_random
    if method is not None and method not in _init.INIT_METHODS:
        raise SurgeryError(f"unknown --method '{method}' (known: {', '.join(_init.INIT_METHODS)})")
    report = ToLoraReport(title="to-lora", trained=str(trained), output=str(output),
                          source="initial" if initial is not None else "base", method=method, rank=rank)
    initial_factors: dict[str, tuple[Tensor, Tensor, float]] = {}
    if initial is not None:
        init_ad = _load_lora(initial, allow_pickle=allow_pickle, what="initial")
        for name, m in tr.items():
            if name not in init_ad.modules:
                raise SurgeryError("module of the trained adapter is missing from the initial adapter",
                                   path=initial, tensor=name)
            m0 = init_ad[name]
            if m0.delta.up.shape != m.delta.up.shape or m0.delta.down.shape != m.delta.down.shape:
                raise ShapeMismatchError(
                    f"initial factors {tuple(m0.delta.up.shape)}·{tuple(m0.delta.down.shape)} differ from trained "
                    f"{tuple(m.delta.up.shape)}·{tuple(m.delta.down.shape)}", path=initial, tensor=name)
            initial_factors[name] = (m0.delta.up, m0.delta.down, m0.scale)
        extra = sorted(set(init_ad.modules) - set(tr.modules))
        if extra:
            raise SurgeryError(f"{len(extra)} modules of the initial adapter are missing from the trained adapter",
                               path=trained, tensor=extra[0])
    else:
        if method is None:
            raise SurgeryError("cannot tell how the adapter was initialised (its config says init_lora_weights="
                               f"{cfg.get('init_lora_weights')!r}); pass --method pissa|olora|milora", path=trained)
        if randomized:
            raise SurgeryError("the adapter was initialised with randomized PiSSA (pissa_niter_K), which cannot be "
                               "recomputed from the base; pass --initial with the adapter as initialised",
                               path=trained)
        ck = Checkpoint.open(base, allow_pickle=allow_pickle)
        dev = torch.device(device)
        for name, m in tr.items():
            key = name + ".weight"
            if key not in ck:
                raise SurgeryError("the base has no weight for this adapter module", path=ck.source, tensor=key)
            _check_weight(ck, key, method)
            W = ck.get_tensor(key)
            check_finite(W, path=ck.shard_of(key), tensor=key)
            Wm = W.to(dev)
            Wm = Wm.T if m.layout.fan_in_fan_out else Wm
            if tuple(Wm.shape) != (m.delta.up.shape[0], m.delta.down.shape[1]):
                raise ShapeMismatchError(f"base weight (math shape {tuple(Wm.shape)}) does not fit the adapter "
                                         f"({m.delta.up.shape[0]}x{m.delta.down.shape[1]})",
                                         path=ck.shard_of(key), tensor=key)
            try:
                f = _init.init_factors(method, Wm, m.rank, m.scale)
            except ValueError as exc:
                raise SurgeryError(str(exc), path=ck.shard_of(key), tensor=key) from None
            initial_factors[name] = (f.up.cpu(), f.down.cpu(), m.scale)

    new_cfg = dict(cfg)
    new_cfg["init_lora_weights"] = True
    if rank is None:
        new_cfg["r"] = int(cfg.get("r", 8)) * 2
        new_cfg["lora_alpha"] = _init.converted_alpha(cfg.get("lora_alpha", 8), rslora)
        new_cfg["rank_pattern"] = {k: 2 * v for k, v in (cfg.get("rank_pattern") or {}).items()}
        new_cfg["alpha_pattern"] = {k: 2 * v for k, v in (cfg.get("alpha_pattern") or {}).items()}
    else:
        new_cfg.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}})
    modules: dict[str, AdapterModule] = {}
    max_err = 0.0
    with _progress(len(tr.modules), progress, "to-lora") as bar:
        for name, m in tr.items():
            new_m, row = _convert_module(name, m, initial_factors[name], new_cfg, rslora, rank, device)
            modules[name] = new_m
            report.rows.append(row)
            max_err = max(max_err, row.get("recompress_error", 0.0))
            bar.update(1)
    # The plain LoRA applies to the original BASE, not to the residual the trained adapter was loaded on.
    original = str(base) if base is not None else side.get("base")
    if original:
        new_cfg["base_model_name_or_path"] = original
    out_ad = tr.copy(modules=modules, config=new_cfg, base_model=original or tr.base_model)
    from .formats import save_adapter

    inputs = [p for p in (trained, initial, base) if p is not None]
    notes = save_adapter(out_ad, output, format="peft", overwrite=overwrite, inputs=inputs)
    report.notes.extend(notes)
    report.totals = {"modules": len(modules), "parameters": out_ad.num_params}
    if rank is not None:
        report.totals["max_recompress_error"] = max_err
        report.notes.append("recompress_error = ‖ΔW − ΔW_rank‖_F/‖ΔW‖_F, exact (from the factored SVD spectrum)")
    else:
        report.notes.append("rank and alpha doubled as PEFT does (alpha ×√2 with rsLoRA); ΔW = s·(B·A − B0·A0) "
                            "is exact")
    return report


__all__ = [
    "CONV1D_MODULES",
    "DEFAULT_TARGETS",
    "InitReport",
    "ToLoraReport",
    "init_adapter",
    "module_matches",
    "parse_target_modules",
    "select_targets",
    "to_lora",
]
