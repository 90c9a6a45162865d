"""diffusers LoRA files (``pytorch_lora_weights.safetensors``), three generations:

* **current** (``save_lora_weights``): ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` (+ ``lora_B.bias``,
  ``lora_magnitude_vector``, PEFT-LoKr ``lokr_*``), component ∈ unet, text_encoder, text_encoder_2, transformer, …;
  the PEFT ``LoraConfig`` of each component is in the safetensors header under ``lora_adapter_metadata``
  (keys prefixed ``<component>.``; un-prefixed for a model-level ``save_lora_adapter`` file, whose tensor keys
  are un-prefixed too).
* **0.2x**: ``unet.<module>.lora.down.weight`` / ``lora.up.weight``; text encoder ``…lora_linear_layer.down.weight``.
* **legacy attention processors**: ``<block>.attn1.processor.to_q_lora.down.weight``; ``to_out_lora`` targets
  ``to_out.0`` (``out_proj`` in a text encoder).

Scale: from ``lora_adapter_metadata`` (lora_alpha/alpha_pattern/rank_pattern/use_rslora, PEFT semantics), else
from ``<module>.alpha`` tensors (alpha/r), else 1 — diffusers' convention alpha = r.

The writer emits the current format. Per-module alphas, rsLoRA and DoRA go into ``lora_adapter_metadata``
exactly as diffusers' own ``save_lora_weights`` does (diffusers' loader builds the ``LoraConfig`` from it), so
the factors are written unchanged. ``fold_scale=True`` instead bakes every scale into ``lora_B`` and declares
alpha = r, for consumers that ignore the metadata (ComfyUI).

Also read here: a folder of per-component PEFT adapters (``unet/adapter_config.json`` …), which is what the PEFT
writer produces for a multi-component adapter.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, AdapterModule, Layout, LoKr, LoRA
from ..checkpoint import Checkpoint, save_tensors
from ..errors import FormatError, SurgeryError
from ..surgery.delta import rank_scale
from . import Detection, FormatSpec, peft as peft_format, register
from .arch import DIFFUSION_COMPONENTS, component_of_unprefixed, split_component

METADATA_KEY = "lora_adapter_metadata"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_LEGACY_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}
_LEGACY_TE_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
_LOKR = "lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|lokr_t2"

# (regex on the key without its component prefix, variant, field); first match wins
_KEY_PATTERNS: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"^(?P<m>.+?)(?:\.processor)?\.to_(?P<p>q|k|v|out)_lora\.(?P<h>down|up)\.weight$"), "legacy", ""),
    (re.compile(r"^(?P<m>.+)\.lora_linear_layer\.(?P<h>down|up)\.weight$"), "0.2x", ""),
    (re.compile(r"^(?P<m>.+)\.lora\.(?P<h>down|up)\.weight$"), "0.2x", ""),
    (re.compile(r"^(?P<m>.+)\.lora_(?P<h>A|B)(?:\.default)?\.weight$"), "current", ""),
    (re.compile(r"^(?P<m>.+)\.lora_B(?:\.default)?\.bias$"), "current", "bias"),
    (re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$"), "current", "magnitude"),
    (re.compile(rf"^(?P<m>.+)\.(?P<l>{_LOKR})$"), "current", "lokr"),
    (re.compile(r"^(?P<m>.+)\.alpha$"), "", "alpha"),
]
_HALF = {"down": "down", "up": "up", "A": "down", "B": "up"}


def parse_key(key: str) -> tuple[str | None, str, str, str] | None:
    """A diffusers key → (component or None, module path, field, variant), or None if it is not one.

    ``field`` is down/up/bias/magnitude/alpha or a PEFT LoKr field (w1, w1a, …).
    """
    comp, rest = split_component(key)
    if rest.startswith("base_model.model."):
        rest = rest[len("base_model.model."):]
    for rx, variant, kind in _KEY_PATTERNS:
        m = rx.match(rest)
        if not m:
            continue
        module = m.group("m")
        if variant == "legacy":
            proj = m.group("p")
            table = _LEGACY_TE_PROJ if module.endswith("self_attn") else _LEGACY_PROJ
            module = f"{module}.{table[proj]}"
        if kind == "":
            field = _HALF[m.group("h")]
        elif kind == "lokr":
            field = m.group("l")[len("lokr_"):].replace("_", "")
        else:
            field = kind
        return comp, module, field, variant
    return None


def _parse_metadata(meta: dict[str, str]) -> dict[str, Any] | None:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError(f"{METADATA_KEY} in the safetensors header is not valid JSON") from None
    return cfg if isinstance(cfg, dict) else None


def component_configs(raw: dict[str, Any] | None, default_component: str) -> dict[str, dict[str, Any]]:
    """Split ``lora_adapter_metadata`` into one PEFT config per component (prefixed or un-prefixed keys)."""
    if not raw:
        return {}
    out: dict[str, dict[str, Any]] = {}
    plain: dict[str, Any] = {}
    for k, v in raw.items():
        comp, rest = split_component(k)
        if comp is not None and "." not in rest:
            out.setdefault(comp, {})[rest] = v
        else:
            plain[k] = v
    if plain:
        out.setdefault(default_component, {}).update(plain)
    return out


# --------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------


def _component_peft_dirs(ckpt: Checkpoint) -> list[str]:
    return [c for c in DIFFUSION_COMPONENTS if (ckpt.root / c / peft_format.CONFIG_NAME).exists()
            and any(k.startswith(f"{c}.base_model.model.") for k in ckpt.keys())]


def detect(ckpt: Checkpoint) -> Detection | None:
    keys = list(ckpt.keys())
    if not keys:
        return None
    comp_dirs = _component_peft_dirs(ckpt)
    if comp_dirs:
        return Detection("diffusers", 3.0, [f"one PEFT adapter folder per component: {', '.join(comp_dirs)}"])
    parsed = [parse_key(k) for k in keys]
    if any(p is None for p in parsed):
        return None
    if all(p[2] == "alpha" for p in parsed):  # type: ignore[index]
        return None
    variants = Counter(p[3] for p in parsed if p and p[3])
    comps = Counter(p[0] for p in parsed if p)
    meta = ckpt.metadata or {}
    evidence = []
    names = {"current": "current format (lora_A/lora_B)", "0.2x": "0.2x format (lora.down/lora.up)",
             "legacy": "legacy attention-processor format (processor.to_q_lora)"}
    evidence += [f"{names[v]}: {n} tensors" for v, n in variants.most_common()]
    prefixed = {c: n for c, n in comps.items() if c is not None}
    if prefixed:
        evidence.append("component prefixes " + ", ".join(f"{c}. ×{n}" for c, n in prefixed.items()))
    score = 0.0
    if METADATA_KEY in meta:
        evidence.append(f"safetensors metadata has {METADATA_KEY}")
        score += 3.0
    if set(variants) - {"current"}:
        score += 3.0  # the old spellings are unique to diffusers
    if prefixed:
        # transformer.* may be a Flux/SD3 file that a model-specific reader understands better
        score += 3.0 if set(prefixed) - {"transformer", "transformer_2"} else 1.0
    if score == 0:
        if Path(ckpt.files[0]).name == WEIGHT_NAME if ckpt.files else False:
            evidence.append(f"file name {WEIGHT_NAME}")
            score = 1.0
        elif not (ckpt.root / peft_format.CONFIG_NAME).exists():
            evidence.append("un-prefixed lora_A/lora_B keys without adapter_config.json")
            score = 0.5
        else:
            return None
    return Detection("diffusers", score, evidence)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


def _read_component_peft(ckpt: Checkpoint, comps: list[str]) -> Adapter:
    modules: dict[str, AdapterModule] = {}
    mts: dict[str, Tensor] = {}
    cfgs: dict[str, dict[str, Any]] = {}
    for c in comps:
        sub = peft_format.read(Checkpoint.open(ckpt.root / c))
        modules.update({f"{c}.{k}": m for k, m in sub.modules.items()})
        mts.update({f"{c}.{k}": t for k, t in sub.modules_to_save.items()})
        cfgs[c] = sub.config
    return Adapter(modules=modules, modules_to_save=mts, config={"_components": cfgs},
                   metadata=dict(ckpt.metadata), source_format="peft-components")


def read(ckpt: Checkpoint, *, base: str | None = None, component: str | None = None, **_: Any) -> Adapter:
    """Read any of the three diffusers generations into canonical ``<component>.<module>`` names."""
    comp_dirs = _component_peft_dirs(ckpt)
    if comp_dirs:
        return _read_component_peft(ckpt, comp_dirs)
    parts: dict[tuple[str | None, str], dict[str, Tensor]] = {}
    variants: set[str] = set()
    for key in ckpt.keys():
        p = parse_key(key)
        if p is None:
            raise FormatError("not a diffusers LoRA tensor", path=ckpt.source, tensor=key)
        comp, module, field, variant = p
        if field in parts.setdefault((comp, module), {}):
            raise FormatError(f"two tensors give the {field} of module {module}", path=ckpt.source, tensor=key)
        parts[(comp, module)][field] = ckpt.get_tensor(key)
        if variant:
            variants.add(variant)
    unprefixed = [m for (c, m) in parts if c is None]
    default_comp = component
    if default_comp is None and unprefixed:
        default_comp = component_of_unprefixed(unprefixed, base)
    raw = _parse_metadata(dict(ckpt.metadata or {}))
    cfgs = component_configs(raw, default_comp or "unet")
    notes: list[str] = []
    if unprefixed:
        notes.append(f"un-prefixed module names read as {default_comp} modules")
    modules: dict[str, AdapterModule] = {}
    for (comp, module), t in parts.items():
        c = comp or default_comp
        name = f"{c}.{module}"
        modules[name] = _module(t, cfgs.get(c or ""), module, path=ckpt.source, name=name)
    config: dict[str, Any] = {"_notes": notes, "_variants": sorted(variants)}
    if cfgs:
        config["_components"] = cfgs
    return Adapter(modules=modules, config=config, metadata=dict(ckpt.metadata or {}), source_format="diffusers")


def _module(t: dict[str, Tensor], cfg: dict[str, Any] | None, module: str, *, path: object, name: str
            ) -> AdapterModule:
    alpha_t = t.pop("alpha", None)
    lokr_fields = {k: v for k, v in t.items() if k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")}
    if lokr_fields:
        d = LoKr(**lokr_fields)
        if d.w1 is None and (d.w1a is None or d.w1b is None) or d.w2 is None and (d.w2a is None or d.w2b is None):
            raise FormatError("incomplete LoKr module", path=path, tensor=name)
        if cfg and str(cfg.get("peft_type", "LOKR")).upper() == "LOKR":
            r, alpha = peft_format.resolve_rank_alpha(cfg, module, loha_lokr=True)
            scale, hint = rank_scale(alpha, r), alpha
        else:
            scale, hint = 1.0, None  # diffusers bakes LoKr alphas into the weights (alpha = r)
        kind = "conv" if (d.w2 is not None and d.w2.dim() == 4) or d.t2 is not None else "linear"
        return AdapterModule(delta=d, scale=scale, layout=Layout(kind, False, None), alpha=hint)
    if "down" not in t or "up" not in t:
        have, miss = ("A (down)", "B (up)") if "down" in t else ("B (up)", "A (down)")
        raise FormatError(f"incomplete LoRA: module has lora {have} without lora {miss}", path=path, tensor=name)
    down, up = t["down"], t["up"]
    rank = int(down.shape[0])
    rslora = False
    if cfg:
        r_cfg, alpha = peft_format.resolve_rank_alpha(cfg, module)
        rslora = bool(cfg.get("use_rslora", False))
        if r_cfg != rank:
            raise FormatError(f"{METADATA_KEY} gives rank {r_cfg} but lora_A has {rank} rows", path=path, tensor=name)
        scale, hint = rank_scale(alpha, rank, rslora), alpha
    elif alpha_t is not None:
        hint = float(alpha_t.float().reshape(-1)[0])
        scale = rank_scale(hint, rank)
    else:
        scale, hint = 1.0, None
    if down.dim() > 2:
        layout = Layout("conv", False, (int(up.shape[0]), int(down.shape[1]), *down.shape[2:]))
    else:
        layout = Layout("linear", False, (int(up.shape[0]), int(down.shape[1])))
    mag = t.get("magnitude")
    return AdapterModule(delta=LoRA(down=down, up=up), scale=scale, layout=layout,
                         magnitude=None if mag is None else mag.reshape(-1), bias=t.get("bias"), alpha=hint,
                         rslora=rslora)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _fold_tucker(d: LoRA) -> LoRA:
    """Tucker ``lora_mid`` folded into a full-kernel down (exact: same rank, same ΔW)."""
    dt = torch.float64
    r = d.down.shape[0]
    down = torch.einsum("ij...,jc->ic...", d.mid.to(dt), d.down.reshape(r, -1).to(dt)).to(d.down.dtype)
    return LoRA(down=down.contiguous(), up=d.up)


def _prepare(name: str, m: AdapterModule, fold_scale: bool, notes: list[str]) -> AdapterModule:
    """Make one module expressible as a PEFT LoRA/LoKr module in a diffusers file."""
    if m.kind == "loha":
        raise SurgeryError("diffusers cannot load LoHa; write kohya/lycoris or peft, or convert with --type lora",
                           tensor=name)
    if m.kind == "full":
        raise SurgeryError("diffusers LoRA files cannot hold a full diff; convert with --type lora --rank N",
                           tensor=name)
    if m.magnitude is not None and m.magnitude_axis != "out":
        raise SurgeryError("diffusers/PEFT DoRA normalises per output row; this module's dora_scale is per input "
                           "column (legacy LyCORIS)", tensor=name)
    if m.layout.kind == "embedding":
        raise SurgeryError("diffusers LoRA files do not hold embedding LoRA", tensor=name)
    if m.kind == "lokr" and (m.magnitude is not None or m.bias is not None):
        raise SurgeryError("PEFT LoKr (as loaded by diffusers) has no DoRA magnitude or bias delta", tensor=name)
    if isinstance(m.delta, LoRA) and m.delta.mid is not None:
        m = m.replace(delta=_fold_tucker(m.delta))
        notes.append("folded Tucker lora_mid cores into the conv lora_A (exact)")
    if m.bias is not None and not m.bias_scaled:
        if m.scale == 0:
            raise SurgeryError("an unscaled bias delta on a module with scale 0 cannot be a lora_B.bias", tensor=name)
        if m.scale != 1.0:
            m = m.replace(bias=(m.bias.double() / m.scale).to(m.bias.dtype))
            notes.append("divided unscaled bias deltas (diff_b) by the module scale to store them as lora_B.bias")
        m = m.replace(bias_scaled=True)
    if m.magnitude is not None and m.kind == "lora" and m.layout.kind == "conv":
        pass
    if fold_scale and m.scale != 1.0:
        if isinstance(m.delta, LoRA):
            up = (m.delta.up.double() * m.scale).to(m.delta.up.dtype)
            bias = None if m.bias is None else (m.bias.double() * m.scale).to(m.bias.dtype)
            m = m.replace(delta=LoRA(down=m.delta.down, up=up), bias=bias, scale=1.0, alpha=None, rslora=False)
        else:
            raise SurgeryError("fold_scale supports LoRA modules only", tensor=name)
    return m


_TE_HEAD = "text_model."


def _portable_patterns(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop a leading ``text_model.`` from target_modules/rank_pattern/alpha_pattern keys.

    PEFT matches these as suffixes, and transformers 5's CLIPTextModel has no ``text_model`` wrapper (its modules
    are ``encoder.layers.…``), so the shortened keys match CLIP text encoders of every transformers version.
    """
    def strip(k: str) -> str:
        return k[len(_TE_HEAD):] if k.startswith(_TE_HEAD) else k

    out = dict(cfg)
    if isinstance(out.get("target_modules"), list):
        out["target_modules"] = [strip(k) for k in out["target_modules"]]
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(out.get(key), dict):
            out[key] = {strip(k): v for k, v in out[key].items()}
    return out


def state_dict(adapter: Adapter, *, base: str | None = None, fold_scale: bool = False, component: str | None = None
               ) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """(tensors, safetensors metadata, notes) of the current diffusers format."""
    if adapter.modules_to_save:
        raise SurgeryError("diffusers LoRA files cannot hold full replacement tensors (modules_to_save: "
                           f"{', '.join(sorted(adapter.modules_to_save)[:3])})")
    notes: list[str] = []
    unprefixed = [n for n in adapter.modules if split_component(n)[0] is None]
    comp0 = component
    if unprefixed and comp0 is None:
        comp0 = component_of_unprefixed(unprefixed, base)
        notes.append(f"un-prefixed module names (a PEFT adapter on one component) were written under '{comp0}.'")
    src_cfgs = adapter.config.get("_components") if isinstance(adapter.config.get("_components"), dict) else {}
    by_comp: dict[str, dict[str, AdapterModule]] = {}
    for name, m in adapter.modules.items():
        comp, rest = split_component(name)
        comp = comp or comp0
        assert comp is not None
        by_comp.setdefault(comp, {})[rest] = _prepare(name, m, fold_scale, notes)
    tensors: dict[str, Tensor] = {}
    meta_cfg: dict[str, Any] = {}
    for comp, mods in by_comp.items():
        src_cfg = src_cfgs.get(comp) or (adapter.config if "peft_type" in adapter.config and not src_cfgs else {})
        sub = Adapter(modules=mods, config=dict(src_cfg), base_model=adapter.base_model, source_format="diffusers")
        cfg = _portable_patterns(peft_format.build_config(sub))
        for k, t in peft_format.state_dict(sub).items():
            tensors[f"{comp}.{k[len(peft_format.PREFIX):]}"] = t
        meta_cfg.update({f"{comp}.{k}": v for k, v in cfg.items()})
    if fold_scale:
        notes.append("folded every module's scale into lora_B (alpha = r) for loaders that ignore "
                     f"{METADATA_KEY}")
    metadata = {"format": "pt", METADATA_KEY: json.dumps(meta_cfg, indent=2, sort_keys=True, default=list)}
    return tensors, metadata, sorted(set(notes), key=notes.index)


def write(adapter: Adapter, path: Path, *, base: str | None = None, fold_scale: bool = False,
          component: str | None = None, **_: Any) -> list[str]:
    """Write a ``pytorch_lora_weights.safetensors``-style file (current diffusers format)."""
    tensors, metadata, notes = state_dict(adapter, base=base, fold_scale=fold_scale, component=component)
    save_tensors(tensors, path, metadata)
    return notes


register(FormatSpec("diffusers", detect, read, write, output_is_dir=False,
                    description="diffusers LoRA file (current lora_A/lora_B + lora_adapter_metadata; reads 0.2x "
                                "lora.down/lora.up and legacy attention-processor keys)",
                    default_filename=WEIGHT_NAME))

__all__ = ["METADATA_KEY", "WEIGHT_NAME", "component_configs", "detect", "parse_key", "read", "state_dict", "write"]
