"""Flux.1 LoRA files in their many layouts, read into (and written from) diffusers-named canonical adapters.

Canonical module names are the diffusers ``FluxTransformer2DModel`` paths under the ``transformer.``
component prefix (``transformer.transformer_blocks.0.attn.to_q``), plus ``text_encoder.`` (CLIP-L) and
``text_encoder_2.`` (T5-XXL) for text-encoder modules.

Layouts read (key examples):

==============  ===========================================================================================
kohya           ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
                (BFL names flattened; LyCORIS ``hada_*`` / ``lokr_*`` / ``diff`` suffixes too), ``lora_te1_``
                CLIP, ``lora_te2_``/``lora_te3_`` T5
OneTrainer      ``lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`` (diffusers names flattened)
SimpleTuner     ``lycoris_transformer_blocks_0_attn_to_q.lokr_w1`` (diffusers names flattened)
ComfyUI         ``diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight`` (or ``lora_A/lora_B``, LyCORIS
                suffixes), ``text_encoders.clip_l.transformer.…``
xlabs           ``[diffusion_model.]double_blocks.0.processor.qkv_lora1.down.weight`` (no alpha)
BFL / fal       ``double_blocks.0.img_attn.qkv.lora_A.weight`` (+ ``lora_B.bias``, norm ``.scale`` replacements),
                optionally under ``base_model.model.``
ai-toolkit      ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (diffusers names, no alpha)
==============  ===========================================================================================

Flattened names are resolved *forward*: the table's native/diffusers names are flattened and looked up.
Fused BFL projections are split into their diffusers parts by :func:`peft_surgery.surgery.fuse.split_rows`
(exact) and fused back by :func:`~peft_surgery.surgery.fuse.fuse_rows` (exact); the final modulation's
halves are swapped (BFL shift/scale ↔ diffusers scale/shift).

Writer styles (``style=``): ``kohya`` (default), ``comfy``, ``xlabs``, ``diffusers`` (ai-toolkit).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA
from ..checkpoint import Checkpoint, save_tensors
from ..errors import FormatError, SurgeryError
from ..surgery.fuse import fuse_rows, split_rows, swap_halves
from . import Detection, FormatSpec, register
from .arch import flux as table

COMP = table.COMPONENT + "."
TE = "text_encoder."
TE2 = "text_encoder_2."

# suffix → (field, kind). Longest alternatives first in the regex.
SUFFIXES: dict[str, str] = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "lora_bias",
    "lora_A.default.weight": "down", "lora_B.default.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "down.weight": "down", "up.weight": "up",
    "alpha": "alpha", "dora_scale": "dora_scale", "lora_magnitude_vector": "magnitude",
    "hada_w1_a": "w1a", "hada_w1_b": "w1b", "hada_w2_a": "w2a", "hada_w2_b": "w2b", "hada_t1": "t1", "hada_t2": "t2",
    "lokr_w1": "k_w1", "lokr_w1_a": "k_w1a", "lokr_w1_b": "k_w1b", "lokr_w2": "k_w2", "lokr_w2_a": "k_w2a",
    "lokr_w2_b": "k_w2b", "lokr_t2": "k_t2",
    "diff": "diff", "diff_b": "diff_b",
    "scale": "norm_scale",
}
_SUFFIX_ALT = "|".join(re.escape(s) for s in sorted(SUFFIXES, key=len, reverse=True))
_DOTTED_RE = re.compile(rf"^(?P<module>.+?)\.(?P<suffix>{_SUFFIX_ALT})$")
_FLAT_RE = re.compile(rf"^(?P<module>[^.]+)\.(?P<suffix>{_SUFFIX_ALT})$")

# flat prefixes → (namespace of the flattened name, canonical component prefix)
FLAT_PREFIXES = (
    ("lora_unet_", "bfl"),
    ("lora_transformer_", "diffusers"),
    ("lycoris_", "diffusers"),
    ("lora_te1_", "clip"),
    ("lora_te_", "clip"),
    ("lora_te2_", "t5"),
    ("lora_te3_", "t5"),
)
DOTTED_PREFIXES = (
    ("diffusion_model.", "native"),
    ("text_encoders.clip_l.transformer.", "clip"),
    ("text_encoders.t5xxl.transformer.", "t5"),
    ("transformer.base_model.model.", "diffusers"),
    ("transformer.", "diffusers"),
    ("base_model.model.", "native"),
    ("", "native"),
)
_BFL_HEADS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
              "final_layer")
_FLUX_DIFFUSERS_HEADS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                         "time_text_embed", "norm_out", "proj_out")
STYLES = ("kohya", "comfy", "xlabs", "diffusers")


# --------------------------------------------------------------------------------------------------------
# name tables
# --------------------------------------------------------------------------------------------------------


class Names:
    """Lookup tables for one set of Flux dims (block counts)."""

    def __init__(self, dims: table.FluxDims):
        self.dims = dims
        mods = table.transformer_modules(dims, with_linear1_qkv=True)
        self.native = {m.native: m for m in mods}
        self.flat_native = {table.flatten(n): n for n in self.native}
        self.diffusers = set(table.iter_diffusers_names(dims))
        self.flat_diffusers = {table.flatten(n): n for n in self.diffusers}
        self.clip = set(table.clip_modules(dims.clip_layers))
        self.flat_clip = {table.flatten(n): n for n in self.clip}
        self.t5 = set(table.t5_modules(dims.t5_layers))
        self.flat_t5 = {table.flatten(n): n for n in self.t5}
        self.xlabs = table.xlabs_modules(dims)
        self.norms = table.norm_params(dims)
        # diffusers part → (native module, index of the part); linear1_qkv excluded (writer uses linear1)
        self.part_of: dict[str, tuple[str, int]] = {}
        for m in mods:
            if m.native.endswith("linear1_qkv"):
                continue
            for j, p in enumerate(m.parts):
                self.part_of[p] = (m.native, j)


_NAMES_CACHE: dict[table.FluxDims, Names] = {}


def names_for(dims: table.FluxDims) -> Names:
    if dims not in _NAMES_CACHE:
        _NAMES_CACHE[dims] = Names(dims)
    return _NAMES_CACHE[dims]


def _dims_for(base: Any) -> table.FluxDims:
    try:
        return table.FluxDims.from_location(base) if base is not None else table.FluxDims()
    except (OSError, ValueError):
        return table.FluxDims()


def is_flux_adapter(adapter: Adapter) -> bool:
    """True when the adapter was read from a Flux layout or its modules are Flux transformer modules.

    Used to route generic targets (``--to kohya``/``--to diffusers``) to the Flux writers.
    """
    if adapter.source_format == "flux":
        return True
    diffusers_names = names_for(table.FluxDims()).diffusers
    transformer = [n.removeprefix("transformer.") for n in adapter.modules if n.startswith("transformer.")]
    return bool(transformer) and any(n in diffusers_names for n in transformer) and any(
        n.startswith(("single_transformer_blocks.", "transformer_blocks.")) and ".attn.add_" in n
        or n.startswith("single_transformer_blocks.") for n in transformer)


# --------------------------------------------------------------------------------------------------------
# key parsing
# --------------------------------------------------------------------------------------------------------


def parse_key(key: str, names: Names) -> tuple[str, str, str] | None:
    """(kind, module, field) for one tensor key, or None when it is not a Flux adapter key.

    kind: ``native`` (BFL path), ``diffusers``, ``clip``, ``t5``, ``xlabs`` (processor path) or ``norm``
    (BFL norm-scale parameter path); module: the path in that namespace.
    """
    for prefix, ns in FLAT_PREFIXES:
        if key.startswith(prefix):
            m = _FLAT_RE.match(key[len(prefix):])
            if not m:
                return None
            flat, suffix = m.group("module"), m.group("suffix")
            lookup = {"bfl": names.flat_native, "diffusers": names.flat_diffusers, "clip": names.flat_clip,
                      "t5": names.flat_t5}[ns]
            target = lookup.get(flat)
            if target is None:
                return ("unresolved", prefix + flat, SUFFIXES[suffix])
            return ("native" if ns == "bfl" else ns, target, SUFFIXES[suffix])
    for prefix, ns in DOTTED_PREFIXES:
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        m = _DOTTED_RE.match(rest)
        if not m:
            continue
        module, suffix = m.group("module"), m.group("suffix")
        field = SUFFIXES[suffix]
        if ns == "native":
            if field == "norm_scale":
                if module + ".scale" in names.norms:
                    return ("norm", module + ".scale", field)
                return None
            if module in names.native:
                return ("native", module, field)
            if module in names.xlabs:
                return ("xlabs", module, field)
            if module in names.diffusers and prefix in ("", "base_model.model."):
                return ("diffusers", module, field)
            if module.split(".", 1)[0] in _BFL_HEADS:
                return ("unresolved", key, field)
            return None
        if ns == "diffusers":
            if module in names.diffusers:
                return ("diffusers", module, field)
            if module.split(".", 1)[0] in _FLUX_DIFFUSERS_HEADS:
                return ("unresolved", key, field)
            return None
        if ns == "clip" and module in names.clip:
            return ("clip", module, field)
        if ns == "t5" and module in names.t5:
            return ("t5", module, field)
        return ("unresolved", key, field)
    return None


# --------------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------------

def detect(ckpt: Checkpoint) -> Detection | None:
    """Flux when keys resolve to BFL native / xlabs / flattened-diffusers Flux names (score 3), or only to
    ``transformer.`` diffusers Flux names (1.25: the diffusers reader reads those equally well and wins when
    the file carries ``lora_adapter_metadata``)."""
    names = names_for(table.FluxDims())
    kinds: Counter = Counter()
    flat_diffusers = 0
    for key in ckpt.keys():
        parsed = parse_key(key, names)
        if parsed is None or parsed[0] == "unresolved":
            continue
        kinds[parsed[0]] += 1
        if parsed[0] == "diffusers" and key.startswith(("lora_transformer_", "lycoris_")):
            flat_diffusers += 1
    evidence = []
    score = 0.0
    if kinds["native"]:
        evidence.append(f"{kinds['native']} tensors on BFL Flux modules (kohya lora_unet_…, ComfyUI "
                        "diffusion_model.…, or native names)")
        score = 3.0
    if kinds["xlabs"]:
        evidence.append(f"{kinds['xlabs']} xlabs processor tensors (processor.qkv_lora1 …)")
        score = 3.0
    if kinds["norm"]:
        evidence.append(f"{kinds['norm']} BFL norm-scale tensors (control LoRA)")
    if flat_diffusers:
        evidence.append(f"{flat_diffusers} tensors on flattened diffusers Flux names (OneTrainer lora_transformer_ / "
                        "SimpleTuner lycoris_)")
        score = 3.0
    elif kinds["diffusers"] and not score:
        evidence.append(f"{kinds['diffusers']} tensors on diffusers Flux transformer names")
        score = 1.25
    if not score:
        return None
    meta = ckpt.metadata or {}
    if str(meta.get("ss_network_module", "")).endswith("lora_flux") or "flux" in str(
            meta.get("modelspec.architecture", "")).lower():
        evidence.append("metadata names a Flux network (ss_network_module / modelspec.architecture)")
        score += 0.5
    return Detection("flux", score, evidence)


# --------------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------------


def _scalar(t: Tensor) -> float:
    return float(t.reshape(-1)[0].item())


# canonical reader field → kohya/LyCORIS suffix (parse_kohya_module's vocabulary)
_KOHYA_SUFFIX = {
    "down": "lora_down.weight", "up": "lora_up.weight", "mid": "lora_mid.weight", "alpha": "alpha",
    "dora_scale": "dora_scale", "diff": "diff", "diff_b": "diff_b",
    "w1a": "hada_w1_a", "w1b": "hada_w1_b", "w2a": "hada_w2_a", "w2b": "hada_w2_b", "t1": "hada_t1", "t2": "hada_t2",
    "k_w1": "lokr_w1", "k_w1a": "lokr_w1_a", "k_w1b": "lokr_w1_b", "k_w2": "lokr_w2", "k_w2a": "lokr_w2_a",
    "k_w2b": "lokr_w2_b", "k_t2": "lokr_t2",
}


def build_module(parts: dict[str, Tensor], *, source: Any = None, name: str = "") -> AdapterModule:
    """One canonical module from its tensors (LoRA / LoHa / LoKr / diff, alpha, DoRA, bias).

    The kohya/LyCORIS semantics (alpha/r, missing alpha = 1, full LoKr = 1, ``dora_scale`` axes) come from
    :func:`peft_surgery.formats.kohya.parse_kohya_module`; PEFT-style extras (``lora_B.bias``, which PEFT
    scales, and ``lora_magnitude_vector``) are added here.
    """
    from .kohya import parse_kohya_module

    parts = dict(parts)
    lora_bias = parts.pop("lora_bias", None)
    magnitude = parts.pop("magnitude", None)
    mod = parse_kohya_module({_KOHYA_SUFFIX[k]: v for k, v in parts.items()}, name=name, path=source)
    if lora_bias is not None:
        if mod.bias is not None:
            raise FormatError("module has both lora_B.bias and diff_b", path=source, tensor=name)
        mod = mod.replace(bias=lora_bias, bias_scaled=True)
    if magnitude is not None:
        mod = mod.replace(magnitude=magnitude.reshape(-1), magnitude_axis="out")
    return mod


def read(ckpt: Checkpoint, *, base: Any = None, skip_unresolved: bool = False, dims: table.FluxDims | None = None,
         **_: Any) -> Adapter:
    """Read any Flux LoRA layout into a canonical adapter with diffusers names (see module docstring)."""
    names = names_for(dims or _dims_for(base))
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    norms: dict[str, Tensor] = {}
    unresolved: list[str] = []
    for key in ckpt.keys():
        parsed = parse_key(key, names)
        if parsed is None or parsed[0] == "unresolved":
            unresolved.append(key)
            continue
        kind, module, field = parsed
        if kind == "norm":
            norms[module] = ckpt.get_tensor(key)
            continue
        groups.setdefault((kind, module), {})[field] = ckpt.get_tensor(key)
    notes: list[str] = []
    if unresolved:
        if not skip_unresolved:
            shown = ", ".join(sorted(unresolved)[:8]) + (" …" if len(unresolved) > 8 else "")
            raise FormatError(f"{len(unresolved)} tensors match no Flux.1 module ({dims or 'default'} table; pass "
                              f"--base with the transformer config for other block counts): {shown}",
                              path=ckpt.source)
        notes.append(f"dropped {len(unresolved)} unresolved tensors: " + ", ".join(sorted(unresolved)[:8]))
    modules: dict[str, AdapterModule] = {}
    methods: Counter = Counter()

    def put(name: str, mod: AdapterModule) -> None:
        if name in modules:
            raise FormatError("the file holds this module twice (fused and split names)", path=ckpt.source,
                              tensor=name)
        modules[name] = mod

    for (kind, module), parts in groups.items():
        mod = build_module(parts, source=ckpt.source, name=module)
        if kind == "xlabs":
            kind, module = "native", names.xlabs[module]
        if kind == "diffusers":
            put(COMP + module, mod)
        elif kind == "clip":
            put(TE + module, mod)
        elif kind == "t5":
            put(TE2 + module, mod)
        else:
            for n, m in native_to_parts(module, mod, names, methods, source=ckpt.source):
                put(n, m)
    mts = {COMP + names.norms[k]: v for k, v in norms.items()}
    if mts:
        notes.append(f"{len(mts)} norm scales are full replacement tensors (BFL control LoRA), kept as "
                     "modules_to_save")
    if methods:
        notes.append("fused BFL projections split into diffusers modules: "
                     + ", ".join(f"{k} ×{v}" for k, v in sorted(methods.items())))
    cfg: dict[str, Any] = {"_notes": notes} if notes else {}
    return Adapter(modules=modules, modules_to_save=mts, base_model=None, config=cfg,
                   metadata=dict(ckpt.metadata), source_format="flux")


def native_to_parts(native: str, mod: AdapterModule, names: Names, methods: Counter | None = None, *,
                    source: Any = None) -> list[tuple[str, AdapterModule]]:
    """A module on a BFL Linear → [(canonical diffusers name, module)] (split / swapped as needed)."""
    spec = names.native[native]
    if spec.swap:
        mod, how = swap_halves(mod)
        if methods is not None:
            methods[f"swap_scale_shift ({how})"] += 1
    if not spec.fused:
        return [(COMP + spec.parts[0], mod)]
    shape = mod.layout.weight_shape
    if shape is None:
        raise FormatError("cannot split a fused module whose shape is unknown", path=source, tensor=native)
    rows, hidden = int(shape[0]), int(shape[1])
    mlp = rows - 3 * hidden if "mlp" in spec.sizes else 0
    sizes = spec.part_sizes(hidden, mlp)
    if sum(sizes) != rows or (spec.sizes.count("mlp") and mlp <= 0):
        raise FormatError(f"fused module has {rows} output rows, which do not split as {'+'.join(spec.sizes)} "
                          f"with hidden size {hidden}", path=source, tensor=native)
    parts, how = split_rows(mod, sizes)
    if methods is not None:
        methods[how] += 1
    return [(COMP + p, m) for p, m in zip(spec.parts, parts) if m is not None]


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------


def group_native(adapter: Adapter, names: Names, *, xlabs: bool = False
                 ) -> tuple[dict[str, AdapterModule], dict[str, AdapterModule], list[str], Counter]:
    """Canonical transformer modules → BFL modules (fused and swapped back). Returns
    (native modules, other (text-encoder) modules, unknown names, fuse methods)."""
    by_native: dict[str, list[AdapterModule | None]] = {}
    others: dict[str, AdapterModule] = {}
    unknown: list[str] = []
    methods: Counter = Counter()
    for name, m in adapter.modules.items():
        if name.startswith(COMP):
            rel = name[len(COMP):]
            if rel not in names.part_of:
                unknown.append(name)
                continue
            native, j = names.part_of[rel]
            if xlabs and native.endswith(".linear1") and j < 3:
                native = native + "_qkv"
            spec = names.native[native]
            by_native.setdefault(native, [None] * len(spec.parts))[j] = m
        elif name.startswith(TE) and name[len(TE):] in names.clip:
            others[name] = m
        elif name.startswith(TE2) and name[len(TE2):] in names.t5:
            others[name] = m
        else:
            unknown.append(name)
    out: dict[str, AdapterModule] = {}
    for native, parts in by_native.items():
        spec = names.native[native]
        if not spec.fused:
            mod = parts[0]
            assert mod is not None
            if spec.swap:
                mod, how = swap_halves(mod)
                methods[f"swap_scale_shift ({how})"] += 1
            out[native] = mod
            continue
        present = [p for p in parts if p is not None]
        hidden = int(present[0].layout.weight_shape[1]) if present[0].layout.weight_shape else None
        if hidden is None:
            raise SurgeryError("cannot fuse a module whose input size is unknown", tensor=native)
        mlp = names.dims.mlp if hidden == names.dims.hidden else int(hidden * names.dims.mlp_ratio)
        if "mlp" in spec.sizes and parts[spec.sizes.index("mlp")] is not None:
            p = parts[spec.sizes.index("mlp")]
            mlp = int(p.layout.weight_shape[0]) if p.layout.weight_shape else mlp
        sizes = spec.part_sizes(hidden, mlp)
        try:
            mod, how = fuse_rows(parts, sizes)
        except ValueError as exc:
            raise SurgeryError(f"cannot fuse into {native}: {exc}", tensor=native) from None
        methods[how] += 1
        out[native] = mod
    return out, others, unknown, methods


def _fold(m: AdapterModule) -> AdapterModule:
    """Fold the scale into the up factor (for layouts without alpha); exact up to one rounding."""
    d = m.delta
    if m.scale == 1.0:
        return m
    if not isinstance(d, LoRA):
        raise SurgeryError(f"cannot fold a scale into a {m.kind} module")
    up = (d.up.to(torch.float32) * m.scale).to(d.up.dtype)
    bias = m.bias
    if bias is not None and m.bias_scaled:
        bias = (bias.to(torch.float32) * m.scale).to(bias.dtype)
    return m.replace(delta=LoRA(down=d.down, up=up, mid=d.mid), scale=1.0, alpha=None, bias=bias)


def _peft_tensors(prefix: str, m: AdapterModule, *, xlabs: bool = False, name: str = "") -> dict[str, Tensor]:
    """A scale-1 LoRA under ``prefix`` with PEFT (``lora_A/lora_B``) or xlabs (``down/up``) suffixes."""
    d = m.delta
    if not isinstance(d, LoRA) or d.mid is not None or m.scale != 1.0:
        raise SurgeryError("this layout holds plain scale-1 LoRA only", tensor=name)
    if xlabs:
        return {f"{prefix}.down.weight": d.down, f"{prefix}.up.weight": d.up}
    out = {f"{prefix}.lora_A.weight": d.down, f"{prefix}.lora_B.weight": d.up}
    if m.bias is not None:
        out[f"{prefix}.lora_B.bias"] = m.bias  # scale is 1: scaled and unscaled biases agree
    if m.magnitude is not None:
        if m.magnitude_axis != "out":
            raise SurgeryError("PEFT-style DoRA needs output-row magnitudes", tensor=name)
        out[f"{prefix}.lora_magnitude_vector"] = m.magnitude.reshape(-1)
    return out


def _kohya_metadata(adapter: Adapter, ranks: list[int], alphas: list[float]) -> dict[str, str]:
    meta = {k: v for k, v in adapter.metadata.items() if k.startswith(("ss_", "modelspec.")) and not k.startswith("sshs_")}
    meta.pop("modelspec.hash_sha256", None)
    kinds = {m.kind for m in adapter.modules.values()}
    meta["ss_network_module"] = "networks.lora_flux" if kinds <= {"lora"} else "lycoris.kohya"
    if ranks:
        meta["ss_network_dim"] = str(Counter(ranks).most_common(1)[0][0])
    if alphas:
        a = Counter(alphas).most_common(1)[0][0]
        meta["ss_network_alpha"] = str(int(a) if float(a).is_integer() else a)
    meta.setdefault("ss_base_model_version", "flux1")
    meta.setdefault("modelspec.sai_model_spec", "1.0.0")
    meta.setdefault("modelspec.architecture", "flux-1-dev/lora")
    meta.setdefault("modelspec.implementation", "https://github.com/black-forest-labs/flux")
    meta["format"] = "pt"
    return meta


def state_dict(adapter: Adapter, *, style: str = "kohya", dims: table.FluxDims | None = None
               ) -> tuple[dict[str, Tensor], list[str], dict[str, str]]:
    """(tensors, notes, metadata) of ``adapter`` in the given Flux layout style."""
    if style not in STYLES:
        raise SurgeryError(f"unknown Flux style '{style}' (known: {', '.join(STYLES)})")
    names = names_for(dims or table.FluxDims())
    notes: list[str] = []
    tensors: dict[str, Tensor] = {}
    if style == "diffusers":
        unknown = [n for n in adapter.modules if not (
            (n.startswith(COMP) and n[len(COMP):] in names.diffusers) or (n.startswith(TE) and n[len(TE):] in names.clip)
            or (n.startswith(TE2) and n[len(TE2):] in names.t5))]
        _raise_unknown(unknown)
        folded = 0
        for name, m in adapter.modules.items():
            if m.kind != "lora":
                raise SurgeryError(f"the diffusers/ai-toolkit Flux layout only holds LoRA; this module is {m.kind} "
                                   "(write style=kohya or comfy, or convert --type lora)", tensor=name)
            folded += m.scale != 1.0
            tensors.update(_peft_tensors(name, _fold(m), name=name))
        if folded:
            notes.append(f"no alpha in this layout: the scale of {folded} modules was folded into lora_B")
        for k, v in adapter.modules_to_save.items():
            tensors[k] = v
        return tensors, notes, {"format": "pt"}
    native, others, unknown, methods = group_native(adapter, names, xlabs=(style == "xlabs"))
    _raise_unknown(unknown)
    if methods:
        notes.append("diffusers modules fused into BFL projections: "
                     + ", ".join(f"{k} ×{v}" for k, v in sorted(methods.items())))
    ranks, alphas = [], []
    if style == "xlabs":
        allowed = set(names.xlabs.values())
        bad = [n for n in native if n not in allowed] + list(others)
        if bad:
            raise SurgeryError(f"the xlabs layout only holds attention qkv/proj LoRAs; {len(bad)} modules do not "
                               f"fit: {', '.join(sorted(bad)[:6])}")
        rev = {v: k for k, v in names.xlabs.items()}
        folded = 0
        for n, m in native.items():
            if m.kind != "lora" or m.is_dora or m.bias is not None:
                raise SurgeryError("the xlabs layout only holds plain LoRA", tensor=n)
            folded += m.scale != 1.0
            tensors.update(_peft_tensors(rev[n], _fold(m), xlabs=True, name=n))
        if folded:
            notes.append(f"xlabs has no alpha: the scale of {folded} modules was folded into up")
        return tensors, notes, {"format": "pt"}
    if style == "kohya":
        unet = lambda n: "lora_unet_" + table.flatten(n)  # noqa: E731
        te = lambda n: "lora_te1_" + table.flatten(n[len(TE):])  # noqa: E731
        te2 = lambda n: "lora_te3_" + table.flatten(n[len(TE2):])  # noqa: E731
    else:  # comfy
        unet = lambda n: "diffusion_model." + n  # noqa: E731
        te = lambda n: "text_encoders.clip_l.transformer." + n[len(TE):]  # noqa: E731
        te2 = lambda n: "text_encoders.t5xxl.transformer." + n[len(TE2):]  # noqa: E731
    from .kohya import kohya_module_tensors

    unit_alpha = 0
    for n, m in native.items():
        # diffusers' kohya-Flux converter ignores alpha on final_layer modules: bake the scale in for them.
        force = n.startswith("final_layer") and m.kind == "lora" and m.scale != 1.0
        unit_alpha += force
        if force:
            m = _fold(m)
        t, more = kohya_module_tensors(m, name=n)
        notes.extend(more)
        tensors.update({f"{unet(n)}.{k}": v for k, v in t.items()})
        if m.rank and "alpha" in t:
            ranks.append(m.rank)
            alphas.append(float(t["alpha"]))
    for n, m in others.items():
        t, more = kohya_module_tensors(m, name=n)
        notes.extend(more)
        prefix = te(n) if n.startswith(TE) else te2(n)
        tensors.update({f"{prefix}.{k}": v for k, v in t.items()})
    if unit_alpha:
        notes.append(f"final_layer modules ({unit_alpha}) written with alpha = rank and the scale folded into "
                     "lora_up (diffusers ignores their alpha)")
    if adapter.modules_to_save:
        inv = {v: k for k, v in names.norms.items()}
        for k, v in adapter.modules_to_save.items():
            rel = k[len(COMP):] if k.startswith(COMP) else None
            if rel not in inv:
                raise SurgeryError(f"cannot store full tensor '{k}' in a Flux {style} file")
            tensors[("diffusion_model." if style == "comfy" else "") + inv[rel]] = v
        notes.append(f"{len(adapter.modules_to_save)} full norm-scale tensors written under BFL names")
    meta = _kohya_metadata(adapter, ranks, alphas) if style == "kohya" else {"format": "pt"}
    return tensors, notes, meta


def _raise_unknown(unknown: list[str]) -> None:
    if unknown:
        raise SurgeryError(f"{len(unknown)} modules are not Flux.1 transformer / CLIP-L / T5 modules: "
                           + ", ".join(sorted(unknown)[:6]) + (" …" if len(unknown) > 6 else ""))


def write(adapter: Adapter, path: Path, *, style: str = "kohya", base: Any = None, **_: Any) -> list[str]:
    """Write one ``.safetensors`` file in the Flux layout ``style`` (kohya, comfy, xlabs, diffusers)."""
    tensors, notes, meta = state_dict(adapter, style=style, dims=_dims_for(base))
    if any(k.startswith("ss_") for k in meta):  # kohya-style metadata: recompute its hashes for the new tensors
        from .kohya import kohya_hashes

        meta = {**meta, **kohya_hashes(tensors, meta)}
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, path, meta)
    return notes


def _writer(style: str):
    def w(adapter: Adapter, path: Path, **kw: Any) -> list[str]:
        kw.pop("style", None)
        return write(adapter, path, style=style, **kw)
    return w


register(FormatSpec("flux", detect, read, write, output_is_dir=False,
                    description="Flux.1 LoRA file (kohya/ComfyUI/xlabs/BFL/ai-toolkit layouts; write style=)",
                    default_filename="flux_lora.safetensors"))
for _style in STYLES:
    register(FormatSpec(f"flux-{_style}", lambda ckpt: None, read, _writer(_style), output_is_dir=False,
                        description=f"Flux.1 LoRA file in the {_style} layout"))

__all__ = ["STYLES", "build_module", "detect", "is_flux_adapter", "native_to_parts", "parse_key", "read", "state_dict", "write"]
