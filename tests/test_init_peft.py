"""init pissa/olora/milora against real peft + transformers on tiny models; to-lora against PEFT's conversion."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from peft_surgery.checkpoint import Checkpoint
from peft_surgery.formats import load_adapter
from peft_surgery.initialize import init_adapter, to_lora

from .models import input_ids, logits, save, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# GQA: q_proj 32x32, k/v_proj 16x32 (non-square), MLP 48x32 / 32x48
LLAMA = dict(hidden=32, heads=4, kv_heads=2, intermediate=48)
TARGETS = ["q_proj", "k_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    save(tiny_llama(3, **LLAMA), d / "base")
    return d / "base"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2")
    save(tiny_gpt2(4), d / "base")
    return d / "base"


def _peft_reference(model, method: str, r: int, alpha: float, targets, rslora=False, fifo=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=method,
                         use_rslora=rslora, fan_in_fan_out=fifo, lora_dropout=0.0)
        return get_peft_model(copy.deepcopy(model), cfg)


def _peft_layers(pm):
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            out[name] = mod
    return out


def _load_causal(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("method,r,alpha,rslora", [("pissa", 4, 4, False), ("pissa", 3, 8, True),
                                                   ("olora", 4, 4, False), ("olora", 2, 6, False)])
def test_llama_matches_peft_init(llama_dir, tmp_path, method, r, alpha, rslora):
    model = _load_causal(llama_dir)
    pm = _peft_reference(model, method, r, alpha, TARGETS, rslora)
    rep = init_adapter(llama_dir, tmp_path / "out", method=method, rank=r, alpha=alpha, rslora=rslora,
                       target_modules=",".join(TARGETS))
    ours = load_adapter(tmp_path / "out" / "adapter")
    res = Checkpoint.open(tmp_path / "out" / "residual")
    layers = _peft_layers(pm)
    assert set(ours.modules) == set(layers) and len(layers) == 8
    for name, layer in layers.items():
        s = layer.scaling["default"]
        m = ours[name]
        assert m.scale == pytest.approx(s, rel=1e-12)
        peft_delta = s * layer.lora_B["default"].weight.detach() @ layer.lora_A["default"].weight.detach()
        torch.testing.assert_close(m.delta_weight(), peft_delta, atol=2e-6, rtol=1e-5)  # sign-invariant product
        if method == "olora":  # QR is unique up to signs too; here both use the same Householder QR
            torch.testing.assert_close(m.delta.up, layer.lora_B["default"].weight.detach(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(res.get_tensor(name + ".weight"), layer.base_layer.weight.detach(),
                                   atol=2e-6, rtol=1e-5)
    # every tensor that was not targeted is bit-identical to BASE
    base = Checkpoint.open(llama_dir)
    for k in base.keys():
        if not any(k == f"{n}.weight" for n in layers):
            assert torch.equal(res.get_tensor(k), base.get_tensor(k)), k
    assert len(rep.rows) == 8 and rep.totals["max_recon_error"] < 1e-6


@pytest.mark.parametrize("method", ["pissa", "olora", "milora"])
def test_residual_plus_adapter_gives_base_logits(llama_dir, tmp_path, method):
    ids = input_ids()
    base_logits = logits(_load_causal(llama_dir), ids)
    init_adapter(llama_dir, tmp_path / "out", method=method, rank=4, alpha=8, target_modules="all-linear")
    residual = _load_causal(tmp_path / "out" / "residual")
    assert (logits(residual, ids) - base_logits).abs().max() > 1e-3  # the residual alone is a different model
    pm = PeftModel.from_pretrained(residual, tmp_path / "out" / "adapter").eval()
    assert len(_peft_layers(pm)) == 2 * 7  # all-linear: q,k,v,o,gate,up,down per layer (not lm_head)
    torch.testing.assert_close(logits(pm, ids), base_logits, atol=1e-5, rtol=1e-5)


def test_peft_would_re_mutate_with_pissa_in_config(llama_dir, tmp_path):
    """Why we write init_lora_weights=true: with "pissa" PEFT re-runs the SVD on the residual when loading."""
    ids = input_ids()
    base_logits = logits(_load_causal(llama_dir), ids)
    init_adapter(llama_dir, tmp_path / "out", method="pissa", rank=4, target_modules="q_proj,v_proj")
    cfg_path = tmp_path / "out" / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["init_lora_weights"] is True
    cfg["init_lora_weights"] = "pissa"
    cfg_path.write_text(json.dumps(cfg))
    pm = PeftModel.from_pretrained(_load_causal(tmp_path / "out" / "residual"), tmp_path / "out" / "adapter")
    assert (logits(pm, ids) - base_logits).abs().max() > 1e-3


def test_gpt2_conv1d_pissa_matches_peft_and_logits(gpt2_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    pm = _peft_reference(model, "pissa", 4, 8, ["c_attn", "c_fc"], fifo=True)
    init_adapter(gpt2_dir, tmp_path / "out", method="pissa", rank=4, alpha=8, target_modules="c_attn,c_fc")
    cfg = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    ours = load_adapter(tmp_path / "out" / "adapter")
    res = Checkpoint.open(tmp_path / "out" / "residual")
    layers = _peft_layers(pm)
    assert set(ours.modules) == set(layers) == {f"transformer.h.{i}.{n}" for i in range(2)
                                                for n in ("attn.c_attn", "mlp.c_fc")}
    for name, layer in layers.items():
        w = res.get_tensor(name + ".weight")
        assert w.shape == layer.base_layer.weight.shape  # stored (in, out) like Conv1D
        torch.testing.assert_close(w, layer.base_layer.weight.detach(), atol=2e-6, rtol=1e-5)
        peft_dw = layer.get_delta_weight("default")  # PEFT's ΔW, in the stored Conv1D orientation
        torch.testing.assert_close(ours[name].delta_weight(), peft_dw, atol=2e-6, rtol=1e-5)
    ids = input_ids()
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "residual").eval(),
                                       tmp_path / "out" / "adapter").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_olora_logits(gpt2_dir, tmp_path):
    """PEFT's olora_init does not transpose Conv1D weights (A/B would not fit c_attn); ours works in math
    orientation, so the adapter fits and residual + adapter gives the base logits."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    init_adapter(gpt2_dir, tmp_path / "out", method="olora", rank=4, target_modules="all-linear")
    ours = load_adapter(tmp_path / "out" / "adapter")
    m = ours["transformer.h.0.attn.c_attn"]
    assert m.delta.up.shape == (96, 4) and m.delta.down.shape == (4, 32)  # (out, r), (r, in)
    ids = input_ids()
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "residual").eval(),
                                       tmp_path / "out" / "adapter").eval()
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_to_lora_matches_peft_conversion(llama_dir, tmp_path, rslora):
    """PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) vs our to-lora (--initial and --base)."""
    model = _load_causal(llama_dir)
    pm = _peft_reference(model, "pissa", 4, 8, ["q_proj", "v_proj"], rslora)
    init_dir = tmp_path / "peft_init"
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(init_dir)
    pm.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "training"
        for layer in _peft_layers(pm).values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "trained")  # config says init_lora_weights="pissa"
    pm.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(init_dir))
    ref = load_adapter(tmp_path / "peft_lora")
    ref_cfg = json.loads((tmp_path / "peft_lora" / "adapter_config.json").read_text())

    to_lora(tmp_path / "trained", tmp_path / "ours_initial", initial=init_dir)
    to_lora(tmp_path / "trained", tmp_path / "ours_base", base=llama_dir)  # method read from the config
    for out in ("ours_initial", "ours_base"):
        ours = load_adapter(tmp_path / out)
        cfg = json.loads((tmp_path / out / "adapter_config.json").read_text())
        assert cfg["r"] == ref_cfg["r"] == 8 and cfg["lora_alpha"] == pytest.approx(ref_cfg["lora_alpha"])
        assert cfg["init_lora_weights"] is True and cfg["use_rslora"] == rslora
        for name, m in ref.items():
            assert ours[name].rank == 8
            torch.testing.assert_close(ours[name].delta_weight(), m.delta_weight(), atol=2e-6, rtol=1e-5)
            if out == "ours_initial":  # same tensors as PEFT, not just the same product
                assert torch.equal(ours[name].delta.down, m.delta.down)
                assert torch.equal(ours[name].delta.up, m.delta.up)

    # the converted adapter on the ORIGINAL base gives the trained model's logits
    ids = input_ids()
    expected = logits(pm, ids)
    loaded = PeftModel.from_pretrained(_load_causal(llama_dir), tmp_path / "ours_base").eval()
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-5, rtol=1e-5)
