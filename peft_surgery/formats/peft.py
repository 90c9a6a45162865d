"""PEFT on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads and writes LoRA (incl. rsLoRA, DoRA, conv, embedding, fan_in_fan_out, ``lora_B.bias``,
``rank_pattern``/``alpha_pattern``), LoHa and LoKr. Unknown config fields are kept. When the adapter still
agrees with its source config (same ranks and scales), that config is written back unchanged, so a
PEFT → canonical → PEFT round trip is bit-for-bit.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, AdapterModule, Layout, LoHa, LoKr, LoRA
from ..checkpoint import Checkpoint, save_tensors, write_json
from ..errors import FormatError, SurgeryError
from ..surgery.delta import alpha_for_scale, rank_scale
from . import Detection, FormatSpec, register

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SUPPORTED_TYPES = ("LORA", "LOHA", "LOKR")

# file suffix -> (canonical field, delta kind)
LORA_SUFFIXES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "bias",
    "lora_embedding_A": "down",
    "lora_embedding_B": "up",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
LOHA_SUFFIXES = {f"hada_{n}": n.replace("_", "") for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
LOKR_SUFFIXES = {f"lokr_{n}": n.replace("_", "") for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}
ALL_SUFFIXES = {**LORA_SUFFIXES, **LOHA_SUFFIXES, **LOKR_SUFFIXES}
_SUFFIX_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<suffix>" + "|".join(re.escape(s) for s in sorted(ALL_SUFFIXES, key=len, reverse=True))
    + r")$"
)
_ADAPTER_NAME_RE = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+)\.default(\.|$)")


def normalize_key(key: str) -> str:
    """Drop the ``base_model.model.`` prefix and a ``.default`` adapter-name infix."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    key = _ADAPTER_NAME_RE.sub(lambda m: f".{m.group(1)}{m.group(2)}", key)
    key = key.replace(".modules_to_save.default.", ".")
    return key


def split_adapter_key(key: str) -> tuple[str, str] | None:
    """``model.q_proj.lora_A.weight`` → (``model.q_proj``, ``lora_A.weight``), or None for other tensors."""
    m = _SUFFIX_RE.match(normalize_key(key))
    if not m:
        return None
    return m.group("module"), m.group("suffix")


# --------------------------------------------------------------------------------------------------------
# PEFT pattern semantics
# --------------------------------------------------------------------------------------------------------


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key k with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for k in patterns:
        try:
            if re.match(rf"(.*\.)?({k})$", module):
                return k
        except re.error:
            if module == k or module.endswith("." + k):
                return k
    return None


def resolve_rank_alpha(config: dict[str, Any], module: str, *, loha_lokr: bool = False) -> tuple[int, float]:
    """(r, alpha) PEFT would use for ``module`` after rank_pattern/alpha_pattern resolution."""
    r = config.get("r", 8)
    alpha = config.get("alpha" if loha_lokr else "lora_alpha", 8)
    rp = config.get("rank_pattern") or {}
    ap = config.get("alpha_pattern") or {}
    k = pattern_key(rp, module)
    if k is not None:
        r = rp[k]
    k = pattern_key(ap, module)
    if k is not None:
        alpha = ap[k]
    return int(r), float(alpha)


# --------------------------------------------------------------------------------------------------------
# Detection and reading
# --------------------------------------------------------------------------------------------------------


def detect(ckpt: Checkpoint) -> Detection | None:
    cfg_present = (ckpt.root / CONFIG_NAME).exists()
    keys = list(ckpt.keys())
    prefixed = sum(k.startswith(PREFIX) for k in keys)
    adapter_keys = sum(split_adapter_key(k) is not None for k in keys)
    if not adapter_keys:
        return None
    evidence = []
    score = 0.0
    if cfg_present:
        try:
            cfg = json.loads((ckpt.root / CONFIG_NAME).read_text())
        except json.JSONDecodeError:
            cfg = {}
        if isinstance(cfg, dict) and "peft_type" in cfg:
            evidence.append(f"{CONFIG_NAME} with peft_type={cfg.get('peft_type')}")
            score += 2
    if prefixed:
        evidence.append(f"{prefixed} keys start with '{PREFIX}'")
        score += 1
    if score == 0:
        return None
    evidence.append(f"{adapter_keys} PEFT adapter tensors (lora_A/lora_B, hada_*, lokr_*)")
    return Detection("peft", score, evidence)


def read_config(ckpt: Checkpoint) -> dict[str, Any]:
    path = ckpt.root / CONFIG_NAME
    if not path.exists():
        raise FormatError(f"missing {CONFIG_NAME} next to the weights (a PEFT adapter folder needs both)",
                          path=ckpt.root)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"invalid JSON ({exc.msg} at line {exc.lineno})", path=path) from None
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise FormatError("not a PEFT config: no 'peft_type'", path=path)
    ptype = str(cfg["peft_type"]).upper()
    if ptype not in SUPPORTED_TYPES:
        raise FormatError(f"unsupported peft_type '{cfg['peft_type']}' (supported: LORA, LOHA, LOKR)", path=path)
    return cfg


def read(ckpt: Checkpoint, *, config: dict[str, Any] | None = None, **_: Any) -> Adapter:
    """Read a PEFT adapter folder into the canonical Adapter."""
    cfg = config if config is not None else read_config(ckpt)
    ptype = str(cfg["peft_type"]).upper()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    key_suffix: dict[str, set[str]] = {}
    extras: dict[str, torch.Tensor] = {}
    for key in ckpt.keys():
        parts = split_adapter_key(key)
        if parts is None:
            extras[normalize_key(key)] = ckpt.get_tensor(key)
            continue
        module, suffix = parts
        groups.setdefault(module, {})[ALL_SUFFIXES[suffix]] = ckpt.get_tensor(key)
        key_suffix.setdefault(module, set()).add(suffix)
    modules: dict[str, AdapterModule] = {}
    for module, parts in groups.items():
        suffixes = key_suffix[module]
        try:
            if ptype == "LORA":
                modules[module] = _read_lora_module(module, parts, suffixes, cfg)
            elif ptype == "LOHA":
                modules[module] = _read_loha_module(module, parts, cfg)
            else:
                modules[module] = _read_lokr_module(module, parts, cfg)
        except KeyError as exc:
            raise FormatError(f"module is missing its {exc.args[0]} tensor", path=ckpt.source, tensor=module) from None
    return Adapter(
        modules=modules,
        modules_to_save=extras,
        base_model=cfg.get("base_model_name_or_path"),
        config=cfg,
        metadata=dict(ckpt.metadata),
        source_format="peft",
    )


def _read_lora_module(module: str, parts: dict[str, torch.Tensor], suffixes: set[str], cfg: dict) -> AdapterModule:
    if "down" not in parts:
        raise KeyError("lora_A")
    if "up" not in parts:
        raise KeyError("lora_B")
    down, up = parts["down"], parts["up"]
    is_embedding = "lora_embedding_A" in suffixes
    rank = int(down.shape[0])
    r_cfg, alpha = resolve_rank_alpha(cfg, module)
    if r_cfg != rank:
        raise FormatError(f"config gives rank {r_cfg} but lora_A has {rank} rows", tensor=module)
    rslora = bool(cfg.get("use_rslora", False))
    if is_embedding:
        layout = Layout("embedding", False, (int(down.shape[1]), int(up.shape[0])))
    elif down.dim() > 2:
        layout = Layout("conv", False, (int(up.shape[0]), int(down.shape[1]), *down.shape[2:]))
    else:
        fifo = bool(cfg.get("fan_in_fan_out", False))
        shape = (int(up.shape[0]), int(down.shape[1]))
        layout = Layout("linear", fifo, shape[::-1] if fifo else shape)
    return AdapterModule(
        delta=LoRA(down=down, up=up),
        scale=rank_scale(alpha, rank, rslora),
        layout=layout,
        magnitude=parts.get("magnitude"),
        bias=parts.get("bias"),
        alpha=alpha,
        rslora=rslora,
    )


def _read_loha_module(module: str, parts: dict[str, torch.Tensor], cfg: dict) -> AdapterModule:
    d = LoHa(parts["w1a"], parts["w1b"], parts["w2a"], parts["w2b"], parts.get("t1"), parts.get("t2"))
    r_cfg, alpha = resolve_rank_alpha(cfg, module, loha_lokr=True)
    if d.t1 is not None:
        shape = (int(d.w1a.shape[1]), int(d.w1b.shape[1]), *d.t1.shape[2:])
        layout = Layout("conv", False, shape)
    else:
        layout = Layout("linear", False, None)  # conv (non-effective) shape is only known from the base
    return AdapterModule(delta=d, scale=rank_scale(alpha, r_cfg), layout=layout, alpha=alpha)


def _read_lokr_module(module: str, parts: dict[str, torch.Tensor], cfg: dict) -> AdapterModule:
    d = LoKr(**{k: parts.get(k) for k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")})
    if d.w1 is None and (d.w1a is None or d.w1b is None):
        raise KeyError("lokr_w1")
    if d.w2 is None and (d.w2a is None or d.w2b is None):
        raise KeyError("lokr_w2")
    r_cfg, alpha = resolve_rank_alpha(cfg, module, loha_lokr=True)
    w2 = d.w2
    kind = "conv" if (w2 is not None and w2.dim() == 4) or d.t2 is not None else "linear"
    return AdapterModule(delta=d, scale=rank_scale(alpha, r_cfg), layout=Layout(kind, False, None), alpha=alpha)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _peft_type(adapter: Adapter) -> str:
    kinds = {m.kind for m in adapter.modules.values()}
    if not kinds:
        return str(adapter.config.get("peft_type", "LORA")).upper()
    if len(kinds) > 1:
        raise SurgeryError(f"PEFT cannot hold mixed adapter types in one adapter ({', '.join(sorted(kinds))}); "
                           "convert them to one type first (convert --type)")
    kind = kinds.pop()
    if kind == "full":
        raise SurgeryError("PEFT has no full-diff adapter type; convert to LoRA first (convert --type lora --rank N)")
    return {"lora": "LORA", "loha": "LOHA", "lokr": "LOKR"}[kind]


def module_rank_for_config(m: AdapterModule) -> int:
    """The ``r`` PEFT must be configured with for this module's tensors."""
    if m.kind != "lokr":
        return m.rank
    d = m.delta
    if d.w2 is not None:
        # PEFT keeps w2 full iff r >= max(out_k, in_n)/2; pick the smallest such r.
        r = math.ceil(max(d.w2.shape[0], d.w2.shape[1]) / 2)
        if d.w1a is not None:
            r = max(r, int(d.w1b.shape[0]))
        return max(r, 1)
    return m.rank


def _module_alpha(m: AdapterModule, r: int, rslora: bool) -> float:
    if m.alpha is not None and math.isclose(rank_scale(m.alpha, r, rslora), m.scale, rel_tol=1e-12, abs_tol=0.0):
        return m.alpha
    alpha = alpha_for_scale(m.scale, r, rslora)
    return float(round(alpha)) if math.isclose(alpha, round(alpha), rel_tol=1e-12) else alpha


def targets_module(cfg: dict[str, Any], name: str) -> bool:
    """Whether PEFT would put an adapter layer on ``name`` under ``cfg`` (target_modules / exclude_modules)."""

    def matches(spec: Any) -> bool:
        if spec is None:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return any(name == t or name.endswith("." + t) for t in spec)

    return matches(cfg.get("target_modules")) and not matches(cfg.get("exclude_modules"))


def config_matches(adapter: Adapter, cfg: dict[str, Any]) -> bool:
    """True when ``cfg`` makes PEFT build exactly this adapter: same targets, ranks, scales and variants.

    Only then is a source config written back unchanged (which keeps PEFT → PEFT round trips bit-exact).
    """
    if not cfg or "peft_type" not in cfg:
        return False
    ptype = str(cfg["peft_type"]).upper()
    lycoris = ptype in ("LOHA", "LOKR")
    rslora = bool(cfg.get("use_rslora", False)) and not lycoris
    if not lycoris:
        mods = list(adapter.modules.values())
        if any(m.rslora != rslora for m in mods):
            return False
        if bool(cfg.get("use_dora", False)) != any(m.is_dora for m in mods):
            return False
        if bool(cfg.get("lora_bias", False)) != any(m.bias is not None for m in mods):
            return False
    for name, m in adapter.modules.items():
        if not targets_module(cfg, name):
            return False
        r, alpha = resolve_rank_alpha(cfg, name, loha_lokr=lycoris)
        if m.kind == "lora" and r != m.rank:
            return False
        if m.kind == "lora" and bool(cfg.get("fan_in_fan_out", False)) != m.layout.fan_in_fan_out \
                and m.layout.kind == "linear":
            return False
        if rank_scale(alpha, r, rslora) != m.scale:
            return False
    return True


def build_config(adapter: Adapter, *, base_model: str | None = None) -> dict[str, Any]:
    """A PEFT config for the adapter, keeping the source config's fields where they still hold."""
    ptype = _peft_type(adapter)
    src = dict(adapter.config) if str(adapter.config.get("peft_type", "")).upper() == ptype else {}
    if base_model is not None:
        src["base_model_name_or_path"] = base_model
    elif adapter.base_model and not src.get("base_model_name_or_path"):
        src["base_model_name_or_path"] = adapter.base_model
    if config_matches(adapter, src):
        return src
    lycoris = ptype != "LORA"
    rslora = (not lycoris) and any(m.rslora for m in adapter.modules.values()) and all(
        m.rslora for m in adapter.modules.values())
    ranks = {n: module_rank_for_config(m) for n, m in adapter.modules.items()}
    alphas = {n: _module_alpha(m, ranks[n], rslora) for n, m in adapter.modules.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    cfg: dict[str, Any] = {k: v for k, v in src.items()}
    cfg.update({
        "peft_type": ptype,
        "r": r0,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
        # Keep the user's target_modules (e.g. ["q_proj", "v_proj"]) while it still covers every module.
        "target_modules": src["target_modules"] if src.get("target_modules") is not None and all(
            targets_module(src, n) for n in adapter.modules) else sorted(adapter.modules),
    })
    if lycoris:
        cfg["alpha"] = a0
        cfg.pop("lora_alpha", None)
        cfg.pop("use_rslora", None)
        cfg.setdefault("rank_dropout", 0.0)
        cfg.setdefault("module_dropout", 0.0)
        cfg.setdefault("init_weights", True)
        if ptype == "LOKR":
            cfg["decompose_both"] = any(m.delta.w1a is not None for m in adapter.modules.values())
            cfg.setdefault("decompose_factor", -1)
            if all(m.delta.w1 is not None and m.delta.w1.shape[0] == m.delta.w1.shape[1] == 1
                   for m in adapter.modules.values()):
                # LoRA → LoKr (kron([[1]], B@A)): PEFT builds a 1×1 w1 only with decompose_factor = 1
                cfg["decompose_factor"] = 1
        cfg["use_effective_conv2d"] = any(
            getattr(m.delta, "t1", None) is not None or getattr(m.delta, "t2", None) is not None
            for m in adapter.modules.values())
    else:
        cfg["lora_alpha"] = a0
        cfg["use_rslora"] = rslora
        cfg["use_dora"] = any(m.is_dora for m in adapter.modules.values())
        fifo = {m.layout.fan_in_fan_out for m in adapter.modules.values() if m.layout.kind == "linear"}
        if len(fifo) > 1:
            raise SurgeryError("PEFT cannot mix fan_in_fan_out and regular linear layers in one adapter")
        cfg["fan_in_fan_out"] = bool(fifo.pop()) if fifo else False
        cfg["lora_bias"] = any(m.bias is not None for m in adapter.modules.values())
        cfg.setdefault("lora_dropout", 0.0)
        cfg.setdefault("bias", "none")
        cfg.setdefault("init_lora_weights", True)
    if adapter.modules_to_save and not cfg.get("modules_to_save"):
        mts = sorted({k.rsplit(".", 1)[0] for k in adapter.modules_to_save if ".base_layer." not in k})
        cfg["modules_to_save"] = mts or None
    cfg.setdefault("task_type", None)
    cfg.setdefault("base_model_name_or_path", adapter.base_model)
    cfg.setdefault("inference_mode", True)
    cfg.setdefault("revision", None)
    return cfg


def state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT file keys."""
    out: dict[str, torch.Tensor] = {}
    for name, m in adapter.modules.items():
        p = PREFIX + name
        d = m.delta
        if isinstance(d, LoRA):
            if d.mid is not None:
                raise SurgeryError("PEFT LoRA has no Tucker (lora_mid) layers; resize or convert it first",
                                   tensor=name)
            if m.layout.kind == "embedding":
                out[f"{p}.lora_embedding_A"] = d.down
                out[f"{p}.lora_embedding_B"] = d.up
            else:
                out[f"{p}.lora_A.weight"] = d.down
                out[f"{p}.lora_B.weight"] = d.up
            if m.bias is not None:
                if not m.bias_scaled:
                    raise SurgeryError("an unscaled bias delta cannot be stored as PEFT lora_B.bias", tensor=name)
                out[f"{p}.lora_B.bias"] = m.bias
            if m.magnitude is not None:
                out[f"{p}.lora_magnitude_vector"] = _peft_magnitude(m)
        elif isinstance(d, LoHa):
            for field_name, suffix in (("w1a", "w1_a"), ("w1b", "w1_b"), ("w2a", "w2_a"), ("w2b", "w2_b"),
                                       ("t1", "t1"), ("t2", "t2")):
                t = getattr(d, field_name)
                if t is not None:
                    out[f"{p}.hada_{suffix}"] = t
        elif isinstance(d, LoKr):
            for field_name, suffix in (("w1", "w1"), ("w1a", "w1_a"), ("w1b", "w1_b"), ("w2", "w2"),
                                       ("w2a", "w2_a"), ("w2b", "w2_b"), ("t2", "t2")):
                t = getattr(d, field_name)
                if t is not None:
                    out[f"{p}.lokr_{suffix}"] = t
        else:
            raise SurgeryError("PEFT cannot store a full-diff module", tensor=name)
        if m.kind != "lora" and (m.magnitude is not None or m.bias is not None):
            raise SurgeryError("PEFT LoHa/LoKr cannot store DoRA magnitudes or bias deltas", tensor=name)
    for key, t in adapter.modules_to_save.items():
        out[PREFIX + key] = t
    return out


def _peft_magnitude(m: AdapterModule) -> torch.Tensor:
    mag = m.magnitude
    assert mag is not None
    if getattr(m, "magnitude_axis", "out") != "out":
        raise SurgeryError("PEFT's DoRA normalises per output row, but this module's DoRA magnitude is per input "
                           "column (legacy LyCORIS dora_scale of shape (1, in)); it cannot be written exactly")
    if m.layout.kind == "conv":
        ndim = len(m.layout.weight_shape) if m.layout.weight_shape else 4
        shape = (1, mag.numel(), *([1] * (ndim - 2)))
        return mag.reshape(shape) if tuple(mag.shape) != shape else mag
    return mag.reshape(-1) if mag.dim() != 1 else mag


def write(adapter: Adapter, folder: Path, *, base_model: str | None = None, **_: Any) -> list[str]:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``folder``."""
    notes = []
    # A diffusion adapter with component-prefixed names (unet., text_encoder., ...): a PEFT adapter's base model
    # is one component, so strip the prefix, or write one sub-folder per component.
    from .arch import diffusion_components

    parts = diffusion_components(adapter)
    if parts is not None:
        if len(parts) > 1:
            for comp, sub in parts.items():
                (folder / comp).mkdir()
                notes += [f"{comp}: {n}" for n in write(sub, folder / comp, base_model=base_model)]
            notes.append(f"PEFT adapters cannot span model components: wrote one PEFT adapter per component in "
                         f"sub-folders {', '.join(c + '/' for c in parts)}")
            return notes
        comp, adapter = next(iter(parts.items()))
        notes.append(f"stripped the '{comp}.' prefix from module names: the PEFT adapter's base model is the {comp}")
    cfg = build_config(adapter, base_model=base_model)
    if str(adapter.config.get("peft_type", "")).upper() and cfg is not adapter.config and adapter.config \
            and not config_matches(adapter, adapter.config):
        notes.append("ranks/scales changed: wrote a new r/alpha with rank_pattern/alpha_pattern")
    save_tensors(state_dict(adapter), folder / WEIGHTS_NAME, {"format": "pt"})
    write_json(folder / CONFIG_NAME, cfg)
    return notes


register(FormatSpec("peft", detect, read, write, output_is_dir=True,
                    description="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)"))
