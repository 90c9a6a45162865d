"""MLX-LM adapters ↔ canonical/PEFT: transposed factors, absolute scale, exact both ways."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoRA
from peft_surgery.checkpoint import Checkpoint
from peft_surgery.errors import FormatError, SurgeryError
from peft_surgery.formats import detect_format, load_adapter, save_adapter

SETTINGS = settings(max_examples=15, deadline=None)
LLAMA_LEAVES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def test_corpus_detects_and_reads(corpus):
    p = corpus("mlx_medical_qa")
    det = detect_format(Checkpoint.open(p))
    assert det.format == "mlx" and any("lora_parameters" in e for e in det.evidence)
    a = load_adapter(p)
    raw = load_file(str(p / "adapters.safetensors"))
    assert len(a) == 8 and set(a.scales().values()) == {10.0}
    for name, m in a.items():
        la, lb = raw[f"{name}.lora_a"], raw[f"{name}.lora_b"]
        # MLX: y = x W^T + scale·x·a·b  ⇒  ΔW (out, in) = scale·(a@b)^T
        assert torch.allclose(m.delta_weight(), 10.0 * (la @ lb).T, rtol=1e-6, atol=1e-7)
    assert a["model.layers.14.self_attn.v_proj"].layout.weight_shape == (256, 2048)


def test_corpus_to_peft_and_back_exact(corpus, tmp_path):
    p = corpus("mlx_medical_qa")
    a = load_adapter(p)
    save_adapter(a, tmp_path / "peft", format="peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] / cfg["r"] == 10.0 and not cfg["use_rslora"]
    b = load_adapter(tmp_path / "peft")
    for n in a:
        assert torch.equal(a[n].delta_weight(), b[n].delta_weight())
    save_adapter(b, tmp_path / "mlx", format="mlx")
    raw, back = load_file(str(p / "adapters.safetensors")), load_file(str(tmp_path / "mlx" / "adapters.safetensors"))
    assert raw.keys() == back.keys() and all(torch.equal(raw[k], back[k]) for k in raw)
    mcfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert mcfg["lora_parameters"]["scale"] == 10.0 and mcfg["lora_parameters"]["rank"] == 8
    assert mcfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert mcfg["fine_tune_type"] == "lora" and mcfg["model"] == "mlx-community/quantized-gemma-2b"


def test_corpus_peft_output_merges_in_peft(corpus, tmp_path):
    """Real consumer: peft merges our PEFT output into the same weights MLX's formula gives."""
    peft = pytest.importorskip("peft")
    p = corpus("mlx_medical_qa")
    a = load_adapter(p)
    save_adapter(a, tmp_path / "peft", format="peft")
    raw = load_file(str(p / "adapters.safetensors"))

    # a module tree with the adapter's paths and Gemma-2B's q/v shapes (only the 4 adapted layers are real)
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(2048, 2048, bias=False)
            self.v_proj = torch.nn.Linear(2048, 256, bias=False)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(14)] + [Layer() for _ in range(4)])

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    torch.manual_seed(0)
    base = Outer()
    ref = {n: base.get_submodule(n).weight.detach().clone() for n in a}
    merged = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).merge_and_unload()
    for n in a:
        want = ref[n] + 10.0 * (raw[f"{n}.lora_a"] @ raw[f"{n}.lora_b"]).T
        assert torch.allclose(merged.get_submodule(n).weight.detach(), want, rtol=1e-5, atol=1e-6), n


@st.composite
def llama_adapters(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    hidden, inter = 12, 20
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (6, hidden), "self_attn.v_proj": (6, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    layers = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True))
    leaves = draw(st.lists(st.sampled_from(LLAMA_LEAVES), min_size=1, max_size=4, unique=True))
    scales = draw(st.lists(st.sampled_from([1.0, 2.0, 0.5, 10.0, 20.0, 0.37]), min_size=1, max_size=2))
    ranks = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
    dora = draw(st.booleans())
    mods = {}
    for i, layer in enumerate(layers):
        for j, leaf in enumerate(leaves):
            out, inn = shapes[leaf]
            r = ranks[(i + j) % len(ranks)]
            mods[f"model.layers.{layer}.{leaf}"] = AdapterModule(
                LoRA(torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g)),
                scale=scales[(i + j) % len(scales)], layout=Layout("linear", False, (out, inn)),
                magnitude=torch.rand(out, generator=g) + 0.5 if dora else None)
    return Adapter(modules=mods)


@SETTINGS
@given(adapter=llama_adapters())
def test_mlx_round_trip_delta_exact(tmp_path_factory, adapter):
    out = tmp_path_factory.mktemp("mlx") / "a"
    notes = save_adapter(adapter, out, format="mlx")
    back = load_adapter(out)
    assert set(back) == set(adapter)
    w = torch.randn(20, 20)
    for n, m in adapter.items():
        shape = m.layout.weight_shape
        if m.is_dora:
            base = w[: shape[0], : shape[1]]
            assert rel_err(back[n].delta_weight(base), m.delta_weight(base)) <= 1e-6
        else:
            assert rel_err(back[n].delta_weight(), m.delta_weight()) <= 1e-6
    if len(set(adapter.scales().values())) > 1:
        assert any("folded into lora_b" in x for x in notes)
    if len(set(adapter.ranks().values())) > 1:
        assert any("zero-padded" in x for x in notes)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == ("dora" if any(m.is_dora for m in adapter.modules.values()) else "lora")


def _write_mlx(folder, tensors, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapters.safetensors"))
    if cfg is not None:
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_bad_inputs(tmp_path):
    a, b = torch.randn(8, 2), torch.randn(2, 4)
    cfg = {"lora_parameters": {"rank": 2, "scale": 20.0}, "fine_tune_type": "lora"}
    p = _write_mlx(tmp_path / "noconf", {"m.q.lora_a": a, "m.q.lora_b": b}, None)
    with pytest.raises(FormatError, match="lora_parameters.scale"):
        load_adapter(p)
    assert load_adapter(p, scale=3.0)["m.q"].scale == 3.0
    p = _write_mlx(tmp_path / "missing", {"m.q.lora_a": a}, cfg)
    with pytest.raises(FormatError, match="lora_b") as e:
        load_adapter(p)
    assert "m.q.lora_b" in str(e.value)
    p = _write_mlx(tmp_path / "moe", {"m.e.lora_a": torch.randn(3, 2, 8), "m.e.lora_b": torch.randn(3, 4, 2)}, cfg)
    with pytest.raises(FormatError, match="MoE"):
        load_adapter(p)
    p = _write_mlx(tmp_path / "full", {"m.q.lora_a": a, "m.q.lora_b": b}, {**cfg, "fine_tune_type": "full"})
    with pytest.raises(FormatError, match="full"):
        load_adapter(p)
    conv = Adapter(modules={"x": AdapterModule(LoRA(torch.randn(2, 3, 3, 3), torch.randn(4, 2, 1, 1)),
                                               layout=Layout("conv", False, (4, 3, 3, 3)))})
    with pytest.raises(SurgeryError, match="conv"):
        save_adapter(conv, tmp_path / "out", format="mlx")
    assert not (tmp_path / "out").exists()


def test_cli_convert_mlx_to_peft(corpus, tmp_path):
    from peft_surgery.cli.main import cli

    p = corpus("mlx_medical_qa")
    r = CliRunner().invoke(cli, ["convert", str(p), "--to", "peft", "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["source_format"] == "mlx"
    back = load_adapter(tmp_path / "o")
    a = load_adapter(p)
    assert all(torch.equal(a[n].delta_weight(), back[n].delta_weight()) for n in a)
