"""Stable Diffusion 1.x / 2.x / XL module tables, generated from the block structure (data, not if-chains).

``unet_table(config)`` walks a diffusers ``UNet2DConditionModel`` config the way diffusers builds the model
and yields every Linear/Conv2d with its weight shape, in diffusers naming, plus the SGM/LDM spelling of each
module (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, ``input_blocks.1.0.in_layers.2``, ...) as an
alias. kohya sd-scripts names SD1.x/SD2 modules in diffusers naming and SDXL modules in SGM naming; both
resolve through the same table. ``clip_table`` does the same for CLIP text encoders.
"""

from __future__ import annotations

from typing import Any, Iterator

from . import ModuleInfo, ModuleTable, Tables, register_arch

# Default configs of the released models (only the fields the generator reads).
SD15_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2, "transformer_layers_per_block": 1, "cross_attention_dim": 768,
    "use_linear_projection": False,
}
SD2_UNET: dict[str, Any] = {**SD15_UNET, "cross_attention_dim": 1024, "use_linear_projection": True}
SDXL_UNET: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CLIP_L = {"architectures": ["CLIPTextModel"], "hidden_size": 768, "intermediate_size": 3072,
          "num_hidden_layers": 12, "vocab_size": 49408, "max_position_embeddings": 77}
OPENCLIP_H = {"architectures": ["CLIPTextModel"], "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 23, "vocab_size": 49408, "max_position_embeddings": 77}
OPENCLIP_BIGG = {"architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280, "intermediate_size": 5120,
                 "num_hidden_layers": 32, "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 1280}

# diffusers ResnetBlock2D child → LDM/SGM ResBlock child
_RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}


def _per_block(value: Any, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


def _lin(out: int, inp: int) -> ModuleInfo:
    return ModuleInfo("linear", None, (out, inp))


def _conv(out: int, inp: int, k: int, linear: bool = False) -> ModuleInfo:
    if linear:
        return _lin(out, inp)
    return ModuleInfo("conv", (k, k), (out, inp, k, k))


def _resnet(cin: int, cout: int, temb: int | None) -> Iterator[tuple[str, ModuleInfo]]:
    yield "conv1", _conv(cout, cin, 3)
    if temb:
        yield "time_emb_proj", _lin(cout, temb)
    yield "conv2", _conv(cout, cout, 3)
    if cin != cout:
        yield "conv_shortcut", _conv(cout, cin, 1)


def _transformer(c: int, layers: int, cross: int, linear_proj: bool) -> Iterator[tuple[str, ModuleInfo]]:
    yield "proj_in", _conv(c, c, 1, linear_proj)
    for t in range(layers):
        p = f"transformer_blocks.{t}"
        for attn, kv in (("attn1", c), ("attn2", cross)):
            yield f"{p}.{attn}.to_q", _lin(c, c)
            yield f"{p}.{attn}.to_k", _lin(c, kv)
            yield f"{p}.{attn}.to_v", _lin(c, kv)
            yield f"{p}.{attn}.to_out.0", _lin(c, c)
        yield f"{p}.ff.net.0.proj", _lin(8 * c, c)  # GEGLU: 2 × (4·c)
        yield f"{p}.ff.net.2", _lin(c, 4 * c)
    yield "proj_out", _conv(c, c, 1, linear_proj)


def unet_table(config: dict[str, Any], component: str = "unet") -> ModuleTable:
    """Every Linear/Conv2d of a diffusers UNet2DConditionModel config, with SGM/LDM aliases."""
    t = ModuleTable(component, source=str(config.get("_class_name", "UNet2DConditionModel")))
    boc = list(config["block_out_channels"])
    downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
    n = len(boc)
    lpb = _per_block(config.get("layers_per_block", 2), n)
    tlpb = _per_block(config.get("transformer_layers_per_block", 1) or 1, n)
    rev_tlpb = config.get("reverse_transformer_layers_per_block") or list(reversed(tlpb))
    cross = config.get("cross_attention_dim") or 1280
    cross = _per_block(cross, n)
    linear_proj = bool(config.get("use_linear_projection", False))
    temb = boc[0] * 4
    k_in, k_out = int(config.get("conv_in_kernel", 3)), int(config.get("conv_out_kernel", 3))

    def add(name: str, info: ModuleInfo, sgm: str | None = None) -> None:
        t.modules[name] = info
        if sgm is not None and sgm != name:
            t.aliases[sgm] = name

    add("conv_in", _conv(boc[0], int(config.get("in_channels", 4)), k_in), "input_blocks.0.0")
    add("time_embedding.linear_1", _lin(temb, boc[0]), "time_embed.0")
    add("time_embedding.linear_2", _lin(temb, temb), "time_embed.2")
    if config.get("addition_embed_type") == "text_time":
        add("add_embedding.linear_1", _lin(temb, int(config["projection_class_embeddings_input_dim"])),
            "label_emb.0.0")
        add("add_embedding.linear_2", _lin(temb, temb), "label_emb.0.2")

    # down path
    sgm_in = 1
    out_c = boc[0]
    for i, btype in enumerate(downs):
        in_c, out_c = out_c, boc[i]
        attn = "CrossAttn" in btype
        for j in range(lpb[i]):
            cin = in_c if j == 0 else out_c
            for child, info in _resnet(cin, out_c, temb):
                add(f"down_blocks.{i}.resnets.{j}.{child}", info, f"input_blocks.{sgm_in}.0.{_RESNET_SGM[child]}")
            if attn:
                for child, info in _transformer(out_c, tlpb[i], cross[i], linear_proj):
                    add(f"down_blocks.{i}.attentions.{j}.{child}", info, f"input_blocks.{sgm_in}.1.{child}")
            sgm_in += 1
        if i < n - 1:
            add(f"down_blocks.{i}.downsamplers.0.conv", _conv(out_c, out_c, 3), f"input_blocks.{sgm_in}.0.op")
            sgm_in += 1

    # mid block (UNetMidBlock2DCrossAttn)
    c = boc[-1]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        for child, info in _resnet(c, c, temb):
            add(f"mid_block.resnets.0.{child}", info, f"middle_block.0.{_RESNET_SGM[child]}")
        for child, info in _transformer(c, tlpb[-1], cross[-1], linear_proj):
            add(f"mid_block.attentions.0.{child}", info, f"middle_block.1.{child}")
        for child, info in _resnet(c, c, temb):
            add(f"mid_block.resnets.1.{child}", info, f"middle_block.2.{_RESNET_SGM[child]}")

    # up path
    rboc = list(reversed(boc))
    rlpb = list(reversed(lpb))
    rcross = list(reversed(cross))
    out_c = rboc[0]
    sgm_out = 0
    for i, btype in enumerate(ups):
        prev_c, out_c = out_c, rboc[i]
        in_c = rboc[min(i + 1, n - 1)]
        attn = "CrossAttn" in btype
        layers = rlpb[i] + 1
        for j in range(layers):
            skip = in_c if j == layers - 1 else out_c
            cin = (prev_c if j == 0 else out_c) + skip
            for child, info in _resnet(cin, out_c, temb):
                add(f"up_blocks.{i}.resnets.{j}.{child}", info, f"output_blocks.{sgm_out}.0.{_RESNET_SGM[child]}")
            if attn:
                for child, info in _transformer(out_c, rev_tlpb[i], rcross[i], linear_proj):
                    add(f"up_blocks.{i}.attentions.{j}.{child}", info, f"output_blocks.{sgm_out}.1.{child}")
            if j == layers - 1 and i < n - 1:
                add(f"up_blocks.{i}.upsamplers.0.conv", _conv(out_c, out_c, 3),
                    f"output_blocks.{sgm_out}.{2 if attn else 1}.conv")
            sgm_out += 1

    add("conv_out", _conv(int(config.get("out_channels", 4)), boc[0], k_out), "out.2")
    return t


def clip_table(config: dict[str, Any], component: str = "text_encoder") -> ModuleTable:
    """Every Linear/Embedding of a transformers CLIPTextModel(WithProjection) config."""
    t = ModuleTable(component, source=str((config.get("architectures") or ["CLIPTextModel"])[0]))
    d, inter = int(config.get("hidden_size", 512)), int(config.get("intermediate_size", 2048))
    t.modules["text_model.embeddings.token_embedding"] = ModuleInfo(
        "embedding", None, (int(config.get("vocab_size", 49408)), d))
    t.modules["text_model.embeddings.position_embedding"] = ModuleInfo(
        "embedding", None, (int(config.get("max_position_embeddings", 77)), d))
    for i in range(int(config.get("num_hidden_layers", 12))):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            t.modules[f"{p}.self_attn.{proj}"] = _lin(d, d)
        t.modules[f"{p}.mlp.fc1"] = _lin(inter, d)
        t.modules[f"{p}.mlp.fc2"] = _lin(d, inter)
    archs = config.get("architectures") or []
    if any("WithProjection" in a for a in archs):
        t.modules["text_projection"] = _lin(int(config.get("projection_dim", d)), d)
    return t


def table_for_config(component: str, config: dict[str, Any]) -> ModuleTable | None:
    """A generated table when the config's class is one we know, else None."""
    cls = config.get("_class_name")
    if cls == "UNet2DConditionModel":
        return unet_table(config, component)
    archs = config.get("architectures") or []
    if any(a in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in archs) or config.get("model_type") in (
            "clip_text_model",):
        return clip_table(config, component)
    return None


def _sd1() -> Tables:
    return {"unet": unet_table(SD15_UNET), "text_encoder": clip_table(CLIP_L)}


def _sd2() -> Tables:
    return {"unet": unet_table(SD2_UNET), "text_encoder": clip_table(OPENCLIP_H)}


def _sdxl() -> Tables:
    return {"unet": unet_table(SDXL_UNET), "text_encoder": clip_table(CLIP_L),
            "text_encoder_2": clip_table(OPENCLIP_BIGG, "text_encoder_2")}


#: kohya/modelspec conventions per arch (what writers put in metadata and which UNet naming kohya uses).
ARCH_INFO: dict[str, dict[str, str]] = {
    "sd1": {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "diffusers", "unet_naming": "diffusers", "resolution": "512x512"},
    "sd2": {"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-512/lora",
            "modelspec.implementation": "diffusers", "unet_naming": "diffusers", "resolution": "512x512"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
             "modelspec.implementation": "https://github.com/Stability-AI/generative-models", "unet_naming": "sgm",
             "resolution": "1024x1024"},
}

register_arch("sd1", _sd1)
register_arch("sd2", _sd2)
register_arch("sdxl", _sdxl)

__all__ = ["ARCH_INFO", "SD15_UNET", "SD2_UNET", "SDXL_UNET", "clip_table", "table_for_config", "unet_table"]
