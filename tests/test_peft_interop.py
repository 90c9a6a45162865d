"""The canonical model against real peft: ΔW equals peft's own get_delta_weight, and adapters we write load in
peft and give the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from peft_surgery import load_adapter, save_adapter  # noqa: E402
from peft_surgery.checkpoint import Checkpoint  # noqa: E402

from .models import input_ids, logits, save, tiny_gpt2, tiny_llama  # noqa: E402


class Net(nn.Module):
    """Every layer kind PEFT can adapt: Linear, Conv2d (k×k and 1×1), Embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.lin2 = nn.Linear(10, 14)
        self.conv = nn.Conv2d(3, 6, 3)
        self.conv1 = nn.Conv2d(6, 4, 1)


def _peft_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name.removeprefix("base_model.model."): mod for name, mod in model.named_modules()
            if isinstance(mod, BaseTunerLayer)}


def _randomize(model, seed=0):
    """Give every adapter parameter nonzero random values (PEFT zero-inits B)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(t in name for t in ("lora_", "hada_", "lokr_")) and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))


CONFIGS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin", "lin2", "conv", "conv1"],
                               init_lora_weights=False),
    "lora_patterns": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "lin", "lin2", "conv", "conv1"],
                                        rank_pattern={"lin2": 2, "conv": 3}, alpha_pattern={"lin": 5, "emb": 3},
                                        init_lora_weights=False),
    "rslora": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["lin", "lin2", "conv", "emb"],
                                 rank_pattern={"lin2": 3}, init_lora_weights=False),
    "dora": lambda: LoraConfig(r=4, lora_alpha=6, use_dora=True, target_modules=["lin", "lin2", "conv", "emb"],
                               init_lora_weights=False),
    "lora_bias": lambda: LoraConfig(r=3, lora_alpha=7, lora_bias=True, target_modules=["lin", "lin2"],
                                    init_lora_weights=False),
    "loha": lambda: LoHaConfig(r=4, alpha=6, target_modules=["lin", "lin2", "conv", "conv1"], init_weights=False),
    "loha_effective_conv": lambda: LoHaConfig(r=3, alpha=5, target_modules=["lin", "conv"], init_weights=False,
                                              use_effective_conv2d=True),
    "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=["lin", "lin2", "conv", "conv1"], init_weights=False),
    "lokr_decompose": lambda: LoKrConfig(r=2, alpha=5, target_modules=["lin", "lin2", "conv"], init_weights=False,
                                         decompose_both=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_delta_weight_equals_peft(name, tmp_path):
    torch.manual_seed(0)
    base = Net()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(copy.deepcopy(base), CONFIGS[name]())
    _randomize(model)
    model.save_pretrained(tmp_path / "adapter")
    adapter = load_adapter(tmp_path / "adapter")
    layers = _peft_layers(model)
    assert set(adapter.modules) == set(layers)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for module, layer in layers.items():
        ours = adapter[module].delta_weight(base_weights[f"{module}.weight"])
        # For DoRA and everything else, the ground truth is what peft's merge does to the weight.
        theirs = merged[f"{module}.weight"] - base_weights[f"{module}.weight"]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"{name}: {module}")
        if not adapter[module].is_dora:
            # Without the base, LoHa/LoKr conv deltas come out flattened (out, in·kh·kw): same numbers.
            torch.testing.assert_close(adapter[module].delta_weight().reshape(ours.shape),
                                       layer.get_delta_weight("default").reshape(ours.shape), rtol=1e-5, atol=1e-5)
        if adapter[module].bias is not None:
            bias_delta = merged[f"{module}.bias"] - base_weights[f"{module}.bias"]
            torch.testing.assert_close(adapter[module].bias_delta(), bias_delta, rtol=1e-5, atol=1e-6)


def test_scale_matches_peft_scaling_with_patterns(tmp_path):
    model = get_peft_model(Net(), CONFIGS["lora_patterns"]())
    model.save_pretrained(tmp_path / "a")
    adapter = load_adapter(tmp_path / "a")
    for module, layer in _peft_layers(model).items():
        assert adapter[module].scale == layer.scaling["default"]
        assert adapter[module].rank == layer.r["default"]


def _peft_llama_adapter(tmp_path, **cfg):
    base = tiny_llama(seed=0)
    save(base, tmp_path / "base")
    model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **cfg))
    _randomize(model, seed=3)
    model.save_pretrained(tmp_path / "orig")
    return base, model


@pytest.mark.parametrize("cfg", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
         alpha_pattern={"v_proj": 3}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], use_rslora=True),
    dict(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj", "embed_tokens"], use_dora=True),
])
def test_written_adapter_loads_in_peft_with_same_logits_llama(tmp_path, cfg):
    base, model = _peft_llama_adapter(tmp_path, **cfg)
    ids = input_ids()
    expected = logits(model, ids)
    adapter = load_adapter(tmp_path / "orig")
    # Force regeneration of the config (not just a copy of the source) to test the writer itself.
    adapter.config = {}
    save_adapter(adapter, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)


def test_written_adapter_loads_in_peft_gpt2_fan_in_fan_out(tmp_path):
    base = tiny_gpt2(seed=0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                           fan_in_fan_out=True, init_lora_weights=False))
    _randomize(model, seed=5)
    model.save_pretrained(tmp_path / "orig")
    adapter = load_adapter(tmp_path / "orig")
    assert all(m.layout.fan_in_fan_out for m in adapter.modules.values())
    # ΔW comes out in Conv1D's stored (in, out) orientation and matches peft's merge.
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    for name, m in adapter.items():
        w = base.state_dict()[f"{name}.weight"]
        torch.testing.assert_close(m.delta_weight(), merged[f"{name}.weight"] - w, rtol=1e-5, atol=1e-5)
    adapter.config = {}
    save_adapter(adapter, tmp_path / "ours")
    ids = input_ids()
    reloaded = PeftModel.from_pretrained(tiny_gpt2(seed=0), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_peft_loha_lokr_written_by_us_load_in_peft(tmp_path):
    for i, cfg in enumerate([LoHaConfig(r=3, alpha=5, target_modules=["q_proj", "v_proj"], init_weights=False),
                             LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"], init_weights=False)]):
        base = tiny_llama(seed=0)
        model = get_peft_model(copy.deepcopy(base), cfg)
        _randomize(model, seed=i)
        model.save_pretrained(tmp_path / f"orig{i}")
        adapter = load_adapter(tmp_path / f"orig{i}")
        adapter.config = {}
        save_adapter(adapter, tmp_path / f"ours{i}")
        ids = input_ids()
        reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / f"ours{i}").eval()
        torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_modules_to_save_round_trip_through_peft(tmp_path):
    base = tiny_llama(seed=0)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                           modules_to_save=["lm_head"], init_lora_weights=False))
    _randomize(model, seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    model.save_pretrained(tmp_path / "orig")
    adapter = load_adapter(tmp_path / "orig")
    assert "lm_head.weight" in adapter.modules_to_save
    save_adapter(adapter, tmp_path / "ours")
    ids = input_ids()
    reloaded = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    a, b = Checkpoint.open(tmp_path / "orig"), Checkpoint.open(tmp_path / "ours")
    assert set(a.keys()) == set(b.keys())
