"""merge / unmerge into checkpoints: against peft's merge_and_unload, round trips, layout, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoHa, LoRA
from peft_surgery.algebra import merge, resolve_base_key
from peft_surgery.checkpoint import Checkpoint
from peft_surgery.cli.main import cli
from peft_surgery.errors import ShapeMismatchError, SurgeryError
from peft_surgery.surgery.merge import merge_weight, unmerge_weight

from .models import save, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def _randomize(model, seed: int = 1) -> None:
    """Give every adapter parameter nonzero random values (PEFT inits B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if any(k in n for k in ("lora_", "hada_", "lokr_", "modules_to_save")):
                noise = torch.randn(p.shape, generator=g) * 0.1
                p.copy_(noise + 1.0 if "magnitude" in n else noise)


def _peft_case(tmp: Path, make, config, name: str):
    """Save BASE with transformers, the adapter with peft's save_pretrained; return (base, adapter, reference)."""
    base_dir = tmp / f"{name}-base"
    save(make(), base_dir)
    pm = peft.get_peft_model(make(), config)
    _randomize(pm)
    pm.save_pretrained(tmp / f"{name}-adapter")
    ref = {k: v.clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base_dir, tmp / f"{name}-adapter", ref


def _compare(out_file: Path, ref: dict, atol: float = 0.0) -> None:
    got = load_file(out_file)
    assert got, "nothing written"
    for k, v in got.items():
        assert v.dtype == ref[k].dtype, k
        torch.testing.assert_close(v, ref[k], atol=atol, rtol=0 if atol == 0 else 1e-6, msg=k)


LLAMA_CASES = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=["k_proj", "up_proj"]),
    "embedding": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    "lm_head_to_save": lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["v_proj"],
                                               modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path, case):
    base, adapter, ref = _peft_case(tmp_path, tiny_llama, LLAMA_CASES[case](), case)
    if case == "lm_head_to_save":  # the trained copy (randomized) replaces the base tensor
        sd = load_file(adapter / "adapter_model.safetensors")
        base_head = load_file(base / "model.safetensors")["lm_head.weight"]
        assert not torch.equal(sd["base_model.model.lm_head.weight"], base_head)
    report = merge(base, [adapter], tmp_path / "out")
    # fp32 arithmetic, same operation order as PEFT: bit-identical
    _compare(tmp_path / "out" / "model.safetensors", ref, atol=1e-6 if case == "dora" else 0.0)
    assert report.totals["tensors"] == len(ref)
    assert (tmp_path / "out" / "config.json").read_text() == (base / "config.json").read_text()


def test_merge_gpt2_fan_in_fan_out_via_cli(tmp_path):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    base, adapter, ref = _peft_case(tmp_path, tiny_gpt2, cfg, "gpt2")
    res = CliRunner().invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "--json", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["totals"]["modules merged"] == 4
    got = load_file(tmp_path / "out" / "model.safetensors")
    for k in got:
        assert torch.equal(got[k], ref[k]), k


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 6, 3)
        self.conv1 = torch.nn.Conv2d(6, 5, 1)
        self.lin = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.lin(self.conv1(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora"])
def test_merge_conv_equals_peft(tmp_path, kind):
    cfgs = {
        "lora": peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "conv1", "lin"], lora_bias=True),
        "dora": peft.LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "lin"], use_dora=True),
        "loha": peft.LoHaConfig(r=3, alpha=6, target_modules=["conv", "lin"]),
        "lokr": peft.LoKrConfig(r=3, alpha=6, target_modules=["conv", "lin"]),
    }
    (tmp_path / "base").mkdir()
    save_file(ConvNet().state_dict(), tmp_path / "base" / "model.safetensors")
    pm = peft.get_peft_model(ConvNet(), cfgs[kind])
    _randomize(pm)
    pm.save_pretrained(tmp_path / "adapter")
    ref = pm.merge_and_unload().state_dict()
    merge(tmp_path / "base" / "model.safetensors", tmp_path / "adapter", tmp_path / "merged.safetensors")
    got = load_file(tmp_path / "merged.safetensors")
    assert set(got) == set(ref)
    for k in got:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-6, msg=k)


# ---------------------------------------------------------------------------------------------------------
# Layout: sharded base, dtype, side files; multiple adapters with weights
# ---------------------------------------------------------------------------------------------------------


def _lora(out: int, inp: int, r: int, scale: float, seed: int, dtype=torch.float32) -> AdapterModule:
    g = torch.Generator().manual_seed(seed)
    return AdapterModule(LoRA(torch.randn(r, inp, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype)),
                         scale=scale, layout=Layout("linear", False, (out, inp)))


def test_merge_keeps_sharded_layout_and_dtype_and_weights(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    base = save(model, tmp_path / "base", max_shard_size="20KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ckpt = Checkpoint.open(base)
    name = "model.layers.1.mlp.down_proj"
    out_dim, in_dim = ckpt.shape(name + ".weight")
    a = Adapter({name: _lora(out_dim, in_dim, 4, 0.5, 1)})
    b = Adapter({name: _lora(out_dim, in_dim, 2, 2.0, 2), "model.layers.0.self_attn.q_proj": _lora(32, 32, 2, 1.0, 3)})
    merge(base, [a, b], tmp_path / "out", weights=[0.7, -0.3])
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == index["weight_map"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in base.iterdir())
    out = Checkpoint.open(tmp_path / "out")
    for k in ckpt.keys():
        assert out.dtype(k) == ckpt.dtype(k) == torch.bfloat16
    w = ckpt.get_tensor(name + ".weight").float()
    expect = (w + 0.7 * a[name].delta_weight() - 0.3 * b[name].delta_weight()).to(torch.bfloat16)
    assert torch.equal(out.get_tensor(name + ".weight"), expect)  # fp32 sum, one cast
    untouched = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(out.get_tensor(untouched), ckpt.get_tensor(untouched))


def test_merge_diffusers_style_prefixed_names(tmp_path):
    """`unet.`-prefixed canonical names match a bare UNet checkpoint; a pipeline folder keeps its layout."""
    torch.manual_seed(0)
    unet = {"down.attn.to_q.weight": torch.randn(8, 6), "down.attn.to_q.bias": torch.randn(8)}
    te = {"text_model.q.weight": torch.randn(4, 4)}
    pipe = tmp_path / "pipe"
    for comp, sd in (("unet", unet), ("text_encoder", te)):
        (pipe / comp).mkdir(parents=True)
        save_file(sd, pipe / comp / ("diffusion_pytorch_model.safetensors" if comp == "unet" else "model.safetensors"))
        (pipe / comp / "config.json").write_text("{}")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"a": 1}')
    (pipe / "model_index.json").write_text("{}")
    ad = Adapter({"unet.down.attn.to_q": _lora(8, 6, 2, 1.0, 5), "text_encoder.text_model.q": _lora(4, 4, 1, 1.0, 6)})
    merge(pipe, [ad], tmp_path / "out")
    out_unet = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    torch.testing.assert_close(out_unet["down.attn.to_q.weight"],
                               unet["down.attn.to_q.weight"] + ad["unet.down.attn.to_q"].delta_weight(), rtol=0, atol=0)
    assert torch.equal(out_unet["down.attn.to_q.bias"], unet["down.attn.to_q.bias"])
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").exists()
    assert (tmp_path / "out" / "model_index.json").exists()
    assert (tmp_path / "out" / "text_encoder" / "config.json").exists()
    # the bare UNet file: the component prefix is stripped
    merge(pipe / "unet", [Adapter({"unet.down.attn.to_q": ad["unet.down.attn.to_q"]})], tmp_path / "out2")
    assert torch.equal(load_file(tmp_path / "out2" / "diffusion_pytorch_model.safetensors")["down.attn.to_q.weight"],
                       out_unet["down.attn.to_q.weight"])
    assert resolve_base_key("unet.x", "weight", {"x.weight"}) == "x.weight"
    assert resolve_base_key("x", "weight", {"unet.x.weight"}) == "unet.x.weight"


# ---------------------------------------------------------------------------------------------------------
# merge then unmerge gives back BASE within the dtype's rounding
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 12), inp=st.integers(1, 12), r=st.integers(1, 4),
       scale=st.floats(-4, 4).filter(lambda x: abs(x) > 1e-3), strength=st.floats(-2, 2),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16),
       fifo=st.booleans())
def test_merge_unmerge_round_trip(out, inp, r, scale, strength, dtype, seed, fifo):
    g = torch.Generator().manual_seed(seed)
    shape = (inp, out) if fifo else (out, inp)
    w = torch.randn(shape, generator=g).to(dtype)
    m = AdapterModule(LoRA(torch.randn(r, inp, generator=g) * 0.3, torch.randn(out, r, generator=g) * 0.3),
                      scale=scale, layout=Layout("linear", fifo, shape))
    merged = merge_weight(w, m, strength=strength)
    assert merged.dtype == dtype
    exact = w.float() + strength * m.delta_weight()
    eps = torch.finfo(dtype).eps
    # one rounding to the storage dtype
    assert torch.all((merged.float() - exact).abs() <= exact.abs() * eps / 2 + 1e-30)
    back = unmerge_weight(merged, m, strength=strength)
    # two roundings, each ≤ ½ ulp of the larger magnitude involved
    bound = (exact.abs() + w.float().abs()) * eps + 1e-6
    assert torch.all((back.float() - w.float()).abs() <= bound)
    if dtype == torch.float32:
        assert torch.allclose(back, w, atol=1e-5, rtol=1e-5)


def test_unmerge_cli_round_trip_and_dora_refused(tmp_path):
    base, adapter, _ = _peft_case(tmp_path, tiny_llama, LLAMA_CASES["lora"](), "lora")
    runner = CliRunner()
    assert runner.invoke(cli, ["merge", str(base), str(adapter), "-o", str(tmp_path / "m"), "-q"]).exit_code == 0
    res = runner.invoke(cli, ["unmerge", str(tmp_path / "m"), str(adapter), "-o", str(tmp_path / "u"), "-q"])
    assert res.exit_code == 0, res.output
    b = load_file(base / "model.safetensors")
    u = load_file(tmp_path / "u" / "model.safetensors")
    for k in b:
        torch.testing.assert_close(u[k], b[k], atol=1e-6, rtol=1e-6)

    dbase, dadapter, _ = _peft_case(tmp_path, tiny_llama, LLAMA_CASES["dora"](), "dora")
    res = runner.invoke(cli, ["unmerge", str(dbase), str(dadapter), "-o", str(tmp_path / "du")])
    assert res.exit_code == 2
    assert "DoRA cannot be unmerged" in res.output and "q_proj" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "du").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def _small_base(tmp_path) -> Path:
    (tmp_path / "base").mkdir(exist_ok=True)
    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(6, 4), "b.weight": torch.randn(5, 5)}, tmp_path / "base" / "model.safetensors")
    return tmp_path / "base"


def _write_peft(adapter: Adapter, path: Path) -> Path:
    adapter.config = {}
    adapter.save(path)
    return path


def test_bad_input_shape_mismatch_names_module(tmp_path):
    base = _small_base(tmp_path)
    ad = _write_peft(Adapter({"a": _lora(7, 4, 2, 1.0, 1)}), tmp_path / "ad")
    res = CliRunner().invoke(cli, ["merge", str(base), str(ad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and "tensor 'a'" in line and "(7, 4)" in line and str(ad) in line
    assert not (tmp_path / "out").exists()


def test_bad_input_unmatched_module_and_weights_length(tmp_path):
    base = _small_base(tmp_path)
    ad = _write_peft(Adapter({"zzz": _lora(6, 4, 2, 1.0, 1)}), tmp_path / "ad")
    res = CliRunner().invoke(cli, ["merge", str(base), str(ad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "zzz" in res.output and "no matching weight" in res.output
    ok = _write_peft(Adapter({"a": _lora(6, 4, 2, 1.0, 1)}), tmp_path / "ok")
    res = CliRunner().invoke(cli, ["merge", str(base), str(ok), "--weights", "1,2", "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "--weights has 2 value(s) but 1 adapter(s)" in res.output
    assert not (tmp_path / "out").exists()


def test_bad_input_nan_adapter(tmp_path):
    base = _small_base(tmp_path)
    m = _lora(6, 4, 2, 1.0, 1)
    m.delta.up[0, 0] = float("nan")
    ad = _write_peft(Adapter({"a": m}), tmp_path / "ad")
    res = CliRunner().invoke(cli, ["merge", str(base), str(ad), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "NaN" in res.output and "a.up" in res.output and str(ad) in res.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(SurgeryError):
        merge(base, [Adapter({"a": m})], tmp_path / "out")


def test_loha_conv_reshaped_and_mismatch_raises():
    w = torch.randn(6, 4, 3, 3)
    g = torch.Generator().manual_seed(0)
    loha = AdapterModule(LoHa(*(torch.randn(s, generator=g) for s in [(6, 2), (2, 36), (6, 2), (2, 36)])), scale=0.5)
    merged = merge_weight(w, loha)
    torch.testing.assert_close(merged, w + 0.5 * loha.delta.product().reshape(6, 4, 3, 3))
    with pytest.raises(ShapeMismatchError, match="another base"):
        merge_weight(torch.randn(6, 4, 3, 2), loha, name="conv")


def test_merge_on_gpu_matches_cpu(cuda_device):
    w = torch.randn(6, 5, dtype=torch.bfloat16)
    m = _lora(6, 5, 2, 0.5, 1)
    got = merge_weight(w, m, device=cuda_device)
    assert got.device == w.device and got.dtype == w.dtype
    torch.testing.assert_close(got.float(), merge_weight(w, m).float(), atol=1e-2, rtol=1e-2)


def test_dora_merge_matches_delta_weight_for_both_magnitude_axes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=g)
    for axis, n in (("out", 6), ("in", 5)):
        m = _lora(6, 5, 2, 0.5, 1).replace(magnitude=torch.rand(n, generator=g) + 0.5, magnitude_axis=axis)
        torch.testing.assert_close(merge_weight(w, m), w + m.delta_weight(w), atol=1e-6, rtol=1e-6)
        with pytest.raises(SurgeryError, match="DoRA cannot be unmerged"):
            unmerge_weight(w, m, name="m")
