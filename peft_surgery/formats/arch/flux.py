"""Flux.1 architecture tables: BFL native module names ↔ diffusers ``FluxTransformer2DModel`` names.

Pure data plus small generators. Fused BFL projections map to several diffusers modules, stacked along the
output rows in the order given, with sizes expressed in units of the hidden size ``h`` or the MLP width ``mlp``
(so tables work for the real model, 3072/12288, and for tiny test models alike).

* ``double_blocks.i.img_attn.qkv`` (3h × h)  → ``transformer_blocks.i.attn.to_q/to_k/to_v``
* ``single_blocks.i.linear1`` (3h + mlp × h) → ``single_transformer_blocks.i.attn.to_q/to_k/to_v`` + ``proj_mlp``
* ``final_layer.adaLN_modulation.1`` → ``norm_out.linear`` with the two output halves swapped
  (BFL chunks the modulation as (shift, scale); diffusers' ``AdaLayerNormContinuous`` as (scale, shift)).

Text encoders (CLIP-L as ``text_encoder``, T5-XXL as ``text_encoder_2``) are listed with their transformers
module names so that flattened kohya names can be resolved forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

COMPONENT = "transformer"


@dataclass(frozen=True)
class FluxDims:
    """The Flux.1 sizes the tables need. Defaults: FLUX.1-dev/schnell."""

    hidden: int = 3072
    mlp_ratio: float = 4.0
    num_double: int = 19
    num_single: int = 38
    clip_layers: int = 12
    t5_layers: int = 24

    @property
    def mlp(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any]) -> "FluxDims":
        """Dims from a diffusers ``FluxTransformer2DModel`` ``config.json``."""
        hidden = int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128))
        return cls(hidden=hidden, num_double=int(cfg.get("num_layers", 19)),
                   num_single=int(cfg.get("num_single_layers", 38)))

    @classmethod
    def from_location(cls, location: str | Path | None) -> "FluxDims":
        """Dims from a Flux transformer ``config.json``, its folder, or a pipeline folder; defaults otherwise."""
        if location is None:
            return cls()
        p = Path(location)
        for cand in (p, p / "config.json", p / COMPONENT / "config.json"):
            if cand.is_file() and cand.suffix == ".json":
                cfg = json.loads(cand.read_text())
                if "num_single_layers" in cfg:
                    return cls.from_diffusers_config(cfg)
        return cls()


@dataclass(frozen=True)
class FluxModule:
    """One BFL Linear and the diffusers module(s) it becomes.

    ``parts``: diffusers paths (component-relative). One part = renamed only; several = fused rows.
    ``sizes``: for fused modules, each part's row count as ``"h"`` or ``"mlp"``.
    ``swap``: the rows are (shift, scale) in BFL and (scale, shift) in diffusers.
    """

    native: str
    parts: tuple[str, ...]
    sizes: tuple[str, ...] = ()
    swap: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1

    def part_sizes(self, hidden: int, mlp: int) -> list[int]:
        unit = {"h": hidden, "mlp": mlp}
        return [unit[s] for s in self.sizes]


# (BFL path relative to the block, diffusers path(s) relative to the block, sizes)
DOUBLE_BLOCK: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), ("h", "h", "h")),
    ("img_attn.proj", ("attn.to_out.0",), ()),
    ("img_mlp.0", ("ff.net.0.proj",), ()),
    ("img_mlp.2", ("ff.net.2",), ()),
    ("img_mod.lin", ("norm1.linear",), ()),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), ("h", "h", "h")),
    ("txt_attn.proj", ("attn.to_add_out",), ()),
    ("txt_mlp.0", ("ff_context.net.0.proj",), ()),
    ("txt_mlp.2", ("ff_context.net.2",), ()),
    ("txt_mod.lin", ("norm1_context.linear",), ()),
)
SINGLE_BLOCK: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("h", "h", "h", "mlp")),
    ("linear2", ("proj_out",), ()),
    ("modulation.lin", ("norm.linear",), ()),
)
TOP_LEVEL: tuple[FluxModule, ...] = (
    FluxModule("img_in", ("x_embedder",)),
    FluxModule("txt_in", ("context_embedder",)),
    FluxModule("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    FluxModule("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    FluxModule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    FluxModule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    FluxModule("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    FluxModule("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    FluxModule("final_layer.linear", ("proj_out",)),
    FluxModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
)
# ComfyUI's slice of linear1 holding only q, k, v (xlabs/USO single-block ``qkv_lora``).
LINEAR1_QKV = ("linear1_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), ("h", "h", "h"))

# Full replacement tensors in BFL control LoRAs (RMSNorm scales) → diffusers parameter names.
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
SINGLE_NORMS = {
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}

# xlabs attention-processor LoRAs: processor name → BFL path relative to the block.
XLABS_DOUBLE = {
    "qkv_lora1": "img_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora2": "txt_attn.proj",
}
XLABS_SINGLE = {
    "qkv_lora": "linear1_qkv",
    "proj_lora": "linear2",
}

# Text encoders: transformers module paths (component-relative) per layer.
CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
T5_BLOCK = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
            "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
            "layer.1.DenseReluDense.wo", "layer.1.DenseReluDense.wi")


def transformer_modules(dims: FluxDims = FluxDims(), *, with_linear1_qkv: bool = False) -> list[FluxModule]:
    """Every Flux transformer Linear as a :class:`FluxModule`, BFL → diffusers (component-relative)."""
    out: list[FluxModule] = []
    for i in range(dims.num_double):
        for native, parts, sizes in DOUBLE_BLOCK:
            out.append(FluxModule(f"double_blocks.{i}.{native}", tuple(f"transformer_blocks.{i}.{p}" for p in parts),
                                  sizes))
    for i in range(dims.num_single):
        rows = SINGLE_BLOCK + ((LINEAR1_QKV,) if with_linear1_qkv else ())
        for native, parts, sizes in rows:
            out.append(FluxModule(f"single_blocks.{i}.{native}",
                                  tuple(f"single_transformer_blocks.{i}.{p}" for p in parts), sizes))
    out.extend(TOP_LEVEL)
    return out


def norm_params(dims: FluxDims = FluxDims()) -> dict[str, str]:
    """BFL norm-scale parameter → diffusers parameter (component-relative)."""
    out = {}
    for i in range(dims.num_double):
        for k, v in DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{k}"] = f"transformer_blocks.{i}.{v}"
    for i in range(dims.num_single):
        for k, v in SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{k}"] = f"single_transformer_blocks.{i}.{v}"
    return out


def xlabs_modules(dims: FluxDims = FluxDims()) -> dict[str, str]:
    """xlabs processor path (``double_blocks.0.processor.qkv_lora1``) → BFL path."""
    out = {}
    for i in range(dims.num_double):
        for k, v in XLABS_DOUBLE.items():
            out[f"double_blocks.{i}.processor.{k}"] = f"double_blocks.{i}.{v}"
    for i in range(dims.num_single):
        for k, v in XLABS_SINGLE.items():
            out[f"single_blocks.{i}.processor.{k}"] = f"single_blocks.{i}.{v}"
    return out


def clip_modules(num_layers: int = 12) -> list[str]:
    return [f"text_model.encoder.layers.{i}.{m}" for i in range(num_layers) for m in CLIP_LAYER]


def t5_modules(num_layers: int = 24) -> list[str]:
    return [f"encoder.block.{i}.{m}" for i in range(num_layers) for m in T5_BLOCK]


def flatten(path: str) -> str:
    """kohya flattening: every dot becomes an underscore."""
    return path.replace(".", "_")


# Weight shapes (out, in) of the diffusers modules, in units: h = hidden, mlp = MLP width; literal ints are
# fixed sizes of FLUX.1 (64 latent channels, 4096 T5 features, 768 pooled CLIP features, 256 timestep features).
_SHAPES = {
    "attn.to_q": ("h", "h"), "attn.to_k": ("h", "h"), "attn.to_v": ("h", "h"), "attn.to_out.0": ("h", "h"),
    "attn.add_q_proj": ("h", "h"), "attn.add_k_proj": ("h", "h"), "attn.add_v_proj": ("h", "h"),
    "attn.to_add_out": ("h", "h"), "ff.net.0.proj": ("mlp", "h"), "ff.net.2": ("h", "mlp"),
    "ff_context.net.0.proj": ("mlp", "h"), "ff_context.net.2": ("h", "mlp"), "norm1.linear": ("6h", "h"),
    "norm1_context.linear": ("6h", "h"), "proj_mlp": ("mlp", "h"), "proj_out": ("h", "h+mlp"),
    "norm.linear": ("3h", "h"),
    "x_embedder": ("h", 64), "context_embedder": ("h", 4096),
    "time_text_embed.timestep_embedder.linear_1": ("h", 256), "time_text_embed.timestep_embedder.linear_2": ("h", "h"),
    "time_text_embed.text_embedder.linear_1": ("h", 768), "time_text_embed.text_embedder.linear_2": ("h", "h"),
    "time_text_embed.guidance_embedder.linear_1": ("h", 256),
    "time_text_embed.guidance_embedder.linear_2": ("h", "h"), "norm_out.linear": ("2h", "h"),
}


def diffusers_shape(path: str, dims: FluxDims = FluxDims()) -> tuple[int, int] | None:
    """(out, in) of a diffusers Flux transformer Linear (component-relative path), or None if unknown."""
    if path == "proj_out":  # the top-level output projection, not the single block's
        return (64, dims.hidden)
    rel = path.split(".", 2)[2] if path.startswith(("transformer_blocks.", "single_transformer_blocks.")) else path
    spec = _SHAPES.get(rel)
    if spec is None:
        return None
    unit = {"h": dims.hidden, "mlp": dims.mlp, "6h": 6 * dims.hidden, "3h": 3 * dims.hidden,
            "2h": 2 * dims.hidden, "h+mlp": dims.hidden + dims.mlp}
    return tuple(unit[x] if isinstance(x, str) else x for x in spec)  # type: ignore[return-value]


def _register() -> None:
    """Register ``--arch flux`` with the shared name-resolution registry (component → module table)."""
    try:
        from . import ModuleInfo, ModuleTable, register_arch
    except ImportError:  # the shared registry is optional for these tables
        return

    def build():
        dims = FluxDims()
        tr = ModuleTable(COMPONENT, source="built-in Flux.1 table")
        for name in iter_diffusers_names(dims):
            tr.modules[name] = ModuleInfo("linear", None, diffusers_shape(name, dims))
        for m in transformer_modules(dims, with_linear1_qkv=False):
            if not m.fused:
                tr.aliases[m.native] = m.parts[0]
        te = ModuleTable("text_encoder", {n: ModuleInfo("linear") for n in clip_modules(dims.clip_layers)},
                         source="built-in CLIP-L table")
        te2 = ModuleTable("text_encoder_2", {n: ModuleInfo("linear") for n in t5_modules(dims.t5_layers)},
                          source="built-in T5-XXL table")
        return {COMPONENT: tr, "text_encoder": te, "text_encoder_2": te2}

    register_arch("flux", build)


def iter_diffusers_names(dims: FluxDims = FluxDims()) -> Iterator[str]:
    for m in transformer_modules(dims):
        yield from m.parts


_register()

__all__ = [
    "COMPONENT",
    "diffusers_shape",
    "FluxDims",
    "FluxModule",
    "clip_modules",
    "flatten",
    "iter_diffusers_names",
    "norm_params",
    "t5_modules",
    "transformer_modules",
    "xlabs_modules",
]
