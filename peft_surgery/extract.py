"""Streaming LoRA extraction from a full fine-tune: ``ΔW = FT − BASE`` → truncated SVD → LoRA factors.

One tensor pair is read at a time (a background thread reads the next pair while the current one is being
decomposed), so memory stays near a few times the largest tensor. The two checkpoints may be sharded
differently and stored in different dtypes.

What happens to each tensor is decided by a small table of name rules plus the tensor's rank:

* 2-D ``*.weight`` → LoRA (``fan_in_fan_out`` for GPT-2 style ``Conv1D`` weights, from config.json);
* ≥3-D ``*.weight`` → conv LoRA (kernel in A, 1×1 B);
* embeddings / output heads → ``modules_to_save`` (full FT tensor), or LoRA with ``embed_lora=True``;
* changed 1-D tensors: biases of LoRA'd modules become ``lora_B.bias``; other 1-D tensors (norms) are kept
  full in ``modules_to_save`` (left out with ``skip_1d=True``);
* unchanged tensors are skipped.

Ranks: fixed (``rank``), per module (``energy`` = fraction of the exact ‖ΔW‖², ``sv_ratio``), or a global
parameter budget (``param_budget`` / ``size``) allocated across modules by :mod:`peft_surgery.surgery.rank`.

>>> adapter, report = extract_adapter("base-model", "finetuned-model", rank=16)  # doctest: +SKIP
>>> adapter, report = extract("base-model", "finetuned-model", "out-adapter", energy=0.9)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .adapter import Adapter, AdapterModule, Layout, LoRA, check_finite
from .checkpoint import Checkpoint, check_output, parse_size
from .errors import ShapeMismatchError, SurgeryError
from .report import Report, require_matplotlib
from .surgery.delta import alpha_for_scale, rank_scale
from .surgery.linalg import SVD, select_rank, split_scale, truncated_svd
from .surgery.rank import ModuleSpectrum, allocate_budget, best_uniform_rank, lora_cost_per_rank

# --------------------------------------------------------------------------------------------------------
# Architecture knowledge (data, not code)
# --------------------------------------------------------------------------------------------------------

# Name rules, first match wins: which tensors are embeddings or output heads.
ROLE_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(lm_head|embed_out)\.weight$", "head"),
    (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_positions"
     r"|tok_embeddings|embed_in|shared)\.weight$", "embedding"),
)

# model_type → weights that transformers stores as (in, out) (``Conv1D``), i.e. PEFT ``fan_in_fan_out``.
_GPT2_CONV1D = r"\.(attn\.c_attn|attn\.q_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$"
FAN_IN_FAN_OUT: dict[str, str] = {
    "gpt2": _GPT2_CONV1D,
    "imagegpt": _GPT2_CONV1D,
    "decision_transformer": _GPT2_CONV1D,
    "openai-gpt": r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$",
}
# When config.json is absent: a key pattern that identifies the model type.
MODEL_TYPE_KEY_HINTS: tuple[tuple[str, str], ...] = ((r"(^|\.)h\.\d+\.attn\.c_attn\.weight$", "gpt2"),)

# Tied input embedding → the output-head parameter that shares it (when tie_word_embeddings is on).
TIED_HEADS: dict[str, str] = {
    "model.embed_tokens.weight": "lm_head.weight",
    "transformer.wte.weight": "lm_head.weight",
    "model.decoder.embed_tokens.weight": "lm_head.weight",
    "transformer.word_embeddings.weight": "lm_head.weight",
    "gpt_neox.embed_in.weight": "embed_out.weight",
}

# architectures[0] suffix → PEFT task_type (so PeftModel.from_pretrained builds the matching wrapper).
TASK_TYPES: tuple[tuple[str, str], ...] = (
    (r"(ForCausalLM|LMHeadModel)$", "CAUSAL_LM"),
    (r"ForSequenceClassification$", "SEQ_CLS"),
    (r"ForTokenClassification$", "TOKEN_CLS"),
    (r"ForQuestionAnswering$", "QUESTION_ANS"),
)

# Randomized SVD settings: sketch width k + max(10, k) and 3 power iterations keep the Frobenius error within
# ~0.5% of Eckart–Young even for noise-like (flat) spectra, the hardest case (see tests/test_extract_math.py).
MIN_OVERSAMPLE = 10
POWER_ITERATIONS = 3
SPECTRUM_KEEP = 64  # singular values kept per module in the report (for --plot)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------


@dataclass
class ExtractReport(Report):
    """Per-module rows (module, kind, shape, rank, rel_error, energy, params) and totals."""

    base: str | None = None
    finetuned: str | None = None
    output: str | None = None
    written: bool = False
    format: str = "peft"
    skipped: dict[str, list[str]] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not any(r["params"] for r in self.rows)

    def to_text(self, max_rows: int | None = 40) -> str:
        saved = self.rows
        self.rows = [{k: ("-" if v is None else v) for k, v in r.items()} for r in saved]
        try:
            return super().to_text(max_rows)
        finally:
            self.rows = saved

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["empty"] = self.empty
        return d


# --------------------------------------------------------------------------------------------------------
# Options and planning
# --------------------------------------------------------------------------------------------------------


@dataclass
class ExtractOptions:
    rank: int | None = None
    energy: float | None = None
    sv_ratio: float | None = None
    param_budget: int | None = None
    max_rank: int | None = None
    svd: str = "auto"
    seed: int = 0
    alpha: float | None = None
    rslora: bool = False
    distribute_scale: bool = False
    embed_lora: bool = False
    skip_1d: bool = False
    skip_mismatched: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    min_diff: float = 0.0
    dtype: torch.dtype | None = None
    device: str = "auto"

    @property
    def mode(self) -> str:
        if self.param_budget is not None:
            return "budget"
        if self.energy is not None:
            return "energy"
        if self.sv_ratio is not None:
            return "sv_ratio"
        return "rank"


@dataclass
class Task:
    """One tensor to compare: ``key`` in FT, ``base_key`` in BASE (different only for tied heads)."""

    key: str
    base_key: str
    ft_key: str
    role: str  # linear | conv | embedding | head | bias | vector | other
    shape: tuple[int, ...]
    fan_in_fan_out: bool = False

    @property
    def module(self) -> str:
        return self.key.rsplit(".", 1)[0] if "." in self.key else self.key

    @property
    def lora_kind(self) -> str | None:
        """Layout kind if this tensor becomes a LoRA (with the given options), else None."""
        return {"linear": "linear", "conv": "conv", "head": "linear", "embedding": "embedding"}.get(self.role)


def _role(key: str, shape: tuple[int, ...]) -> str:
    for pattern, role in ROLE_RULES:
        if re.search(pattern, key) and len(shape) == 2:
            return role
    if key.endswith(".weight") and len(shape) == 2:
        return "linear"
    if key.endswith(".weight") and len(shape) >= 3:
        return "conv"
    if len(shape) == 1:
        return "bias" if key.endswith(".bias") else "vector"
    return "other"


def _model_type(ckpt: Checkpoint) -> tuple[str | None, dict[str, Any] | None]:
    try:
        cfg = ckpt.config()
    except SurgeryError:
        cfg = None
    mt = cfg.get("model_type") if isinstance(cfg, dict) else None
    if mt is None:
        for pattern, hint in MODEL_TYPE_KEY_HINTS:
            if any(re.search(pattern, k) for k in ckpt.keys()):
                return hint, cfg
    return mt, cfg


def _task_type(cfg: dict[str, Any] | None) -> str | None:
    archs = (cfg or {}).get("architectures") or []
    for arch in archs:
        for pattern, task in TASK_TYPES:
            if re.search(pattern, str(arch)):
                return task
    return None


def _display(location: Any) -> str:
    return str(location)


def plan_tasks(base: Checkpoint, ft: Checkpoint, opts: ExtractOptions) -> tuple[list[Task], dict[str, list[str]],
                                                                           dict[str, Any]]:
    """Match BASE and FT tensors and decide each one's role; return (tasks, skipped lists, model info)."""
    skipped: dict[str, list[str]] = {"mismatched": [], "excluded": []}
    base_type, base_cfg = _model_type(base)
    ft_type, ft_cfg = _model_type(ft)
    if base_type and ft_type and base_type != ft_type:
        raise ShapeMismatchError(f"different architectures: BASE is '{base_type}' ({base.source}) but FT is "
                                 f"'{ft_type}'", path=ft.source)
    fifo_re = FAN_IN_FAN_OUT.get(ft_type or base_type or "")
    ft_keys = list(ft.keys())
    base_keys = set(base.keys())
    problems: list[tuple[str, str]] = []
    for k in ft_keys:
        if k not in base_keys:
            problems.append((k, f"is in FT ({ft.source}) but not in BASE ({base.source})"))
        elif base.shape(k) != ft.shape(k):
            problems.append((k, f"has shape {list(ft.shape(k))} in FT but {list(base.shape(k))} in BASE"))
    ft_set = set(ft_keys)
    for k in sorted(base_keys - ft_set):
        problems.append((k, f"is in BASE ({base.source}) but not in FT ({ft.source})"))
    if problems and not opts.skip_mismatched:
        key, msg = problems[0]
        more = f" (and {len(problems) - 1} more mismatched tensors)" if len(problems) > 1 else ""
        raise ShapeMismatchError(f"{msg}{more}; the models do not match (pass --skip-mismatched to skip such "
                                 "tensors)", tensor=key)
    bad = {k for k, _ in problems}
    skipped["mismatched"] = sorted(bad)
    include = [re.compile(p) for p in opts.include]
    exclude = [re.compile(p) for p in opts.exclude]

    def wanted(key: str) -> bool:
        if include and not any(p.search(key) for p in include):
            return False
        return not any(p.search(key) for p in exclude)

    tasks: list[Task] = []
    # Read in FT's file order so the reader walks each shard sequentially.
    position = {k: i for i, k in enumerate(ft_keys)}
    order = sorted(ft_keys, key=lambda k: (str(ft.shard_of(k)), position[k])) if len(ft.files) > 1 else ft_keys
    for k in order:
        if k in bad:
            continue
        if not wanted(k):
            skipped["excluded"].append(k)
            continue
        shape = tuple(ft.shape(k))
        role = _role(k, shape)
        tasks.append(Task(k, k, k, role, shape, bool(fifo_re and role == "linear" and re.search(fifo_re, k))))
    # Tied output head: the checkpoint stores only the embedding; the head changes with it.
    cfg = ft_cfg or base_cfg
    tied = bool(cfg and cfg.get("tie_word_embeddings", True) and _task_type(cfg) == "CAUSAL_LM")
    if tied:
        for emb, head in TIED_HEADS.items():
            if emb in ft_set and emb not in bad and head not in ft_set and head not in base_keys and wanted(head):
                tasks.append(Task(head, emb, emb, "head", tuple(ft.shape(emb))))
    info = {"model_type": ft_type or base_type, "task_type": _task_type(cfg), "tied": tied}
    return tasks, skipped, info


# --------------------------------------------------------------------------------------------------------
# Reading (background thread) and devices
# --------------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SurgeryError(f"--device {device} requested but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise SurgeryError(f"unknown device '{device}' (cpu, cuda, cuda:N or auto)") from None


_DONE = object()


class _Prefetcher:
    """Reads task tensors in a background thread, ``depth`` pairs ahead, so I/O overlaps compute."""

    def __init__(self, tasks: Sequence[Task], load, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._tasks = tasks
        self._load = load
        self._thread = threading.Thread(target=self._run, name="peft-surgery-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for t in self._tasks:
                if self._stop.is_set() or not self._put((t, self._load(t))):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[Task, tuple[Tensor, Tensor]]]:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=5)


class _SyncReader:
    """Reads in the computing thread (same interface as :class:`_Prefetcher`)."""

    def __init__(self, tasks: Sequence[Task], load):
        self._tasks, self._load = tasks, load

    def __iter__(self) -> Iterator[tuple[Task, tuple[Tensor, Tensor]]]:
        for t in self._tasks:
            yield t, self._load(t)

    def close(self) -> None:
        pass


def _overlap_reads(device: torch.device) -> bool:
    """Read in a background thread when that thread has a core of its own: always with a GPU (the CPU is
    idle while the GPU computes), on CPU only if torch leaves a core free. On a CPU where torch's threads use
    every core, a reader thread only preempts them (measured ~1.5× slower on 2 cores), so read inline."""
    if device.type != "cpu":
        return True
    return torch.get_num_threads() < (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------------------------------------


def _module_seed(seed: int, name: str) -> int:
    # Independent of processing order, so a module's factors do not depend on what else is extracted.
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def decompose(M: Tensor, rank: int, *, method: str = "auto", seed: int = 0) -> SVD:
    """Top-``rank`` SVD of ``M`` with our randomized settings (oversample max(10, rank), 3 power iterations).

    ``auto`` uses the randomized solver when ``4·(rank + oversample) ≤ min(M.shape)`` and the exact thin SVD
    otherwise; either way the result's ``total_energy`` is the exact ‖M‖_F².
    """
    rank = max(1, min(int(rank), min(M.shape)))
    p = max(MIN_OVERSAMPLE, rank)
    return truncated_svd(M, rank, method=method, oversample=p, niter=POWER_ITERATIONS, seed=seed)


def decompose_adaptive(M: Tensor, *, energy: float | None = None, sv_ratio: float | None = None,
                       max_rank: int | None = None, method: str = "auto", seed: int = 0,
                       start_rank: int = 32) -> SVD:
    """An SVD deep enough to apply an ``energy`` / ``sv_ratio`` criterion (doubling the randomized rank
    until the criterion is met inside the computed spectrum, or falling back to the exact SVD)."""
    small = min(M.shape)
    if method == "exact":
        return truncated_svd(M, None, method="exact")
    k = min(max_rank, small) if max_rank else min(start_rank, small)
    while True:
        p = max(MIN_OVERSAMPLE, k)
        if method == "auto" and 4 * (k + p) > small:
            return truncated_svd(M, None, method="exact")
        svd = truncated_svd(M, k, method="randomized", oversample=p, niter=POWER_ITERATIONS, seed=seed)
        if k >= small or (max_rank and k >= max_rank):
            return svd
        if select_rank(svd, energy=energy, sv_ratio=sv_ratio) < k:
            return svd
        k = min(2 * k, small)


def truncation_error(svd: SVD, rank: int, M: Tensor | None) -> float:
    """‖M − M_r‖/‖M‖ of the rank-``rank`` truncation; from the spectrum, or directly when it is small
    (the spectral formula loses precision to cancellation near zero)."""
    if svd.total_energy <= 0:
        return 0.0
    err = svd.relative_error(rank)
    if M is not None and err < 1e-2:
        approx = (svd.U[:, :rank] * svd.S[:rank]) @ svd.Vh[:rank]
        num = float(torch.linalg.vector_norm((M - approx.to(M.dtype)).double()))
        err = num / math.sqrt(svd.total_energy)
    return err


def _to_math(diff: Tensor, role: str, layout: Layout) -> Tensor:
    """The stored ΔW as the 2-D matrix (out, in·k) that the LoRA factors approximate."""
    if layout.transposed:
        return diff.transpose(0, 1)
    if diff.dim() > 2:
        return diff.reshape(diff.shape[0], -1)
    return diff


def _layout(task: Task) -> Layout:
    kind = task.lora_kind or "linear"
    return Layout(kind, task.fan_in_fan_out, tuple(task.shape))


# --------------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A decomposed module waiting for its rank (budget mode keeps these, with factors on CPU)."""

    task: Task
    svd: SVD
    out_dtype: torch.dtype
    M: Tensor | None = None  # dense ΔW (single-pass mode only, for the direct error check)


def _factors(p: _Pending, rank: int, opts: ExtractOptions) -> tuple[AdapterModule, dict[str, Any]]:
    task = p.task
    layout = _layout(task)
    if opts.alpha is not None:
        alpha = float(opts.alpha)
        scale = rank_scale(alpha, rank, opts.rslora)
    else:
        scale = 1.0
        alpha = alpha_for_scale(1.0, rank, opts.rslora)
    up, down = split_scale(p.svd, rank, scale=scale, distribute=opts.distribute_scale)
    if layout.kind == "conv":
        k = task.shape[2:]
        down = down.reshape(rank, task.shape[1], *k)
        up = up.reshape(task.shape[0], rank, *([1] * len(k)))
    module = AdapterModule(
        delta=LoRA(down=down.to("cpu", p.out_dtype).contiguous(), up=up.to("cpu", p.out_dtype).contiguous()),
        scale=scale, layout=layout, alpha=alpha, rslora=opts.rslora)
    total = p.svd.total_energy
    row = {
        "module": task.module,
        "kind": "embedding" if layout.kind == "embedding" else ("conv" if layout.kind == "conv" else "lora"),
        "shape": "x".join(map(str, task.shape)),
        "rank": rank,
        "rel_error": truncation_error(p.svd, rank, p.M),
        "energy": min(1.0, p.svd.retained_energy(rank) / total) if total > 0 else 1.0,
        "params": module.num_params,
    }
    return module, row


def _full_row(task: Task, kind: str, t: Tensor) -> dict[str, Any]:
    return {"module": task.key, "kind": kind, "shape": "x".join(map(str, task.shape)), "rank": None,
            "rel_error": 0.0, "energy": 1.0, "params": int(t.numel())}


def extract_adapter(
    base: str | os.PathLike | Checkpoint,
    finetuned: str | os.PathLike | Checkpoint,
    *,
    rank: int | None = None,
    energy: float | None = None,
    sv_ratio: float | None = None,
    param_budget: int | None = None,
    size: str | int | None = None,
    max_rank: int | None = None,
    svd: str = "auto",
    seed: int = 0,
    alpha: float | None = None,
    rslora: bool = False,
    distribute_scale: bool = False,
    embed_lora: bool = False,
    skip_1d: bool = False,
    skip_mismatched: bool = False,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    min_diff: float = 0.0,
    dtype: torch.dtype | None = None,
    device: str = "auto",
    allow_pickle: bool = False,
    subfolder: str | None = None,
    progress: bool = False,
) -> tuple[Adapter, ExtractReport]:
    """Extract a LoRA adapter approximating ``finetuned − base``; return (adapter, report).

    Exactly one of ``rank`` / ``energy`` / ``sv_ratio`` / ``param_budget`` / ``size`` may be given (default:
    rank 16). ``size`` ("50MB") is turned into a parameter budget with the output dtype's item size. The
    adapter is empty (and the report says so) when the models are identical.
    """
    t0 = time.perf_counter()
    modes = [x is not None for x in (rank, energy, sv_ratio, param_budget, size)]
    if sum(modes) > 1:
        raise SurgeryError("give only one of --rank, --energy, --sv-ratio, --param-budget, --size")
    if not any(modes):
        rank = 16
    if rank is not None and rank < 1:
        raise SurgeryError(f"--rank must be ≥ 1, got {rank}")
    if max_rank is not None and max_rank < 1:
        raise SurgeryError(f"--max-rank must be ≥ 1, got {max_rank}")
    if energy is not None and not 0 < energy <= 1:
        raise SurgeryError(f"--energy must be in (0, 1], got {energy}")
    if sv_ratio is not None and sv_ratio < 1:
        raise SurgeryError(f"--sv-ratio must be ≥ 1, got {sv_ratio}")
    if svd not in ("auto", "exact", "randomized"):
        raise SurgeryError(f"unknown --svd '{svd}' (auto, exact, randomized)")
    for pattern in list(include) + list(exclude):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SurgeryError(f"invalid regex '{pattern}': {exc}") from None
    dev = resolve_device(device)
    opts = ExtractOptions(rank=rank, energy=energy, sv_ratio=sv_ratio, param_budget=param_budget,
                          max_rank=max_rank, svd=svd, seed=seed, alpha=alpha, rslora=rslora,
                          distribute_scale=distribute_scale, embed_lora=embed_lora, skip_1d=skip_1d,
                          skip_mismatched=skip_mismatched, include=tuple(include), exclude=tuple(exclude),
                          min_diff=min_diff, dtype=dtype, device=str(dev))
    base_ckpt = base if isinstance(base, Checkpoint) else Checkpoint.open(base, allow_pickle=allow_pickle,
                                                                          subfolder=subfolder)
    ft_ckpt = finetuned if isinstance(finetuned, Checkpoint) else Checkpoint.open(
        finetuned, allow_pickle=allow_pickle, subfolder=subfolder)
    tasks, skipped, info = plan_tasks(base_ckpt, ft_ckpt, opts)
    if size is not None:
        itemsize = torch.empty((), dtype=dtype or _dominant_dtype(ft_ckpt, tasks)).element_size()
        opts.param_budget = parse_size(size) // itemsize
    if opts.param_budget is not None and opts.param_budget < 1:
        raise SurgeryError(f"the parameter budget must be positive, got {opts.param_budget}")

    report = ExtractReport(title=f"extract {_display(getattr(finetuned, 'source', finetuned))} − "
                                 f"{_display(getattr(base, 'source', base))}",
                           base=str(getattr(base, "source", base)), finetuned=str(getattr(finetuned, "source",
                                                                                              finetuned)))
    adapter = Adapter(base_model=str(getattr(base, "source", base)),
                      config={"peft_type": "LORA", "task_type": info["task_type"]})
    state = _State(adapter=adapter, report=report, opts=opts, device=dev)
    skipped["unchanged"] = []
    skipped["non_float"] = []
    skipped["1d"] = []
    report.skipped = skipped

    def load(task: Task) -> tuple[Tensor, Tensor]:
        b = base_ckpt.get_tensor(task.base_key)
        f = ft_ckpt.get_tensor(task.ft_key)
        if dev.type == "cuda":
            b, f = b.pin_memory(), f.pin_memory()
        return b, f

    budget_mode = opts.param_budget is not None
    caps: dict[str, int] = {}
    if budget_mode:
        caps = _budget_caps(tasks, opts)
    bar = _progress(len(tasks), progress, "spectra" if budget_mode else "extract")
    reader = _Prefetcher(tasks, load) if _overlap_reads(dev) else _SyncReader(tasks, load)
    try:
        for task, (b, f) in reader:
            _process(task, b, f, state, base_ckpt, ft_ckpt, caps)
            bar.update(1)
    finally:
        reader.close()
        bar.close()

    if budget_mode:
        _allocate_and_build(state)
    _finish_biases(state)
    _totals(state, time.perf_counter() - t0, info)
    return adapter, report


def _dominant_dtype(ft: Checkpoint, tasks: Sequence[Task]) -> torch.dtype:
    for t in tasks:
        dt = ft.dtype(t.ft_key)
        if dt.is_floating_point and t.lora_kind:
            return dt
    return torch.float32


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only on a terminal, so logs and pipes stay clean
    return tqdm(total=total, desc=desc, unit="tensor", disable=None if enabled else True, leave=False)


@dataclass
class _State:
    adapter: Adapter
    report: ExtractReport
    opts: ExtractOptions
    device: torch.device
    pending: list[_Pending] = field(default_factory=list)
    biases: dict[str, tuple[Task, Tensor, Tensor]] = field(default_factory=dict)  # module → (task, Δb, FT b)
    full_rows: list[dict[str, Any]] = field(default_factory=list)
    lora_rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    energies: dict[str, float] = field(default_factory=dict)  # module → exact ‖ΔW‖²


def _budget_caps(tasks: Sequence[Task], opts: ExtractOptions) -> dict[str, int]:
    """Per-module rank cap for the first (spectrum) pass: --max-rank, or 4× the uniform rank that fits the
    budget (at least 64), never more than the budget could buy for that module alone."""
    lora = [t for t in tasks if _becomes_lora(t, opts)]
    shapes = {t.key: _math_shape(t) for t in lora}
    dummy = [ModuleSpectrum(t.key, torch.empty(min(shapes[t.key][0], math.prod(shapes[t.key][1:]))), 0.0,
                            lora_cost_per_rank(shapes[t.key])) for t in lora]
    budget = int(opts.param_budget or 0)
    default_cap = max(64, 4 * best_uniform_rank(dummy, budget))
    cap = opts.max_rank or default_cap
    return {s.name: max(1, min(cap, s.cap, budget // max(s.cost_per_rank, 1))) for s in dummy}


def _math_shape(task: Task) -> tuple[int, ...]:
    s = task.shape
    if task.lora_kind == "embedding" or task.fan_in_fan_out:
        return (s[1], s[0], *s[2:])
    return tuple(s)


def _becomes_lora(task: Task, opts: ExtractOptions) -> bool:
    if task.role in ("embedding", "head"):
        return opts.embed_lora
    return task.role in ("linear", "conv")


def _out_dtype(t: Tensor, opts: ExtractOptions) -> torch.dtype:
    return opts.dtype or (t.dtype if t.dtype.is_floating_point else torch.float32)


def _process(task: Task, b: Tensor, f: Tensor, st: _State, base_ckpt: Checkpoint, ft_ckpt: Checkpoint,
             caps: dict[str, int]) -> None:
    opts = st.opts
    if not (b.dtype.is_floating_point and f.dtype.is_floating_point):
        if not torch.equal(b, f.to(b.dtype)):
            st.report.skipped["non_float"].append(task.key)
        return
    dev = st.device
    b = b.to(dev, non_blocking=True)
    f = f.to(dev, non_blocking=True)
    # NaN ≠ NaN, so a tensor with NaN never compares equal and always reaches the finite check below.
    if b.dtype == f.dtype and torch.equal(b, f):
        st.report.skipped["unchanged"].append(task.key)
        return
    work = torch.float64 if torch.float64 in (b.dtype, f.dtype) else torch.float32
    diff = f.to(work)  # one float copy; subtracting in place (the bf16/fp16 operand is promoted on the fly)
    diff = diff.sub_(b) if diff.data_ptr() != f.data_ptr() else diff - b
    amax = float(diff.abs().max())
    if not math.isfinite(amax):
        # NaN/Inf in either input makes ΔW non-finite; only now pay for finding (and naming) the culprit.
        check_finite(f, path=ft_ckpt.shard_of(task.ft_key), tensor=task.ft_key)
        check_finite(b, path=base_ckpt.shard_of(task.base_key), tensor=task.base_key)
        raise SurgeryError("FT − BASE overflows to Inf", path=ft_ckpt.shard_of(task.ft_key), tensor=task.ft_key)
    del b
    if amax <= opts.min_diff:  # also catches equal values stored in different dtypes
        st.report.skipped["unchanged"].append(task.key)
        return
    out_dtype = _out_dtype(f, opts)
    if task.role in ("bias", "vector"):
        if opts.skip_1d:
            st.report.skipped["1d"].append(task.key)
            return
        if task.role == "bias":
            st.biases[task.module] = (task, diff.to("cpu"), f.to("cpu", out_dtype))
            return
    if not _becomes_lora(task, opts):
        # modules_to_save: the full fine-tuned tensor replaces the base one
        full = f.to("cpu", out_dtype)
        st.adapter.modules_to_save[task.key] = full
        st.full_rows.append(_full_row(task, "full", full))
        return
    del f
    layout = _layout(task)
    M = _to_math(diff, task.role, layout)
    seed = _module_seed(opts.seed, task.module)
    if opts.param_budget is not None:
        svd = decompose(M, caps[task.key], method=opts.svd, seed=seed)
        st.pending.append(_Pending(task, _to_cpu(svd), out_dtype))
        st.energies[task.module] = svd.total_energy
        _keep_spectrum(st, task, svd)
        return
    if opts.mode == "rank":
        r = min(int(opts.rank or 1), opts.max_rank or 1 << 30)
        svd = decompose(M, r, method=opts.svd, seed=seed)
        chosen = svd.rank
    else:
        svd = decompose_adaptive(M, energy=opts.energy, sv_ratio=opts.sv_ratio, max_rank=opts.max_rank,
                                 method=opts.svd, seed=seed)
        chosen = select_rank(svd, energy=opts.energy, sv_ratio=opts.sv_ratio, max_rank=opts.max_rank)
    st.energies[task.module] = svd.total_energy
    _keep_spectrum(st, task, svd)
    module, row = _factors(_Pending(task, svd, out_dtype, M), chosen, opts)
    st.adapter.modules[task.module] = module
    st.lora_rows[task.module] = row


def _to_cpu(svd: SVD) -> SVD:
    return SVD(svd.U.to("cpu"), svd.S.to("cpu"), svd.Vh.to("cpu"), svd.total_energy)


def _keep_spectrum(st: _State, task: Task, svd: SVD) -> None:
    st.report.spectra[task.module] = [float(x) for x in svd.S[:SPECTRUM_KEEP].to("cpu")]


def _allocate_and_build(st: _State) -> None:
    opts = st.opts
    fixed = sum(int(t.numel()) for t in st.adapter.modules_to_save.values())
    fixed += sum(int(db.numel()) for _, db, _ in st.biases.values())
    budget = int(opts.param_budget or 0)
    lora_budget = budget - fixed
    if lora_budget < 0:
        raise SurgeryError(
            f"the parameter budget ({budget:,}) is smaller than the tensors that must be kept whole ({fixed:,}: "
            "embeddings, norms, biases); raise the budget, or use --skip-1d, --exclude or --embed-lora")
    spectra = [ModuleSpectrum(p.task.module, p.svd.S, p.svd.total_energy, lora_cost_per_rank(_math_shape(p.task)))
               for p in st.pending]
    alloc = allocate_budget(spectra, lora_budget)
    st.report.notes.append(
        f"budget: {budget:,} parameters ({fixed:,} in full tensors/biases, {alloc.params:,} in LoRA factors); "
        f"allocation '{alloc.method}' retains {alloc.retained_energy / alloc.total_energy:.4%} of ‖ΔW‖² "
        f"(best uniform rank {alloc.uniform_rank}: {alloc.uniform_retained_energy / alloc.total_energy:.4%})"
        if alloc.total_energy > 0 else f"budget: {budget:,} parameters")
    for p in st.pending:
        r = alloc.ranks.get(p.task.module, 0)
        if r <= 0:
            st.lora_rows[p.task.module] = {
                "module": p.task.module, "kind": "dropped", "shape": "x".join(map(str, p.task.shape)),
                "rank": 0, "rel_error": 1.0 if p.svd.total_energy > 0 else 0.0, "energy": 0.0, "params": 0}
            continue
        module, row = _factors(p, r, opts)
        st.adapter.modules[p.task.module] = module
        st.lora_rows[p.task.module] = row
    st.pending.clear()


def _finish_biases(st: _State) -> None:
    """Attach bias deltas to LoRA modules (PEFT ``lora_B.bias``); otherwise keep the FT bias whole."""
    for module, (task, db, fb) in st.biases.items():
        m = st.adapter.modules.get(module)
        if m is not None and m.kind == "lora":
            m.bias = (db / m.scale).to(fb.dtype)
            row = _full_row(task, "bias", db)
            st.full_rows.append(row)
        else:
            st.adapter.modules_to_save[task.key] = fb
            st.full_rows.append(_full_row(task, "full", fb))


def _totals(st: _State, wall: float, info: dict[str, Any]) -> None:
    rep = st.report
    lora = list(st.lora_rows.values())
    rep.rows = lora + st.full_rows
    errs = [r["rel_error"] for r in lora]
    # overall error over all LoRA modules: sqrt(Σ err_i²‖ΔW_i‖² / Σ ‖ΔW_i‖²)
    energies = [st.energies.get(r["module"], 0.0) for r in lora]
    total_e = sum(energies)
    overall = math.sqrt(sum(e * r["rel_error"] ** 2 for e, r in zip(energies, lora)) / total_e) if total_e else 0.0
    n_params = st.adapter.num_params
    itemsize_bytes = sum(t.numel() * t.element_size() for m in st.adapter.modules.values() for _, t in m.tensors())
    itemsize_bytes += sum(t.numel() * t.element_size() for t in st.adapter.modules_to_save.values())
    ranks = [r["rank"] for r in lora if r["rank"]]
    rep.totals = {
        "lora_modules": len(st.adapter.modules),
        "full_tensors": len(st.adapter.modules_to_save),
        "unchanged_skipped": len(rep.skipped.get("unchanged", [])),
        "mismatched_skipped": len(rep.skipped.get("mismatched", [])),
        "parameters": n_params,
        "adapter_bytes": int(itemsize_bytes),
        "rank_min": min(ranks) if ranks else 0,
        "rank_max": max(ranks) if ranks else 0,
        "mean_rel_error": sum(errs) / len(errs) if errs else 0.0,
        "max_rel_error": max(errs) if errs else 0.0,
        "overall_rel_error": overall,
        "rank_mode": st.opts.mode,
        "svd": st.opts.svd,
        "device": st.opts.device,
        "wall_time_s": round(wall, 3),
    }
    for kind, names in rep.skipped.items():
        if names and kind != "unchanged":
            shown = ", ".join(names[:5]) + (f", … ({len(names) - 5} more)" if len(names) > 5 else "")
            rep.notes.append(f"skipped ({kind}): {shown}")
    if not st.adapter.modules and not st.adapter.modules_to_save:
        rep.notes.append("the models are identical (no changed tensors): the adapter is empty, nothing was written")


# --------------------------------------------------------------------------------------------------------
# Top level: extract + write, and the plot
# --------------------------------------------------------------------------------------------------------


def default_output_name(finetuned: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
                        sv_ratio: float | None = None, param_budget: int | None = None,
                        size: str | int | None = None) -> str:
    """``<ft name>-lora-r16`` (or ``-e0.95``, ``-sv20``, ``-p1000000``, ``-50MB``), in the current folder."""
    name = str(finetuned).rstrip("/").split("@", 1)[0]
    name = Path(name).name or "adapter"
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if energy is not None:
        tag = f"e{energy:g}"
    elif sv_ratio is not None:
        tag = f"sv{sv_ratio:g}"
    elif param_budget is not None:
        tag = f"p{param_budget}"
    elif size is not None:
        tag = str(size).replace(" ", "")
    else:
        tag = f"r{rank or 16}"
    return f"{name}-lora-{tag}"


def _local_inputs(*locations: Any) -> list[str]:
    return [str(x) for x in locations if not isinstance(x, Checkpoint) and Path(str(x)).exists()]


def check_writable_format(format: str) -> None:
    from .formats import FORMATS, _ensure_loaded

    _ensure_loaded()
    if format not in FORMATS or FORMATS[format].write is None:
        known = sorted(n for n, s in FORMATS.items() if s.write is not None)
        raise SurgeryError(f"cannot write format '{format}' (writable: {', '.join(known)})")


def extract(
    base: str | os.PathLike | Checkpoint,
    finetuned: str | os.PathLike | Checkpoint,
    output: str | os.PathLike | None = None,
    *,
    format: str = "peft",
    overwrite: bool = False,
    write_options: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[Adapter, ExtractReport]:
    """Extract (see :func:`extract_adapter`) and, when ``output`` is given, write it atomically.

    The output is checked before any work (exists without ``overwrite``, or inside an input → error), and
    nothing is written when the adapter is empty (identical models): ``report.written`` is False then.
    """
    inputs = _local_inputs(base, finetuned)
    if output is not None:
        check_writable_format(format)
        check_output(Path(output), inputs=inputs, overwrite=overwrite)
    adapter, report = extract_adapter(base, finetuned, **options)
    report.format = format
    if output is None:
        return adapter, report
    report.output = str(output)
    if not adapter.modules and not adapter.modules_to_save:
        return adapter, report
    from .formats import save_adapter

    wopts = dict(write_options or {})
    if format != "peft":
        wopts.setdefault("base", str(getattr(base, "source", base)))
    notes = save_adapter(adapter, output, format=format, overwrite=overwrite, inputs=inputs, **wopts)
    # The PEFT writer remarks when ranks differ from a *source* config; ours is new, so that remark is noise.
    report.notes.extend(n for n in notes if not n.startswith("ranks/scales changed"))
    report.written = True
    return adapter, report


def plot_report(report: ExtractReport, path: str | os.PathLike, *, max_modules: int = 200) -> None:
    """Per-module relative error (bars) and normalised singular-value spectra (lines) into one PNG."""
    mpl = require_matplotlib()
    plt = mpl.pyplot
    rows = [r for r in report.rows if r["kind"] in ("lora", "conv", "embedding", "dropped")][:max_modules]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax1.bar(range(len(rows)), [r["rel_error"] for r in rows], color="tab:blue")
    ax1.set_xlabel("module (in file order)")
    ax1.set_ylabel("relative Frobenius error ‖ΔW − BA‖ / ‖ΔW‖")
    ax1.set_title("per-module error")
    for r in rows:
        s = report.spectra.get(r["module"])
        if s and s[0] > 0:
            ax2.semilogy(range(1, len(s) + 1), [x / s[0] for x in s], lw=0.8, alpha=0.6)
            if r["rank"]:
                k = min(r["rank"], len(s))
                ax2.plot([k], [s[k - 1] / s[0]], "k.", ms=3)
    ax2.set_xlabel("index")
    ax2.set_ylabel("σ_i / σ_1")
    ax2.set_title("singular-value spectra (dots: chosen rank)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


__all__ = [
    "ExtractReport",
    "decompose",
    "decompose_adaptive",
    "default_output_name",
    "extract",
    "extract_adapter",
    "plan_tasks",
    "truncation_error",
    "plot_report",
]
