"""Checkpoint-level NF4: transformers + bitsandbytes load our output, logits match bnb's own quantization,
dequantize (ours and transformers-saved), error reports, CLI and bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peft_surgery.cli.main import cli
from peft_surgery.quantize import dequantize_checkpoint, quant_error_report, quantize_checkpoint
from peft_surgery.surgery import nf4
from tests.models import input_ids, logits, save, tiny_llama

pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*kernels.*")
SIX = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")
LINEARS = [f"model.layers.{i}.{m}" for i in range(2) for m in
           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(autouse=True)
def _no_dynamo():
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # rows of 64/128 elements: bnb's CPU matmul kernel needs rows that are whole 64-blocks
    return save(tiny_llama(hidden=64, intermediate=128), tmp_path_factory.mktemp("nf4") / "base")


@pytest.fixture(scope="module")
def ours(base) -> tuple[Path, object]:
    out = base.parent / "ours"
    report = quantize_checkpoint(base, out, compute_dtype="fp32", error_report=True)
    return out, report


@pytest.fixture(scope="module")
def bnb_model(base):
    """The same model quantized by transformers + bitsandbytes itself (CPU), saved before any forward pass
    (on AVX512-BF16 CPUs the first forward repacks the weights and changes what save_pretrained writes)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with torch._dynamo.config.patch(disable=True):
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu")
        saved = base.parent / "bnb_saved"
        model.save_pretrained(saved)
    return model, saved


def test_quantized_checkpoint_layout_and_config(ours, bnb_model, base):
    out, report = ours
    sd = load_file(out / "model.safetensors")
    for m in LINEARS:
        for s in SIX:
            assert f"{m}.weight{s}" in sd
        assert sd[f"{m}.weight"].dtype == torch.uint8 and sd[f"{m}.weight.absmax"].dtype == torch.uint8
    for k in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
              "model.layers.0.input_layernorm.weight"):
        assert sd[k].dtype == torch.float32  # embeddings, norms and the head stay unquantized
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == bnb_model[0].config.quantization_config.to_dict()
    assert report.totals["quantized_tensors"] == len(LINEARS)
    # with transformers' own save: the very same key set
    theirs = load_file(bnb_model[1] / "model.safetensors")
    assert set(theirs) == set(sd)


def test_loads_in_transformers_and_matches_bnb_quantization(ours, bnb_model):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    ref, _ = bnb_model
    model = AutoModelForCausalLM.from_pretrained(ours[0], device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear
    mine, theirs = model.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    lut_diffs = 0
    for k in mine:
        if k.endswith(".absmax") and mine[k].dtype == torch.uint8:
            # double-quant codes: ours follow CUDA's search, bnb 0.50 CPU a 65,536-bin table (rare ±few steps)
            d = (mine[k].long() - theirs[k].long()).abs()
            assert int(d.max()) <= 4
            lut_diffs += int((d != 0).sum())
        else:
            assert torch.equal(mine[k], theirs[k]), k  # packed codes, nested_absmax, maps, JSON, fp tensors
    n_scales = sum(v.numel() for k, v in mine.items() if k.endswith(".absmax"))
    assert lut_diffs <= max(3, n_scales // 100)
    ids = input_ids()
    a, b = logits(model, ids), logits(ref, ids)
    assert torch.allclose(a, b, atol=5e-3, rtol=0)
    # With bnb's scale codes swapped for ours, the two models are bit-identical.
    ref2 = AutoModelForCausalLM.from_pretrained(ours[0], device_map="cpu")
    for name in LINEARS:
        ref2.get_submodule(name).weight.quant_state.absmax = theirs[f"{name}.weight.absmax"].clone()
    b2 = logits(ref2, ids)
    if lut_diffs == 0:
        assert torch.equal(a, b) and torch.equal(b, b2)
    else:
        assert torch.equal(b2, b) and not torch.equal(a, b2)


def test_dequantize_ours_and_transformers_saved(ours, bnb_model, tmp_path):
    import bitsandbytes.functional as F

    out = tmp_path / "deq"
    report = dequantize_checkpoint(ours[0], out)
    assert report.totals["dequantized_tensors"] == len(LINEARS)
    plain = load_file(out / "model.safetensors")
    q = load_file(ours[0] / "model.safetensors")
    for m in LINEARS:
        packed, state = nf4.QuantState4bit.from_state_dict(q, f"{m}.weight")
        assert torch.equal(plain[f"{m}.weight"], nf4.dequantize(packed, state))
        assert plain[f"{m}.weight"].shape == state.shape
    assert not any(".absmax" in k or "quant_state" in k for k in plain)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # transformers' own save: dequantized weights equal bnb's dequantize_4bit of the saved state
    saved = bnb_model[1]
    out2 = tmp_path / "deq_tf"
    dequantize_checkpoint(saved, out2, dtype=torch.bfloat16)
    plain2 = load_file(out2 / "model.safetensors")
    theirs = load_file(saved / "model.safetensors")
    for m in LINEARS:
        p = f"{m}.weight."
        qs = F.QuantState.from_dict({k.removeprefix(p): v for k, v in theirs.items() if k.startswith(p)},
                                    device=torch.device("cpu"))
        expect = F.dequantize_4bit(theirs[f"{m}.weight"], qs, out=None).to(torch.bfloat16)
        assert torch.equal(plain2[f"{m}.weight"], expect)
    assert plain2["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_error_report_side_by_side_and_plot(ours, base, tmp_path):
    report = quant_error_report(base, device="cpu")
    assert [r["tensor"] for r in report.rows] == sorted(f"{m}.weight" for m in LINEARS)
    comp = {r["method"]: r for r in report.comparison}
    assert set(comp) == {"nf4+dq", "fp4+dq", "int4"}
    # QLoRA's ordering: NF4 loses least; on these Gaussian-initialised weights int4-absmax sits between
    assert comp["nf4+dq"]["rel_fro"] < comp["int4"]["rel_fro"] < comp["fp4+dq"]["rel_fro"]
    assert comp["nf4+dq"]["rel_fro"] == pytest.approx(0.092, abs=0.005)
    assert comp["int4"]["bits_per_param"] == 4.5 and 4.127 < comp["nf4+dq"]["bits_per_param"] < 4.16
    # totals are aggregated over all parameters, not averaged per tensor
    sse = sum(r["mse"] * r["params"] for r in report.rows)
    assert comp["nf4+dq"]["mse"] == pytest.approx(sse / comp["nf4+dq"]["params"])
    assert report.worst[0]["rel_fro"] == max(r["rel_fro"] for r in report.rows)
    # quantize --report measures the same numbers on what it wrote
    assert [r["rel_fro"] for r in ours[1].rows] == [r["rel_fro"] for r in report.rows]
    pytest.importorskip("matplotlib")
    from peft_surgery.quantize import plot_error_report

    png = plot_error_report(report, tmp_path / "err.png")
    assert png.stat().st_size > 1000


def test_cli_quantize_skip_report_and_json(base, tmp_path):
    out = tmp_path / "q"
    rep = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["quantize", str(base), "-o", str(out), "--skip", "mlp.down_proj", "--quant-type",
                                   "fp4", "--no-double-quant", "--report", str(rep), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["totals"]["quantized_tensors"] == len(LINEARS) - 2 and data["totals"]["bits_per_param"] == 4.5
    assert json.loads(rep.read_text())["comparison"][0]["method"] == "fp4"
    sd = load_file(out / "model.safetensors")
    assert sd["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    assert sd["model.layers.0.mlp.up_proj.weight.absmax"].dtype == torch.float32  # no double quant
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4" in sd
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "fp4" and qc["bnb_4bit_use_double_quant"] is False
    assert set(qc["llm_int8_skip_modules"]) == {"lm_head", "mlp.down_proj"}
    res = CliRunner().invoke(cli, ["quant-error", str(base), "--methods", "nf4,int4", "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert [r["method"] for r in json.loads(res.output)["comparison"]] == ["nf4+dq", "int4"]


def _variant(base: Path, dst: Path, key: str, value: torch.Tensor) -> Path:
    dst.mkdir()
    shutil.copy(base / "config.json", dst / "config.json")
    sd = load_file(base / "model.safetensors")
    sd[key] = value
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("kind", ["nan", "int", "quantized", "dequant-plain"])
def test_cli_bad_input(kind, base, ours, tmp_path):
    key = "model.layers.1.self_attn.v_proj.weight"
    out = tmp_path / "out"
    w = load_file(base / "model.safetensors")[key]
    if kind == "nan":
        w[3, 5] = float("nan")
        src, cmd, msg = _variant(base, tmp_path / "m", key, w), "quantize", "NaN"
    elif kind == "int":
        src, cmd, msg = _variant(base, tmp_path / "m", key, w.to(torch.int8)), "quantize", "not a floating-point"
    elif kind == "quantized":
        src, cmd, msg = ours[0], "quantize", "already quantized"
    else:
        src, cmd, msg = base, "dequantize", "not a bitsandbytes 4-bit checkpoint"
    res = CliRunner().invoke(cli, [cmd, str(src), "-o", str(out), "--quiet", "--device", "cpu"])
    assert res.exit_code == 2
    line = res.output.strip()
    assert len(line.splitlines()) == 1 and msg in line and str(src) in line
    if kind in ("nan", "int"):
        assert f"tensor '{key}'" in line
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_plot_without_matplotlib_fails_before_writing(tmp_path, monkeypatch):
    """--plot needs matplotlib: without it the command stops before quantizing, so no output is left behind."""
    import sys

    from click.testing import CliRunner

    from peft_surgery.cli.main import cli

    from .models import save, tiny_llama

    save(tiny_llama(seed=0, hidden=64, intermediate=128), tmp_path / "m")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "m"), "-o", str(tmp_path / "q"), "--plot",
                                 str(tmp_path / "p.png")])
    assert r.exit_code == 2 and "--plot needs matplotlib" in r.output
    assert not (tmp_path / "q").exists() and not (tmp_path / "p.png").exists()


def test_gpt2_conv1d_weights_match_bnb_quantization(tmp_path):
    """GPT-2 stores Conv1D weights (in, out); transformers quantizes their transpose. Ours must do the same."""
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .models import tiny_gpt2

    base = save(tiny_gpt2(n_embd=64), tmp_path / "gpt2")
    quantize_checkpoint(base, tmp_path / "q", compute_dtype="fp32")
    mine = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu")
    assert isinstance(mine.transformer.h[0].attn.c_attn, Linear4bit)
    a, b = mine.state_dict(), ref.state_dict()  # compared before any forward pass (bnb may repack on first use)
    assert set(a) == set(b)
    for k in a:
        if k.endswith(".absmax") and a[k].dtype == torch.uint8:
            assert int((a[k].long() - b[k].long()).abs().max()) <= 4  # CUDA search vs bnb CPU table, see above
        else:
            assert torch.equal(a[k], b[k]), k
    ids = input_ids()
    assert torch.allclose(logits(mine, ids), logits(ref, ids), atol=5e-3, rtol=0)
