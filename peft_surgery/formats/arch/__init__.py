"""Architecture knowledge as data: module-name tables and forward name resolution.

Flattened names (kohya ``lora_unet_down_blocks_0_attentions_0_proj_in``) lose the dots, so they are never
parsed backwards. Instead every *candidate* module name of the target model is flattened (dots → ``_``) and
looked up. Candidates come from ``--base`` (a checkpoint's keys, or a transformers/diffusers config
instantiated on the meta device) or from the built-in tables (:mod:`.sd` for SD1.x/SD2/SDXL; other modules
register more with :func:`register_arch`).

Canonical module names for diffusion models are ``<component>.<module path inside the diffusers
component>``, e.g. ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``.

>>> res = resolve_flat_names(["down_blocks_0_attn_to_q"], ["down_blocks.0.attn.to_q", "mid.x"])
>>> res.mapping
{'down_blocks_0_attn_to_q': 'down_blocks.0.attn.to_q'}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ...errors import FormatError, SurgeryError

#: diffusers pipeline components that can carry LoRA weights, in file-prefix spelling.
DIFFUSION_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "transformer_2",
                        "prior")
#: components whose prefix cannot be confused with an LLM module path (``transformer.h.0`` is GPT-2's).
UNAMBIGUOUS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")


@dataclass(frozen=True)
class ModuleInfo:
    """What we know about one module: ``kind`` (linear|conv|embedding), conv ``kernel``, weight ``shape``."""

    kind: str = "linear"
    kernel: tuple[int, ...] | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class ModuleTable:
    """The adaptable modules of one component.

    ``modules``: canonical (diffusers) module path → :class:`ModuleInfo`.
    ``aliases``: other spellings of the same modules (e.g. SGM/LDM ``input_blocks.1.0.in_layers.2``) →
    canonical path; used when resolving names, and by writers that emit the alias naming.
    """

    component: str
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def candidates(self) -> dict[str, str]:
        """Every spelling → canonical path (canonical names map to themselves)."""
        out = {n: n for n in self.modules}
        out.update(self.aliases)
        return out

    def reverse_aliases(self) -> dict[str, str]:
        """canonical path → alias spelling (for writers that emit e.g. SGM names)."""
        return {v: k for k, v in self.aliases.items()}


Tables = dict[str, ModuleTable]  # component → table


@dataclass
class Resolution:
    """Result of :func:`resolve_flat_names`: ``mapping`` flat → module name, ``unresolved`` flat names."""

    mapping: dict[str, str] = field(default_factory=dict)
    unresolved: list[str] = field(default_factory=list)


def flatten(name: str) -> str:
    """kohya/LyCORIS flattening: every dot becomes an underscore."""
    return name.replace(".", "_")


def resolve_flat_names(flat_names: Iterable[str], candidate_module_names: Iterable[str] | Mapping[str, str]
                       ) -> Resolution:
    """Match flattened names against the flattened candidates (forward resolution, never backwards).

    ``candidate_module_names`` is a list of module paths, or a mapping spelling → target path (aliases such
    as SGM names resolve to their diffusers target). Two different targets that flatten to the same string
    are an ambiguity and raise a FormatError naming both.
    """
    if isinstance(candidate_module_names, Mapping):
        items = list(candidate_module_names.items())
    else:
        items = [(n, n) for n in candidate_module_names]
    index: dict[str, str] = {}
    clashes: dict[str, set[str]] = {}
    for spelling, target in items:
        f = flatten(spelling)
        prev = index.get(f)
        if prev is not None and prev != target:
            clashes.setdefault(f, {prev}).add(target)
        index[f] = target
    res = Resolution()
    for flat in flat_names:
        if flat in clashes:
            raise FormatError(f"flattened name '{flat}' matches several modules: {', '.join(sorted(clashes[flat]))}")
        target = index.get(flat)
        if target is None:
            res.unresolved.append(flat)
        else:
            res.mapping[flat] = target
    return res


# --------------------------------------------------------------------------------------------------------
# Architecture registry
# --------------------------------------------------------------------------------------------------------

_ARCHES: dict[str, Callable[[], Tables]] = {}
_CACHE: dict[str, Tables] = {}


def register_arch(name: str, builder: Callable[[], Tables]) -> None:
    """Register built-in tables for ``--arch name`` (builder is called lazily, once)."""
    _ARCHES[name] = builder
    _CACHE.pop(name, None)


def _ensure_builtin() -> None:
    import importlib

    for mod in ("sd", "flux"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def known_arches() -> list[str]:
    _ensure_builtin()
    return sorted(_ARCHES)


def builtin_tables(arch: str) -> Tables:
    """The built-in tables for ``arch`` (``sd1``, ``sd2``, ``sdxl``, ... ), component → table."""
    _ensure_builtin()
    if arch not in _ARCHES:
        raise SurgeryError(f"unknown --arch '{arch}' (known: {', '.join(sorted(_ARCHES))})")
    if arch not in _CACHE:
        _CACHE[arch] = _ARCHES[arch]()
    return _CACHE[arch]


def all_builtin_tables() -> dict[str, Tables]:
    return {a: builtin_tables(a) for a in known_arches()}


# --------------------------------------------------------------------------------------------------------
# Candidates from --base
# --------------------------------------------------------------------------------------------------------


def _info_from_shape(shape: tuple[int, ...]) -> ModuleInfo | None:
    if len(shape) == 2:
        return ModuleInfo("linear", None, tuple(shape))
    if len(shape) >= 3:
        return ModuleInfo("conv", tuple(shape[2:]), tuple(shape))
    return None


def _table_from_keys(component: str, shapes: Mapping[str, tuple[int, ...]], source: str) -> ModuleTable:
    t = ModuleTable(component, source=source)
    for key, shape in shapes.items():
        if not key.endswith(".weight"):
            continue
        info = _info_from_shape(tuple(shape))
        if info is not None:
            t.modules[key[: -len(".weight")]] = info
    return t


def _table_from_module(component: str, model: Any, source: str) -> ModuleTable:
    import torch.nn as nn

    t = ModuleTable(component, source=source)
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Embedding):
            t.modules[name] = ModuleInfo("embedding", None, tuple(w.shape))
        elif isinstance(mod, nn.Linear):
            t.modules[name] = ModuleInfo("linear", None, tuple(w.shape))
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            t.modules[name] = ModuleInfo("conv", tuple(w.shape[2:]), tuple(w.shape))
    return t


def table_from_config(component: str, config: dict[str, Any], source: str = "") -> ModuleTable:
    """Tables for a diffusers/transformers component config: data generators for the SD classes,
    otherwise the model is instantiated on the meta device (needs diffusers/transformers)."""
    from . import sd

    cls = config.get("_class_name") or (config.get("architectures") or [None])[0]
    t = sd.table_for_config(component, config)
    if t is not None:
        t.source = source or f"{cls} config"
        return t
    model = _instantiate_meta(config)
    return _table_from_module(component, model, source or f"{cls} config (meta device)")


def _instantiate_meta(config: dict[str, Any]) -> Any:
    import torch

    cls_name = config.get("_class_name")
    try:
        with torch.device("meta"):
            if cls_name:
                import diffusers

                cls = getattr(diffusers, cls_name)
                return cls.from_config(config)
            import transformers

            arch = (config.get("architectures") or [None])[0]
            if arch is None:
                raise SurgeryError("config has neither _class_name (diffusers) nor architectures (transformers)")
            cfg = transformers.AutoConfig.for_model(**config)
            return getattr(transformers, arch)(cfg)
    except ImportError as exc:
        raise SurgeryError(f"instantiating this config needs {exc.name}; install it or pass a checkpoint") from None


def _component_config_dirs(root: Path) -> dict[str, Path]:
    return {c: root / c for c in DIFFUSION_COMPONENTS if (root / c / "config.json").exists()}


def tables_from_base(base: str | os.PathLike, *, default_component: str = "unet") -> Tables:
    """Candidate module tables from ``--base``: a diffusers pipeline folder, a component folder, a config
    JSON, a checkpoint file, or a Hub id. Weights are only read for their headers (names and shapes)."""
    from ...checkpoint import Checkpoint, resolve_location

    path = Path(str(base))
    if not path.exists():
        path = resolve_location(str(base))
    if path.is_file() and path.suffix == ".json":
        cfg = json.loads(path.read_text())
        comp = _component_for_config(cfg, default_component, path)
        return {comp: table_from_config(comp, cfg, str(path))}
    if path.is_dir():
        comps = _component_config_dirs(path)
        if comps:
            return {c: table_from_config(c, json.loads((p / "config.json").read_text()), str(p))
                    for c, p in comps.items()}
        if (path / "config.json").exists():
            cfg = json.loads((path / "config.json").read_text())
            comp = _component_for_config(cfg, default_component, path / "config.json")
            return {comp: table_from_config(comp, cfg, str(path))}
    ckpt = Checkpoint.open(path)
    shapes = {k: ckpt.shape(k) for k in ckpt.keys()}
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for k, s in shapes.items():
        head, _, rest = k.partition(".")
        if head in DIFFUSION_COMPONENTS and rest:
            groups.setdefault(head, {})[rest] = s
        else:
            groups.setdefault("", {})[k] = s
    out: Tables = {}
    for comp, sh in groups.items():
        name = comp or infer_component(sh.keys(), default=default_component)
        out[name] = _table_from_keys(name, sh, str(base))
    return out


def _component_for_config(cfg: dict[str, Any], default: str, source: Any = None) -> str:
    cls = str(cfg.get("_class_name") or (cfg.get("architectures") or [""])[0])
    if cls.startswith("UNet"):
        return "unet"
    if "Transformer" in cls and cfg.get("_class_name"):
        return "transformer"
    if cls.startswith("CLIPTextModelWithProjection"):
        return "text_encoder_2"
    if cls.startswith(("CLIPText", "T5")):
        return "text_encoder"
    if not cfg.get("_class_name") and (cfg.get("architectures") or cfg.get("model_type")):
        # A transformers model that is not a diffusion text encoder (an LLM, say): diffusion naming doesn't apply.
        raise FormatError(f"{cls or cfg.get('model_type')} is not a diffusion-model component; kohya/diffusers "
                          "LoRA names exist for UNet, text-encoder and Flux transformer modules "
                          "(write LLM adapters with --to peft or --to mlx)", path=source)
    return default


# --------------------------------------------------------------------------------------------------------
# Components of canonical names
# --------------------------------------------------------------------------------------------------------

_UNET_HEADS = ("down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding",
               "conv_norm_out", "class_embedding", "encoder_hid_proj")
_TE_HEADS = ("text_model", "text_projection")


def infer_component(names: Iterable[str], default: str | None = None) -> str:
    """Which diffusers component un-prefixed module names belong to (``down_blocks.`` → unet, ...)."""
    votes: dict[str, int] = {}
    for n in names:
        head = n.split(".", 1)[0]
        if head in _UNET_HEADS:
            votes["unet"] = votes.get("unet", 0) + 1
        elif head in _TE_HEADS:
            votes["text_encoder"] = votes.get("text_encoder", 0) + 1
        elif head in ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                      "time_text_embed", "norm_out", "proj_out"):
            votes["transformer"] = votes.get("transformer", 0) + 1
    if len(votes) == 1:
        return next(iter(votes))
    if default is not None and not votes:
        return default
    if not votes:
        raise FormatError("cannot tell which model component these module names belong to "
                          f"(e.g. {next(iter(names), '?')}); pass --base")
    raise FormatError(f"module names mix components {sorted(votes)}; pass --base")


def component_of_unprefixed(names: list[str], base: str | os.PathLike | None = None) -> str:
    """The component that un-prefixed module names (an adapter on one component) belong to: the single
    component of ``--base`` when it has one, else inferred from the names."""
    if base is not None:
        tables = tables_from_base(base)
        if len(tables) == 1:
            return next(iter(tables))
    return infer_component(names)


def split_component(name: str) -> tuple[str | None, str]:
    """``unet.down_blocks.0...`` → (``unet``, ``down_blocks.0...``); (None, name) when unprefixed."""
    head, _, rest = name.partition(".")
    if head in DIFFUSION_COMPONENTS and rest:
        return head, rest
    return None, name


def component_groups(names: Iterable[str], *, allow_transformer: bool = False) -> dict[str, list[str]] | None:
    """Group component-prefixed names by component, or None when the names are not all component-prefixed.

    ``transformer.`` only counts when ``allow_transformer`` (GPT-2-like LLMs have ``transformer.h.0...``).
    """
    allowed = DIFFUSION_COMPONENTS if allow_transformer else UNAMBIGUOUS_COMPONENTS
    groups: dict[str, list[str]] = {}
    names = list(names)
    if not names:
        return None
    for n in names:
        comp, rest = split_component(n)
        if comp is None or comp not in allowed:
            return None
        groups.setdefault(comp, []).append(rest)
    return groups


def diffusion_components(adapter: Any) -> dict[str, Any] | None:
    """Split a component-prefixed adapter into one un-prefixed Adapter per component (for PEFT, whose base
    model is a single component). None when the adapter's names are not component-prefixed.

    A ``transformer.`` prefix only counts for adapters read from a diffusion format, because GPT-2-style LLM
    module paths also start with ``transformer.``.
    """
    diffusion_source = str(adapter.source_format or "") in ("diffusers", "kohya", "lycoris", "flux", "peft-components")
    names = list(adapter.modules) + [k for k in adapter.modules_to_save]
    groups = component_groups(names, allow_transformer=diffusion_source)
    if groups is None:
        return None
    comp_cfgs = adapter.config.get("_components") if isinstance(adapter.config.get("_components"), dict) else {}
    out = {}
    for comp in groups:
        pre = comp + "."
        mods = {k[len(pre):]: m for k, m in adapter.modules.items() if k.startswith(pre)}
        mts = {k[len(pre):]: t for k, t in adapter.modules_to_save.items() if k.startswith(pre)}
        cfg = dict(comp_cfgs.get(comp) or {})
        out[comp] = adapter.copy(modules=mods, modules_to_save=mts, config=cfg)
    return out


def guess_arch(names: Iterable[str], candidates: Iterable[str] | None = None) -> str | None:
    """The built-in arch whose tables contain every canonical (component-prefixed) name, preferring the
    most specific; None when none or several fit equally well."""
    names = [n for n in names]
    fits = []
    for arch in candidates or known_arches():
        tables = builtin_tables(arch)
        ok = True
        for n in names:
            comp, rest = split_component(n)
            t = tables.get(comp or "")
            if t is None or rest not in t.modules:
                ok = False
                break
        if ok:
            fits.append(arch)
    return fits[0] if len(fits) == 1 else None


def fitting_arches(names: Iterable[str]) -> list[str]:
    names = list(names)
    out = []
    for arch in known_arches():
        tables = builtin_tables(arch)
        if all((split_component(n)[0] or "") in tables and split_component(n)[1] in tables[split_component(n)[0]].modules
               for n in names):
            out.append(arch)
    return out


__all__ = [
    "DIFFUSION_COMPONENTS",
    "ModuleInfo",
    "ModuleTable",
    "Resolution",
    "Tables",
    "builtin_tables",
    "component_groups",
    "diffusion_components",
    "flatten",
    "guess_arch",
    "infer_component",
    "known_arches",
    "register_arch",
    "resolve_flat_names",
    "split_component",
    "table_from_config",
    "tables_from_base",
]
