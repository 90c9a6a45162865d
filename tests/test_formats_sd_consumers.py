"""Real consumers: our diffusers and kohya files load with diffusers into tiny SD1/SDXL UNets and CLIP text
encoders (no unexpected keys, every module adapted) and give the same output as merging ΔW ourselves; our PEFT
LoHa/LoKr load in peft; the corpus LyCORIS LoKr loads in peft where PEFT's factorisation allows it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoHa, LoKr, LoRA
from peft_surgery.formats import load_adapter, save_adapter
from peft_surgery.formats.arch import table_from_config
from peft_surgery.formats.kohya import lokr_factorization, peft_lokr_factors

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

SD1 = dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, cross_attention_dim=12,
           attention_head_dim=2, norm_num_groups=4, sample_size=8, in_channels=4, out_channels=4)
SDXL = dict(block_out_channels=[8, 16, 16], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                                             "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
            transformer_layers_per_block=[1, 1, 2], cross_attention_dim=12, attention_head_dim=2, norm_num_groups=4,
            sample_size=8, in_channels=4, out_channels=4, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32)


def tiny_unet(cfg: dict, folder: Path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval()
    unet.save_config(folder / "unet")
    return unet, json.loads((folder / "unet" / "config.json").read_text())


def tiny_clip(folder: Path):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    cfg = CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=10, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    te = CLIPTextModel(cfg).eval()
    te.config.save_pretrained(folder / "text_encoder")
    return te, json.loads((folder / "text_encoder" / "config.json").read_text())


def random_lora(component: str, config: dict, *, seed: int, uniform_alpha: bool = False) -> Adapter:
    """A LoRA on every Linear/Conv2d of the component (conv down keeps the kernel, up is 1×1)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, (name, info) in enumerate(table_from_config(component, config).modules.items()):
        if info.kind not in ("linear", "conv"):
            continue
        r = 1 + i % 3
        shape = info.shape
        down = torch.randn(r, shape[1], *shape[2:], generator=g) * 0.2
        up = torch.randn(shape[0], r, *([1] * (len(shape) - 2)), generator=g) * 0.2
        if uniform_alpha:
            alpha = 2.0 if info.kind == "linear" else 3.0  # kohya: network_alpha and conv_alpha
        else:
            alpha = float(1 + (i * 7) % 5)
        mods[f"{component}.{name}"] = AdapterModule(LoRA(down, up), scale=alpha / r,
                                                    layout=Layout(info.kind, False, shape), alpha=alpha)
    return Adapter(mods)


def merged_copy(model, adapter: Adapter, component: str):
    """The model with ΔW added to its weights by us."""
    m2 = copy.deepcopy(model)
    sd = m2.state_dict()
    with torch.no_grad():
        for name, mod in adapter.modules.items():
            key = name[len(component) + 1:] + ".weight"
            if key not in sd and key.startswith("text_model."):
                key = key[len("text_model."):]  # transformers 5 CLIPTextModel has no text_model wrapper
            sd[key] += mod.delta_weight(sd[key])
    return m2


def unet_out(unet, sdxl: bool):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 5, 12, generator=g)
    kw = {}
    if sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 8, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(x, torch.tensor([3, 700]), enc, **kw).sample


def n_lora_layers(model) -> int:
    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def diffusers_warnings():
    h = _Capture()
    lg = logging.getLogger("diffusers")
    lg.addHandler(h)
    yield h.messages
    lg.removeHandler(h)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_unet_file_loads_in_diffusers(tmp_path, arch, fmt, diffusers_warnings):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    unet, cfg = tiny_unet(SD1 if arch == "sd1" else SDXL, tmp_path)
    # diffusers keeps only one alpha for kohya attention modules, so the kohya case uses kohya's usual
    # network_alpha/conv_alpha; the diffusers format carries arbitrary per-module alphas in its metadata.
    ad = random_lora("unet", cfg, seed=1, uniform_alpha=fmt == "kohya")
    out = tmp_path / "lora.safetensors"
    save_adapter(ad, out, format=fmt, base=str(tmp_path / "unet"), arch=arch)
    mixin = StableDiffusionXLLoraLoaderMixin if arch == "sdxl" else StableDiffusionLoraLoaderMixin
    sd, alphas, meta = mixin.lora_state_dict(str(out), unet_config=unet.config, return_lora_metadata=True)
    loaded = copy.deepcopy(unet)
    mixin.load_lora_into_unet(sd, alphas, loaded, metadata=meta)
    assert n_lora_layers(loaded) == len(ad.modules)
    assert not [m for m in diffusers_warnings if "unexpected" in m or "missing" in m]
    ours = merged_copy(unet, ad, "unet")
    y_lora, y_ours, y_base = unet_out(loaded, arch == "sdxl"), unet_out(ours, arch == "sdxl"), unet_out(unet, arch == "sdxl")
    assert float((y_lora - y_ours).abs().max()) <= 1e-5 * float((y_ours - y_base).abs().max())
    if fmt == "kohya" and arch == "sdxl":
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            assert any(k.startswith("lora_unet_input_blocks_") for k in f.keys())  # SGM naming for SDXL


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_text_encoder_file_loads_in_diffusers(tmp_path, fmt, diffusers_warnings):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    te, cfg = tiny_clip(tmp_path)
    ad = random_lora("text_encoder", cfg, seed=2, uniform_alpha=fmt == "kohya")
    out = tmp_path / "te.safetensors"
    save_adapter(ad, out, format=fmt)
    sd, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(str(out), return_lora_metadata=True)
    loaded = copy.deepcopy(te)
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, loaded, prefix="text_encoder",
                                                               metadata=meta)
    assert n_lora_layers(loaded) == len(ad.modules)
    ours = merged_copy(te, ad, "text_encoder")
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = loaded(ids).last_hidden_state, ours(ids).last_hidden_state, te(ids).last_hidden_state
    assert float((a - b).abs().max()) <= 1e-5 * float((b - c).abs().max())


def test_kohya_file_with_per_module_alphas_reads_back_exactly(tmp_path):
    """The per-module alpha tensors we write are exact (what kohya/ComfyUI/A1111 apply)."""
    unet, cfg = tiny_unet(SD1, tmp_path)
    ad = random_lora("unet", cfg, seed=3)
    save_adapter(ad, tmp_path / "k.safetensors", format="kohya")
    back = load_adapter(tmp_path / "k.safetensors", base=str(tmp_path / "unet"))
    for name, m in ad.modules.items():
        assert back.modules[name].scale == m.scale
        assert torch.equal(back.modules[name].delta_math(), m.delta_math())


# --------------------------------------------------------------------------------------------------------
# PEFT LoHa / LoKr
# --------------------------------------------------------------------------------------------------------


def _peft_lokr_module(out: int, inn: int, kernel: tuple[int, ...], r: int, g: torch.Generator) -> LoKr:
    """LoKr factors in the shapes PEFT creates (decompose_factor -1, decompose_both, rank r)."""
    out_l, out_k = lokr_factorization(out)
    in_m, in_n = lokr_factorization(inn)
    k = 1
    for x in kernel:
        k *= x
    w1 = torch.randn(out_l, in_m, generator=g)
    if r < max(out_k, in_n) / 2:
        return LoKr(w1=w1, w2a=torch.randn(out_k, r, generator=g), w2b=torch.randn(r, in_n * k, generator=g))
    return LoKr(w1=w1, w2=torch.randn(out_k, in_n, *kernel, generator=g))


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_loha_lokr_load_in_peft(tmp_path, kind):
    """Our PEFT LoHa/LoKr (from a kohya round trip) load in peft and merge to our ΔW."""
    from peft import PeftModel

    unet, cfg = tiny_unet(SD1, tmp_path)
    table = table_from_config("unet", cfg)
    names = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
             "down_blocks.0.resnets.0.conv1", "up_blocks.1.attentions.0.proj_in"]
    g = torch.Generator().manual_seed(4)
    mods = {}
    for i, n in enumerate(names):
        info = table.modules[n]
        out, inn, kernel = info.shape[0], info.shape[1], tuple(info.shape[2:])
        flat = inn * (kernel[0] * kernel[1] if kernel else 1)
        r = 2
        if kind == "loha":
            d = LoHa(torch.randn(out, r, generator=g), torch.randn(r, flat, generator=g),
                     torch.randn(out, r, generator=g), torch.randn(r, flat, generator=g))
        else:
            d = _peft_lokr_module(out, inn, kernel, r, g)
        alpha = float(i + 1)
        rank = d.rank or 0
        mods[f"unet.{n}"] = AdapterModule(d, scale=alpha / r if rank else 1.0, alpha=alpha if rank else None,
                                          layout=Layout(info.kind, False, info.shape))
    ad = Adapter(mods)
    save_adapter(ad, tmp_path / "k.safetensors", format="lycoris")
    via = load_adapter(tmp_path / "k.safetensors", base=str(tmp_path / "unet"))
    notes = save_adapter(via, tmp_path / "peft", format="peft")
    assert any("stripped the 'unet.' prefix" in n for n in notes)
    model = PeftModel.from_pretrained(copy.deepcopy(unet), str(tmp_path / "peft"))
    merged = model.merge_and_unload()
    base_sd, merged_sd = unet.state_dict(), merged.state_dict()
    for name, m in ad.modules.items():
        key = name[len("unet."):] + ".weight"
        got = merged_sd[key] - base_sd[key]
        want = m.delta_weight(base_sd[key])
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), name


def test_corpus_lokr_loads_in_peft_where_factorisation_allows(corpus, tmp_path):
    """The real LyCORIS LoKr: modules whose factor shapes PEFT can create (one decompose_factor for all of them)
    load with PEFT and merge to our ΔW; the others have shapes PEFT's LoKr layer cannot create, as reported."""
    import torch.nn as nn
    from peft import LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    ad = load_adapter(corpus("lycoris_lokr_sd15_smart_falcon") / "smart_falcon_4_lokr.safetensors")
    factors = {n: peft_lokr_factors(m) for n, m in ad.modules.items()}
    ok = [n for n, f in factors.items() if 32 in f and n.startswith("unet.")][:4]
    bad = [n for n, f in factors.items() if not f and n.startswith("unet.")][:1]
    assert ok and bad

    class Holder(nn.Module):  # a model with exactly these module paths and weight shapes
        def __init__(self, names):
            super().__init__()
            self.layers = nn.ModuleDict()
            for n in names:
                ws = ad.modules[n].layout.weight_shape
                lin = nn.Linear(ws[1], ws[0], bias=False) if len(ws) == 2 else \
                    nn.Conv2d(ws[1], ws[0], tuple(ws[2:]), bias=False)
                self.layers[n.replace(".", "_")] = lin

    sub = ad.copy(modules={f"unet.layers.{n.replace('.', '_')}": ad.modules[n] for n in ok + bad})
    save_adapter(sub, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    sd = {k.replace("base_model.model.", ""): v for k, v in
          load_file(str(tmp_path / "peft" / "adapter_model.safetensors")).items()}
    good_cfg = {**cfg, "decompose_factor": 32, "target_modules": [f"layers.{n.replace('.', '_')}" for n in ok]}
    good_cfg.pop("peft_type")
    torch.manual_seed(0)
    model = Holder(ok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model = inject_adapter_in_model(LoKrConfig(**good_cfg), model)
    res = set_peft_model_state_dict(model, {k: v for k, v in sd.items() if any(n.replace(".", "_") in k for n in ok)})
    assert not [k for k in res.unexpected_keys if "lokr" in k]
    for n in ok:
        layer = model.layers[n.replace(".", "_")]
        layer.merge()
        got = layer.get_base_layer().weight - base[f"layers.{n.replace('.', '_')}.weight"]
        want = ad.modules[n].delta_weight(base[f"layers.{n.replace('.', '_')}.weight"])
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), n
    # a module whose factors PEFT cannot create: its LoKr layer gets other shapes
    bad_cfg = {**good_cfg, "target_modules": [f"layers.{bad[0].replace('.', '_')}"]}
    model = inject_adapter_in_model(LoKrConfig(**bad_cfg), Holder(bad))
    with pytest.raises(RuntimeError, match="size mismatch"):
        set_peft_model_state_dict(model, {k: v for k, v in sd.items() if bad[0].replace(".", "_") in k})
