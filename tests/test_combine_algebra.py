"""combine: stack vs peft's add_weighted_adapter("cat"), factored SVD vs dense SVD (Eckart–Young),
TIES/DARE vs peft's merge_utils, mixed types, CLI and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoHa, LoRA
from peft_surgery.algebra import combine, combine_adapters
from peft_surgery.cli.main import cli
from peft_surgery.errors import ShapeMismatchError
from peft_surgery.formats import load_adapter
from peft_surgery.surgery import combine as C

from .models import tiny_llama


def _lora(out, inp, r, scale, seed, *, conv=None, dtype=torch.float32) -> AdapterModule:
    g = torch.Generator().manual_seed(seed)
    if conv:
        down = torch.randn(r, inp, *conv, generator=g)
        up = torch.randn(out, r, 1, 1, generator=g)
        layout = Layout("conv", False, (out, inp, *conv))
    else:
        down, up = torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)
        layout = Layout("linear", False, (out, inp))
    return AdapterModule(LoRA(down.to(dtype), up.to(dtype)), scale=scale, layout=layout)


def _target(mods, weights):
    return sum(w * m.delta_math().double() for m, w in zip(mods, weights) if m is not None)


# ---------------------------------------------------------------------------------------------------------
# Against real peft
# ---------------------------------------------------------------------------------------------------------


def test_stack_equals_peft_cat(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                             adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path / "saved")
    weights = [0.7, -0.4]
    pm.add_weighted_adapter(["first", "second"], weights, "cat", combination_type="cat")
    dirs = [p.parent for p in sorted((tmp_path / "saved").rglob("adapter_config.json"))]
    by_name = {json.loads((d / "adapter_config.json").read_text())["r"]: d for d in dirs}
    a, b = load_adapter(by_name[4]), load_adapter(by_name[2])
    result, report = combine_adapters([a, b], weights, method="stack")
    assert report.totals["modules"] == 4
    for name, module in pm.named_modules():
        if hasattr(module, "lora_A") and "cat" in module.lora_A:
            ours = result[name.removeprefix("base_model.model.")]
            assert ours.rank == 6
            torch.testing.assert_close(ours.delta_weight(), module.get_delta_weight("cat"), atol=1e-6, rtol=1e-5)
    # written and read back as a PEFT adapter: the same ΔW
    combine([by_name[4], by_name[2]], tmp_path / "ab", method="stack", weights=weights)
    back = load_adapter(tmp_path / "ab")
    for n, m in result.items():
        torch.testing.assert_close(back[n].delta_weight(), m.delta_weight(), atol=0, rtol=1e-6)


def test_ties_and_dare_match_peft_merge_utils():
    mu = pytest.importorskip("peft.utils.merge_utils")
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(7, 9, generator=g) for _ in range(3)]
    w = [1.0, 0.5, -0.8]
    wt = torch.tensor(w)
    for maj in ("total", "frequency"):
        assert torch.equal(C.ties_merge(ts, w, 0.4, maj), mu.ties(ts, wt, 0.4, maj))
    torch.manual_seed(11)
    ref = mu.dare_linear(ts, wt, 0.3)
    assert torch.equal(C.dare_merge(ts, w, 0.3, generator=torch.Generator().manual_seed(11)), ref)
    torch.manual_seed(12)
    ref = mu.dare_ties(ts, wt, 0.6, "total")
    assert torch.equal(C.dare_merge(ts, w, 0.6, generator=torch.Generator().manual_seed(12), ties=True), ref)


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: stack exact; factored SVD == dense SVD and Eckart–Young optimal
# ---------------------------------------------------------------------------------------------------------

mods_strategy = st.lists(st.tuples(st.integers(1, 5), st.floats(-3, 3), st.floats(0.1, 4)), min_size=1, max_size=4)


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 10), inp=st.integers(1, 10), specs=mods_strategy, conv=st.booleans(),
       seed=st.integers(0, 1000))
def test_stack_is_exact(out, inp, specs, conv, seed):
    mods = [_lora(out, inp, r, s, seed + i, conv=(3, 2) if conv else None) for i, (r, _, s) in enumerate(specs)]
    weights = [w for _, w, _ in specs]
    res, info = C.stack(mods, weights)
    assert res.rank == sum(r for r, _, _ in specs) == info.rank
    target = _target(mods, weights)
    got = res.delta_math().double()
    assert got.shape == target.shape
    assert torch.allclose(got, target, atol=1e-5 * (1 + target.abs().max().item()), rtol=1e-5)
    if len({w * s for _, w, s in specs}) == 1:  # equal coefficients: factors copied bit for bit
        assert all(torch.equal(res.delta.down[sum(r for r, _, _ in specs[:i]):][:specs[i][0]].reshape(-1),
                               m.delta.down.reshape(-1)) for i, m in enumerate(mods))


@settings(max_examples=25, deadline=None)
@given(out=st.integers(2, 12), inp=st.integers(2, 12), specs=mods_strategy, k=st.integers(1, 6),
       seed=st.integers(0, 1000))
def test_factored_svd_equals_dense_svd_and_is_eckart_young_optimal(out, inp, specs, k, seed):
    mods = [_lora(out, inp, r, s, seed + i, dtype=torch.float64) for i, (r, _, s) in enumerate(specs)]
    weights = [w for _, w, _ in specs]
    res, info = C.svd_combine(mods, weights, rank=k)
    target = _target(mods, weights)
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    k_eff = info.rank
    assert info.path == "factored"
    assert k_eff <= k
    dense_k = (U[:, :k_eff] * S[:k_eff]) @ Vh[:k_eff]
    got = res.delta_math().double()
    scale = 1 + S[0].item() if S.numel() else 1
    # The truncation is unique up to ties in the spectrum; compare when the gap is clear.
    if k_eff < S.numel() and (S[k_eff - 1] - S[k_eff]) > 1e-6 * scale:
        assert torch.allclose(got, dense_k, atol=1e-8 * scale)
    # Eckart–Young: the error equals the tail of the dense spectrum (the optimum), and the report says so.
    err = torch.linalg.norm(target - got).item()
    optimum = S[k_eff:].square().sum().sqrt().item()
    assert err == pytest.approx(optimum, abs=1e-8 * scale)
    total = torch.linalg.norm(target).item()
    if total > 0:
        assert info.rel_error == pytest.approx(optimum / total, abs=1e-7)


def test_linear_is_exact_sum_with_rank_cap():
    mods = [_lora(9, 7, 3, 0.5, 1), _lora(9, 7, 2, 2.0, 2)]
    res, info = C.combine_modules(mods, [1.0, 1.0], "linear", name="m")
    assert info.rank == 5 and info.rel_error < 1e-6
    assert torch.allclose(res.delta_math().double(), _target(mods, [1.0, 1.0]), atol=1e-5)
    capped, info = C.combine_modules(mods, [1.0, 1.0], "linear", name="m", rank=2)
    S = torch.linalg.svdvals(_target(mods, [1.0, 1.0]))
    assert capped.rank == 2
    assert info.rel_error == pytest.approx((S[2:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-4)
    # A rank-deficient sum (B A − B A) re-factors to rank 1, not 2·r.
    m = mods[0]
    half = m.replace(scale=m.scale / 2)
    res, info = C.combine_modules([m, half], [1.0, -1.0], "linear", name="m")
    assert info.rank <= 3


def test_mixed_types_go_through_dense_delta_with_report(tmp_path):
    g = torch.Generator().manual_seed(0)
    loha = AdapterModule(LoHa(*(torch.randn(s, generator=g) for s in [(6, 2), (2, 5), (6, 2), (2, 5)])), scale=0.5,
                         layout=Layout("linear", False, (6, 5)))
    lora = _lora(6, 5, 3, 1.0, 4)
    a, b = Adapter({"m": lora}, config={}), Adapter({"m": loha}, config={})
    result, report = combine_adapters([a, b], [1.0, 0.5], method="stack")
    assert report.rows[0]["path"] == "dense"
    assert any("dense ΔW" in n and "loha" in n for n in report.notes)
    torch.testing.assert_close(result["m"].delta_math().double(), _target([lora, loha], [1.0, 0.5]), atol=1e-5,
                               rtol=1e-5)
    result, report = combine_adapters([a, b], [1.0, 0.5], method="svd", rank=2)
    assert result["m"].rank == 2 and report.rows[0]["rel_error"] > 0


def test_ties_dare_are_seeded_and_refactored():
    mods = [_lora(8, 6, 3, 1.0, 1), _lora(8, 6, 3, 1.0, 2)]
    r1, i1 = C.combine_modules(mods, [1.0, 1.0], "dare", name="x", density=0.5, seed=7)
    r2, _ = C.combine_modules(mods, [1.0, 1.0], "dare", name="x", density=0.5, seed=7)
    r3, _ = C.combine_modules(mods, [1.0, 1.0], "dare", name="x", density=0.5, seed=8)
    assert torch.equal(r1.delta_math(), r2.delta_math())
    assert not torch.equal(r1.delta_math(), r3.delta_math())
    assert i1.rank == 3
    # ties with density 1 and agreeing signs is the plain mean of the weighted tasks
    d = [m.delta_math() for m in mods]
    t = C.ties_merge(d, [1.0, 1.0], 1.0)
    same = torch.sign(d[0]) == torch.sign(d[1])
    torch.testing.assert_close(t[same], ((d[0] + d[1]) / 2)[same])


# ---------------------------------------------------------------------------------------------------------
# CLI and bad input
# ---------------------------------------------------------------------------------------------------------


def _save(ad: Adapter, path: Path) -> Path:
    ad.save(path)
    return path


def test_cli_combine_svd_and_bad_inputs(tmp_path):
    a = _save(Adapter({"x": _lora(10, 8, 4, 2.0, 1), "y": _lora(5, 8, 4, 2.0, 2)}, config={}), tmp_path / "a")
    b = _save(Adapter({"x": _lora(10, 8, 2, 1.0, 3)}, config={}), tmp_path / "b")
    runner = CliRunner()
    res = runner.invoke(cli, ["combine", str(a), str(b), "--method", "svd", "--rank", "3", "--weights", "1,0.5",
                              "-o", str(tmp_path / "ab"), "--json", "-q"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert {r["module"]: r["rank"] for r in data["rows"]} == {"x": 3, "y": 3}
    out = load_adapter(tmp_path / "ab")
    src_a, src_b = load_adapter(a), load_adapter(b)
    target = _target([src_a["x"], src_b["x"]], [1.0, 0.5])
    S = torch.linalg.svdvals(target)
    err = torch.linalg.norm(out["x"].delta_math().double() - target) / torch.linalg.norm(target)
    assert err.item() == pytest.approx((S[3:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-4)

    def bad(args, *needles):
        r = runner.invoke(cli, ["combine", *args, "-o", str(tmp_path / "bad")])
        assert r.exit_code == 2, r.output
        assert len(r.output.strip().splitlines()) == 1
        for n in needles:
            assert n in r.output, r.output
        assert not (tmp_path / "bad").exists()

    bad([str(a), str(b), "--weights", "1,2,3"], "--weights has 3 value(s) but 2 adapter(s)")
    bad([str(a), str(b), "--method", "svd", "--rank", "99"], "--rank 99 is larger")
    other = _save(Adapter({"x": _lora(10, 9, 2, 1.0, 4)}, config={}), tmp_path / "other")
    bad([str(a), str(other)], "tensor 'x'", "different bases", str(other))
    nan = Adapter({"x": _lora(10, 8, 2, 1.0, 5)}, config={})
    nan["x"].delta.down[0, 0] = float("inf")
    bad([str(a), str(_save(nan, tmp_path / "nan"))], "Inf", "x.down")


def test_shape_mismatch_library():
    with pytest.raises(ShapeMismatchError, match="'m'"):
        C.check_compatible("m", [_lora(4, 4, 1, 1.0, 0), _lora(4, 5, 1, 1.0, 0)], ["a", "b"])
    assert math.isfinite(C.module_seed(3, "x"))


def test_module_to_device_copies_every_tensor():
    m = _lora(6, 5, 2, 0.5, 3).replace(magnitude=torch.ones(6), bias=torch.zeros(6))
    moved = m.to("meta")
    assert all(t.device.type == "meta" for _, t in moved.tensors())
    assert all(t.device.type == "cpu" for _, t in m.tensors())  # the original is untouched
    assert moved.scale == m.scale and moved.layout == m.layout


def test_combine_svd_on_gpu_matches_cpu(cuda_device):
    a = Adapter(modules={"x": _lora(40, 30, 4, 0.5, 1), "y": _lora(20, 30, 3, 2.0, 2)})
    b = Adapter(modules={"x": _lora(40, 30, 5, 1.0, 3), "y": _lora(20, 30, 2, 1.0, 4)})
    cpu, _ = combine_adapters([a, b], [1.0, -0.5], method="svd", rank=4)
    gpu, _ = combine_adapters([a, b], [1.0, -0.5], method="svd", rank=4, device=cuda_device)
    for n in cpu.modules:
        assert all(t.device.type == "cpu" for _, t in gpu[n].tensors())
        torch.testing.assert_close(gpu[n].delta_math(), cpu[n].delta_math(), rtol=1e-4, atol=1e-5)
