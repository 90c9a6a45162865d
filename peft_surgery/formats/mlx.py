"""MLX-LM adapters: ``adapters.safetensors`` + MLX ``adapter_config.json``.

MLX-LM stores ``<module>.lora_a`` with shape ``(in, r)`` and ``<module>.lora_b`` with shape ``(r, out)`` (the
transpose of PEFT's A/B) and applies ``y = x·Wᵀ + scale · (x @ lora_a @ lora_b)`` with an *absolute* ``scale``
from ``lora_parameters.scale`` (not alpha/r). DoRA adds ``<module>.m`` (the per-output-row magnitude).
Module paths are MLX's module tree, which for the supported LMs is the transformers one
(``model.layers.N.self_attn.q_proj``), so names pass through unchanged.

Conversion is exact both ways: transpose both factors, ``scale`` ↔ PEFT ``lora_alpha / r``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, AdapterModule, Layout, LoRA
from ..checkpoint import Checkpoint, save_tensors, write_json
from ..errors import FormatError, SurgeryError
from . import Detection, FormatSpec, register

WEIGHTS_NAME = "adapters.safetensors"
CONFIG_NAME = "adapter_config.json"
SUFFIXES = {"lora_a": "a", "lora_b": "b", "m": "m"}
_KEY_RE = re.compile(r"^(?P<module>.+)\.(?P<suffix>lora_a|lora_b|m)$")
_LAYER_RE = re.compile(r"^(?P<prefix>.*?\.?layers)\.(?P<idx>\d+)\.(?P<rest>.+)$")
# Module leaf names that are embeddings in the transformers/MLX LMs (MLX's LoRAEmbedding uses the same a/b
# orientation as its LoRALinear, so only the layout tag differs).
EMBEDDING_LEAVES = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")


def split_key(key: str) -> tuple[str, str] | None:
    m = _KEY_RE.match(key)
    if not m:
        return None
    return m.group("module"), m.group("suffix")


def _read_config(ckpt: Checkpoint) -> dict[str, Any] | None:
    path = ckpt.root / CONFIG_NAME
    if not path.exists():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=path) from None
    return cfg if isinstance(cfg, dict) else None


def detect(ckpt: Checkpoint) -> Detection | None:
    keys = list(ckpt.keys())
    ab = [k for k in keys if k.endswith(".lora_a") or k.endswith(".lora_b")]
    if not ab:
        return None
    evidence = [f"{len(ab)} tensors named '<module>.lora_a/.lora_b' (MLX-LM naming)"]
    score = 2.0
    try:
        cfg = _read_config(ckpt)
    except FormatError:
        cfg = None
    if cfg is not None and "lora_parameters" in cfg:
        evidence.append(f"{CONFIG_NAME} with lora_parameters (MLX-LM training config)")
        score += 1
    if any(f.name == WEIGHTS_NAME for f in ckpt.files):
        evidence.append(f"file name {WEIGHTS_NAME}")
        score += 0.5
    return Detection("mlx", score, evidence)


def _is_embedding(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in EMBEDDING_LEAVES


def read(ckpt: Checkpoint, *, scale: float | None = None, **_: Any) -> Adapter:
    """Read an MLX-LM adapter. ``scale`` overrides ``lora_parameters.scale`` (needed when there is no config)."""
    cfg = _read_config(ckpt) or {}
    if cfg.get("fine_tune_type", "lora") == "full":
        raise FormatError("MLX 'fine_tune_type: full' checkpoints hold full weights, not an adapter",
                          path=ckpt.root / CONFIG_NAME)
    params = cfg.get("lora_parameters") or {}
    if scale is None:
        if "scale" not in params:
            raise FormatError(f"no lora_parameters.scale in {CONFIG_NAME}: MLX applies an absolute scale that "
                              "cannot be guessed (pass scale=...)", path=ckpt.root / CONFIG_NAME)
        scale = float(params["scale"])
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key in ckpt.keys():
        parts = split_key(key)
        if parts is None:
            raise FormatError("not an MLX LoRA tensor (expected <module>.lora_a, .lora_b or .m)",
                              path=ckpt.source, tensor=key)
        module, suffix = parts
        groups.setdefault(module, {})[SUFFIXES[suffix]] = ckpt.get_tensor(key)
    modules: dict[str, AdapterModule] = {}
    for module, parts in groups.items():
        for need, name in (("a", "lora_a"), ("b", "lora_b")):
            if need not in parts:
                raise FormatError(f"module is missing its {name} tensor", path=ckpt.source, tensor=f"{module}.{name}")
        a, b = parts["a"], parts["b"]
        if a.dim() != 2 or b.dim() != 2:
            raise FormatError(f"per-expert (MoE SwitchLinear) or non-2-D LoRA tensors are not supported "
                              f"(lora_a {tuple(a.shape)}, lora_b {tuple(b.shape)})",
                              path=ckpt.source, tensor=f"{module}.lora_a")
        if a.shape[1] != b.shape[0]:
            raise FormatError(f"rank mismatch: lora_a {tuple(a.shape)} vs lora_b {tuple(b.shape)}",
                              path=ckpt.source, tensor=f"{module}.lora_b")
        down, up = a.T.contiguous(), b.T.contiguous()  # PEFT orientation: A (r, in), B (out, r)
        if _is_embedding(module):
            layout = Layout("embedding", False, (int(down.shape[1]), int(up.shape[0])))
        else:
            layout = Layout("linear", False, (int(up.shape[0]), int(down.shape[1])))
        mag = parts.get("m")
        modules[module] = AdapterModule(delta=LoRA(down=down, up=up), scale=scale, layout=layout,
                                        magnitude=mag, alpha=None)
    return Adapter(modules=modules, base_model=cfg.get("model"), config=cfg, metadata=dict(ckpt.metadata),
                   source_format="mlx")


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------


def _layer_keys(names: list[str]) -> tuple[list[str], list[int]]:
    keys, layers = set(), set()
    for n in names:
        m = _LAYER_RE.match(n)
        if m:
            keys.add(m.group("rest"))
            layers.add(int(m.group("idx")))
        else:
            keys.add(n)
    return sorted(keys), sorted(layers)


def write(adapter: Adapter, folder: Path, *, base: str | None = None, num_layers: int | None = None,
          **_: Any) -> list[str]:
    """Write ``adapters.safetensors`` + ``adapter_config.json`` for MLX-LM.

    MLX has one absolute scale and one rank for every module: modules with another scale get the ratio folded
    into ``lora_b``, lower ranks are zero-padded (both exact, and noted).
    """
    notes: list[str] = []
    for name, m in adapter.modules.items():
        if m.kind != "lora":
            raise SurgeryError(f"MLX only stores LoRA; this module is {m.kind} (convert --type lora first)",
                               tensor=name)
        if m.delta.mid is not None:
            raise SurgeryError("MLX has no Tucker (lora_mid) conv LoRA", tensor=name)
        if m.layout.kind == "conv":
            raise SurgeryError("MLX LoRA has no conv layers", tensor=name)
        if m.bias is not None:
            raise SurgeryError("MLX LoRA cannot store a bias delta", tensor=name)
    if adapter.modules_to_save:
        raise SurgeryError("MLX adapters cannot carry modules_to_save tensors: "
                           + ", ".join(sorted(adapter.modules_to_save)[:3]))
    scale = Counter(m.scale for m in adapter.modules.values()).most_common(1)[0][0]
    rank = max(m.rank for m in adapter.modules.values())
    tensors: dict[str, torch.Tensor] = {}
    folded, padded = [], []
    for name, m in adapter.modules.items():
        d = m.delta
        a, b = d.down.T, d.up.T  # (in, r), (r, out)
        if m.scale != scale:
            b = (b.to(torch.float32) * (m.scale / scale)).to(d.up.dtype)
            folded.append(name)
        if m.rank < rank:
            a = torch.cat([a, a.new_zeros(a.shape[0], rank - m.rank)], dim=1)
            b = torch.cat([b, b.new_zeros(rank - m.rank, b.shape[1])], dim=0)
            padded.append(name)
        tensors[f"{name}.lora_a"] = a.contiguous()
        tensors[f"{name}.lora_b"] = b.contiguous()
        if m.magnitude is not None:
            tensors[f"{name}.m"] = m.magnitude.reshape(-1).contiguous()
        if m.layout.fan_in_fan_out:
            notes.append(f"{name}: fan_in_fan_out (Conv1D) layout written in MLX's Linear orientation")
    if folded:
        notes.append(f"MLX has one scale: {len(folded)} modules had another scale, folded into lora_b")
    if padded:
        notes.append(f"MLX has one rank: {len(padded)} modules zero-padded to rank {rank} (exact)")
    keys, layers = _layer_keys(list(adapter.modules))
    src = dict(adapter.config) if "lora_parameters" in adapter.config else {}
    cfg: dict[str, Any] = dict(src)
    dora = any(m.is_dora for m in adapter.modules.values())
    params = dict(src.get("lora_parameters") or {})
    params.update({"rank": rank, "scale": scale, "keys": keys})
    params.setdefault("dropout", 0.0)
    params.pop("alpha", None)  # not used by MLX-LM; a stale value would only mislead
    cfg["lora_parameters"] = params
    cfg["fine_tune_type"] = "dora" if dora else "lora"
    if "use_dora" in cfg:
        cfg["use_dora"] = dora
    if num_layers is None and src:
        num_layers = src.get("num_layers", src.get("lora_layers"))
    if num_layers is None:
        # MLX adapts the *last* num_layers blocks; without the base depth the best bound is max index + 1.
        num_layers = (max(layers) + 1) if layers else 0
        if layers and min(layers) > 0:
            notes.append("num_layers counts from layer 0 to the last adapted layer; pass num_layers= (the "
                         "base depth minus the first adapted layer) if MLX should create fewer LoRA layers")
    cfg["num_layers"] = num_layers
    if "lora_layers" in cfg:
        cfg["lora_layers"] = num_layers
    model = base or adapter.base_model or cfg.get("model")
    if model:
        cfg["model"] = model
    save_tensors(tensors, folder / WEIGHTS_NAME, None)
    write_json(folder / CONFIG_NAME, cfg)
    return notes


register(FormatSpec("mlx", detect, read, write, output_is_dir=True,
                    description="MLX-LM adapter folder (adapters.safetensors + adapter_config.json)",
                    default_filename=WEIGHTS_NAME))
