"""rescale (LoRA ↔ rsLoRA, alpha, strength, fold-scale) and resize (factored SVD, rank selection)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoRA
from peft_surgery.algebra import rescale, rescale_adapter, resize, resize_adapter
from peft_surgery.cli.main import cli
from peft_surgery.errors import SurgeryError
from peft_surgery.formats import load_adapter
from peft_surgery.surgery import rescale as R
from peft_surgery.surgery.resize import dense_resize, resize_module

from .models import input_ids, logits, tiny_llama


def _lora(out, inp, r, *, scale=None, alpha=None, rslora=False, seed=0, dtype=torch.float32) -> AdapterModule:
    g = torch.Generator().manual_seed(seed)
    if scale is None:
        scale = alpha / (math.sqrt(r) if rslora else r)
    return AdapterModule(LoRA(torch.randn(r, inp, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype)),
                         scale=scale, layout=Layout("linear", False, (out, inp)), alpha=alpha, rslora=rslora)


def _peft_model_with_adapter(tmp_path: Path, config) -> tuple[object, Path]:
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "adapter")
    return pm, tmp_path / "adapter"


def _peft_logits(adapter_dir: Path):
    peft = pytest.importorskip("peft")
    model = peft.PeftModel.from_pretrained(tiny_llama(), str(adapter_dir))
    return logits(model, input_ids())


# ---------------------------------------------------------------------------------------------------------
# rescale
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(r=st.integers(1, 256), alpha=st.one_of(st.integers(1, 512).map(float), st.sampled_from([0.5, 1.5, 0.1, 12.8])))
def test_lora_rslora_lora_round_trip_is_exact(r, alpha):
    m = _lora(4, 3, 1, alpha=alpha)
    m = m.replace(delta=LoRA(torch.randn(r, 3), torch.randn(4, r)), scale=alpha / r)
    rs = R.to_rslora(m)
    assert rs.rslora and rs.delta is m.delta
    assert rs.scale == pytest.approx(m.scale, rel=1e-15)
    assert rs.alpha == pytest.approx(m.scale * math.sqrt(r), rel=1e-12)
    back = R.to_lora(rs)
    assert back.alpha == alpha and back.scale == m.scale and not back.rslora  # exact, not approximately
    assert torch.equal(back.delta_weight(), m.delta_weight())


@settings(max_examples=20, deadline=None)
@given(r=st.integers(1, 64), alpha=st.floats(0.01, 1000), new_alpha=st.floats(0.01, 1000), rs=st.booleans())
def test_alpha_keeps_delta_and_config_only_scales_it(r, alpha, new_alpha, rs):
    m = _lora(6, 5, r, alpha=alpha, rslora=rs, seed=r)
    d0 = m.delta_weight().double()
    kept = R.set_alpha(m, new_alpha)
    assert kept.alpha == new_alpha and kept.rslora == rs
    torch.testing.assert_close(kept.delta_weight().double(), d0, rtol=2e-6, atol=1e-6 * d0.abs().max().item())
    moved = R.set_alpha(m, new_alpha, config_only=True)
    assert moved.delta is m.delta
    torch.testing.assert_close(moved.delta_weight().double(), d0 * (new_alpha / alpha), rtol=1e-5,
                               atol=1e-6 * d0.abs().max().item() * new_alpha / alpha)


def test_to_rslora_with_rank_pattern_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                          alpha_pattern={"layers.1.self_attn.q_proj": 3})
    pm, adapter = _peft_model_with_adapter(tmp_path, cfg)
    ref = logits(pm, input_ids())
    report = rescale(adapter, tmp_path / "rs", to_rslora=True)
    written = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    assert written["use_rslora"] is True
    assert written["rank_pattern"] or written["r"] == 2  # per-module ranks survive
    assert report.totals["factors rescaled"] == 0  # ΔW unchanged: only alpha is restated
    torch.testing.assert_close(_peft_logits(tmp_path / "rs"), ref, rtol=1e-5, atol=1e-5)
    # and back: the original alphas again, exactly
    rescale(tmp_path / "rs", tmp_path / "back", to_lora=True)
    back = load_adapter(tmp_path / "back")
    orig = load_adapter(adapter)
    for n, m in orig.items():
        assert back[n].scale == m.scale and back[n].rank == m.rank
        assert torch.equal(back[n].delta.up, m.delta.up)


def test_strength_and_fold_scale_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pm, adapter = _peft_model_with_adapter(tmp_path, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"],
                                                                    use_rslora=True))
    ref = logits(pm, input_ids())
    res = CliRunner().invoke(cli, ["rescale", str(adapter), "--fold-scale", "-o", str(tmp_path / "f"), "--json"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "f" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and cfg["use_rslora"] is False
    torch.testing.assert_close(_peft_logits(tmp_path / "f"), ref, rtol=1e-5, atol=1e-5)
    rescale(adapter, tmp_path / "s", strength=0.0)
    base_logits = logits(tiny_llama(), input_ids())
    torch.testing.assert_close(_peft_logits(tmp_path / "s"), base_logits, rtol=1e-6, atol=1e-6)


def test_strength_multiplies_delta_and_refuses_dora():
    m = _lora(5, 4, 3, alpha=6.0, seed=1).replace(bias=torch.randn(5))
    s = R.set_strength(m, -0.25)
    torch.testing.assert_close(s.delta_weight(), -0.25 * m.delta_weight())
    torch.testing.assert_close(s.bias_delta(), -0.25 * m.bias_delta())
    ad, report = rescale_adapter(Adapter({"m": m.replace(magnitude=torch.ones(5))}), fold_scale=True)
    assert ad["m"].scale == 1.0
    with pytest.raises(SurgeryError, match="DoRA"):
        rescale_adapter(Adapter({"m": m.replace(magnitude=torch.ones(5))}), strength=0.5)
    with pytest.raises(SurgeryError, match="exactly one"):
        rescale_adapter(Adapter({"m": m}), to_lora=True, fold_scale=True)


# ---------------------------------------------------------------------------------------------------------
# resize
# ---------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 24), inp=st.integers(2, 24), r=st.integers(2, 8), k=st.integers(1, 8),
       scale=st.floats(0.1, 8), seed=st.integers(0, 1000), conv=st.booleans())
def test_resize_equals_dense_svd_and_is_optimal(out, inp, r, k, scale, seed, conv):
    g = torch.Generator().manual_seed(seed)
    if conv:
        m = AdapterModule(LoRA(torch.randn(r, inp, 3, 1, generator=g, dtype=torch.float64),
                               torch.randn(out, r, 1, 1, generator=g, dtype=torch.float64)), scale=scale,
                          layout=Layout("conv", False, (out, inp, 3, 1)))
    else:
        m = _lora(out, inp, r, scale=scale, seed=seed, dtype=torch.float64)
    k = min(k, r)
    new, info = resize_module(m, rank=k)
    dw = m.delta_math().reshape(out, -1)
    up, down, S = dense_resize(dw.double(), k)  # kohya's way: dense ΔW, full SVD
    got = new.delta_math().reshape(out, -1)
    # modules already at or below k are kept as they are (exact); others get min(k, rank of ΔW's shape)
    assert new.scale == m.scale and new.rank == (r if r <= k else min(k, out, inp * (3 if conv else 1)))
    assert new.delta.down.shape[1:] == m.delta.down.shape[1:]
    tail = S[info.new_rank:].square().sum().sqrt()
    assert torch.linalg.norm(dw - got).item() == pytest.approx(tail.item(), abs=1e-9 * (1 + S[0].item()))
    if info.new_rank < S.numel() and S[info.new_rank - 1] - S[info.new_rank] > 1e-6 * S[0]:
        torch.testing.assert_close(got, (up @ down).to(got.dtype), atol=1e-8 * (1 + S[0].item()), rtol=1e-7)
    total = S.square().sum().item()
    if total > 0 and info.path == "factored":
        assert info.retained_energy == pytest.approx(S[:info.new_rank].square().sum().item() / total, abs=1e-9)


def _known_spectrum(S: list[float], out=10, inp=9) -> AdapterModule:
    q1, _ = torch.linalg.qr(torch.randn(out, len(S), dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    q2, _ = torch.linalg.qr(torch.randn(inp, len(S), dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    return AdapterModule(LoRA(q2.T.contiguous(), (q1 * torch.tensor(S, dtype=torch.float64)).contiguous()), scale=1.0,
                         layout=Layout("linear", False, (out, inp)))


def test_rank_selection_has_no_off_by_one():
    m = _known_spectrum([4.0, 2.0, 1.0, 0.5])  # S² cumulative: 16, 20, 21, 21.25
    assert resize_module(m, energy=0.8)[1].new_rank == 2  # 20/21.25 ≥ 0.8; kohya's sv_fro(√0.8) keeps 3
    assert resize_module(m, energy=0.95)[1].new_rank == 3
    assert resize_module(m, energy=16 / 21.25)[1].new_rank == 1
    assert resize_module(m, sv_ratio=3.0)[1].new_rank == 2  # S ≥ 4/3; kohya's sv_ratio keeps 3
    assert resize_module(m, sv_ratio=4.5)[1].new_rank == 3  # kohya: 4
    new, info = resize_module(m, rank=2)
    assert info.retained_energy == pytest.approx(20 / 21.25)
    assert info.rel_error == pytest.approx(math.sqrt(1.25 / 21.25))


def test_resize_energy_writes_rank_pattern_readable_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    pm, adapter = _peft_model_with_adapter(tmp_path, peft.LoraConfig(r=6, lora_alpha=12, use_rslora=True,
                                                                    target_modules=["q_proj", "v_proj", "o_proj"]))
    src = load_adapter(adapter)
    # make one module exactly rank 2 so the per-module ranks differ
    m = src["model.layers.0.self_attn.q_proj"]
    rank2_up = torch.cat([m.delta.up[:, :2], torch.zeros(32, 4)], 1)
    src.modules["model.layers.0.self_attn.q_proj"] = m.replace(delta=LoRA(m.delta.down.clone(), rank2_up))
    report = resize(src, tmp_path / "dyn", energy=0.999999)
    rows = {r["module"]: r for r in report.rows}
    assert rows["model.layers.0.self_attn.q_proj"]["new_rank"] == 2
    cfg = json.loads((tmp_path / "dyn" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["use_rslora"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "dyn"))
    for name, mod in loaded.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            key = name.removeprefix("base_model.model.")
            torch.testing.assert_close(mod.get_delta_weight("default"), src[key].delta_weight(), rtol=1e-4, atol=1e-5)


def test_resize_cli_report_and_bad_input(tmp_path):
    ad = Adapter({"a": _lora(12, 10, 8, alpha=8.0, seed=1), "b": _lora(7, 10, 4, alpha=8.0, seed=2)}, config={})
    ad.save(tmp_path / "ad")
    runner = CliRunner()
    res = runner.invoke(cli, ["resize", str(tmp_path / "ad"), "--rank", "4", "-o", str(tmp_path / "r4"), "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["module"]: r for r in json.loads(res.output)["rows"]}
    assert rows["a"]["new_rank"] == 4 and rows["a"]["path"] == "factored" and rows["b"]["path"] == "kept"
    assert 0 < rows["a"]["retained_energy"] < 1
    out = load_adapter(tmp_path / "r4")
    assert out["a"].scale == pytest.approx(1.0) and out["a"].rank == 4
    assert torch.equal(out["b"].delta.up, ad["b"].delta.up)

    def bad(args, *needles):
        r = runner.invoke(cli, ["resize", *args, "-o", str(tmp_path / "bad")])
        assert r.exit_code == 2, r.output
        assert len(r.output.strip().splitlines()) == 1
        for n in needles:
            assert n in r.output, r.output
        assert not (tmp_path / "bad").exists()

    bad([str(tmp_path / "ad"), "--rank", "16"], "--rank 16 is larger than the adapter's rank (8)")
    bad([str(tmp_path / "ad"), "--energy", "1.5"], "--energy must be in (0, 1]")
    bad([str(tmp_path / "ad")], "exactly one of --rank, --energy, --sv-ratio")
    nan = Adapter({"a": _lora(12, 10, 8, alpha=8.0, seed=1)}, config={})
    nan["a"].delta.up[3, 3] = float("nan")
    nan.save(tmp_path / "nan")
    bad([str(tmp_path / "nan"), "--rank", "2"], "NaN", "a.up", str(tmp_path / "nan"))
    r = runner.invoke(cli, ["rescale", str(tmp_path / "nan"), "--to-rslora", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "NaN" in r.output and not (tmp_path / "bad").exists()


def test_resize_adapter_method_on_adapter():
    ad = Adapter({"a": _lora(12, 10, 8, alpha=8.0, seed=1)})
    small, report = ad.resize(rank=3)
    assert small["a"].rank == 3 and report.rows[0]["new_rank"] == 3
    with pytest.raises(SurgeryError, match="larger than the adapter's rank"):
        resize_adapter(ad, rank=9)
