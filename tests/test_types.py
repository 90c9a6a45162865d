"""Adapter-type conversion: exact LoRA → LoHa/LoKr, factored-SVD LoHa/LoKr/full → LoRA with error reports."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_surgery.adapter import Adapter, AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA
from peft_surgery.convert import ConvertReport
from peft_surgery.surgery import types
from peft_surgery.surgery.linalg import factored_svd

SETTINGS = settings(max_examples=20, deadline=None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def frob_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def eckart_young(dense: torch.Tensor, k: int) -> float:
    """Best possible relative Frobenius error of a rank-k approximation, from the dense spectrum."""
    s = torch.linalg.svdvals(dense.reshape(dense.shape[0], -1).double())
    return math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum()))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_module(out, inn, r, scale, seed, kernel=None, tucker=False):
    g = gen(seed)
    if kernel is None:
        d = LoRA(torch.randn(r, inn, generator=g), torch.randn(out, r, generator=g))
        return AdapterModule(d, scale=scale, layout=Layout("linear", False, (out, inn)))
    k = (kernel, kernel)
    if tucker:
        d = LoRA(torch.randn(r, inn, 1, 1, generator=g), torch.randn(out, r, 1, 1, generator=g),
                 torch.randn(r, r, *k, generator=g))
    else:
        d = LoRA(torch.randn(r, inn, *k, generator=g), torch.randn(out, r, 1, 1, generator=g))
    return AdapterModule(d, scale=scale, layout=Layout("conv", False, (out, inn, *k)))


@SETTINGS
@given(out=st.integers(1, 24), inn=st.integers(1, 24), r=st.integers(1, 6), seed=st.integers(0, 10_000),
       scale=st.sampled_from([1.0, 0.5, 2.0, 0.3, 7.0]), conv=st.sampled_from([None, "plain", "tucker"]),
       to=st.sampled_from(["loha", "lokr", "full"]))
def test_lora_to_loha_lokr_is_exact(out, inn, r, seed, scale, conv, to):
    m = lora_module(out, inn, r, scale, seed, kernel=None if conv is None else 3, tucker=conv == "tucker")
    new, row = types.convert_module(m, to)
    assert new.kind == to and new.scale == scale and row["exact"] and row["rel_error"] == 0.0
    assert rel_err(new.delta_weight(), m.delta_weight()) <= 1e-6
    if to == "loha":
        # PEFT needs both Hadamard factors at the LoRA's rank
        assert new.delta.w1b.shape[0] == new.delta.w2b.shape[0] == r
    if to == "lokr" and conv != "tucker":
        assert tuple(new.delta.w1.shape) == (1, 1)


@SETTINGS
@given(out=st.integers(2, 30), inn=st.integers(2, 30), r1=st.integers(1, 4), r2=st.integers(1, 4),
       k=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_loha_to_lora_matches_eckart_young(out, inn, r1, r2, k, seed):
    g = gen(seed)
    d = LoHa(torch.randn(out, r1, generator=g), torch.randn(r1, inn, generator=g),
             torch.randn(out, r2, generator=g), torch.randn(r2, inn, generator=g))
    m = AdapterModule(d, scale=0.75, layout=Layout("linear", False, (out, inn)))
    dense = m.delta_weight()
    new, row = types.convert_module(m, "lora", rank=k)
    kk = min(k, out, inn, r1 * r2)
    assert new.rank == row["new_rank"] == kk
    best = eckart_young(dense, kk)
    # the reported error is the spectrum's, and it is what the LoRA really achieves: the optimum
    assert row["rel_error"] == pytest.approx(best, abs=2e-5)
    assert frob_rel(new.delta_weight(), dense) == pytest.approx(best, abs=2e-5)
    assert row["method"] == ("factored" if r1 * r2 < min(out, inn) else "dense")
    assert row["exact"] == (best < 1e-6)


def test_loha_factored_rank_is_khatri_rao():
    g = gen(0)
    d = LoHa(torch.randn(40, 3, generator=g), torch.randn(3, 50, generator=g),
             torch.randn(40, 2, generator=g), torch.randn(2, 50, generator=g))
    up, down = types.loha_factors(d)
    assert up.shape == (40, 6) and down.shape == (6, 50)
    assert rel_err(up @ down, d.product()) <= 1e-6
    m = AdapterModule(d, scale=1.0, layout=Layout("linear", False, (40, 50)))
    new, row = types.convert_module(m, "lora")  # no rank: lossless, rank ≤ r1·r2
    assert row["method"] == "factored" and new.rank == 6 and row["exact"]
    assert rel_err(new.delta_weight(), m.delta_weight()) <= 1e-5


LOKR_CASES = [
    dict(w1=(3, 4), w2=(10, 5)),                      # both full (LyCORIS 'full' LoKr)
    dict(w1=(3, 4), w2a=(10, 2), w2b=(2, 5)),         # w2 low rank
    dict(w1a=(4, 1), w1b=(1, 6), w2a=(8, 2), w2b=(2, 3)),  # both low rank
]


@pytest.mark.parametrize("case", LOKR_CASES)
@pytest.mark.parametrize("rank", [None, 1, 3, 5])
def test_lokr_to_lora_kron_of_factor_svds(case, rank):
    g = gen(1)
    d = LoKr(**{k: torch.randn(*s, generator=g) for k, s in case.items()})
    m = AdapterModule(d, scale=2.5, layout=Layout("linear"))
    dense = m.delta_weight()
    new, row = types.convert_module(m, "lora", rank=rank)
    k = new.rank
    assert row["rel_error"] == pytest.approx(eckart_young(dense, k), abs=2e-5)
    assert frob_rel(new.delta_weight(), dense) == pytest.approx(eckart_young(dense, k), abs=2e-5)
    # the factored rank is the product of the factors' ranks, never the dense size
    r1 = min(d.w1.shape) if d.w1 is not None else d.w1b.shape[0]
    r2 = min(d.w2.shape) if d.w2 is not None else d.w2b.shape[0]
    assert row["factored_rank"] == (r1 * r2 if r1 * r2 < min(dense.shape) else min(dense.shape))


def test_lokr_conv_to_lora_keeps_kernel():
    g = gen(2)
    d = LoKr(w1a=torch.randn(3, 1, generator=g), w1b=torch.randn(1, 4, generator=g),
             w2=torch.randn(5, 2, 3, 3, generator=g))
    m = AdapterModule(d, scale=1.0, layout=Layout("conv"))
    new, row = types.convert_module(m, "lora")
    assert new.delta.down.shape[1:] == (8, 3, 3) and new.delta.up.shape[0] == 15
    assert rel_err(new.delta_weight(), m.delta_weight()) <= 1e-5


def test_energy_selection_and_full_diff():
    g = gen(3)
    u = torch.linalg.qr(torch.randn(30, 30, generator=g))[0]
    v = torch.linalg.qr(torch.randn(20, 20, generator=g))[0]
    s = torch.tensor([10.0, 5.0, 1.0, 0.1] + [0.0] * 16)
    diff = (u[:, :20] * s) @ v.T
    m = AdapterModule(FullDiff(diff), scale=1.0, layout=Layout("linear", False, (30, 20)))
    new, row = types.convert_module(m, "lora", energy=0.99)
    total = float((s ** 2).sum())
    assert new.rank == 2 and (100 + 25) / total >= 0.99 and 100 / total < 0.99
    assert row["rel_error"] == pytest.approx(math.sqrt((1 + 0.01) / total), rel=1e-4)
    new, row = types.convert_module(m, "lora")  # numerical rank: 4
    assert new.rank == 4 and row["exact"]


def test_convert_type_report_and_peft_consumer(tmp_path):
    """LoRA → LoHa/LoKr adapters written as PEFT load in peft and merge to the same weights."""
    peft = pytest.importorskip("peft")
    from peft_surgery.formats import load_adapter, save_adapter
    from tests.models import tiny_llama

    model = tiny_llama()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    mods = {}
    for i, n in enumerate(names):
        w = model.get_submodule(n).weight
        mods[n] = lora_module(w.shape[0], w.shape[1], 4, 0.5 * (i + 1), i)
    lora = Adapter(modules=mods)
    for to in ("loha", "lokr"):
        report = ConvertReport()
        conv = types.convert_type(lora, to, report=report)
        assert [r["module"] for r in report.rows] == names and all(r["exact"] for r in report.rows)
        save_adapter(conv, tmp_path / to, format="peft")
        back = load_adapter(tmp_path / to)
        for n in names:
            assert rel_err(back[n].delta_weight(), lora[n].delta_weight()) <= 1e-6
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / to))
        merged = pm.merge_and_unload()
        for n in names:
            base = model.get_submodule(n).weight.detach()
            got = merged.get_submodule(n).weight.detach() - base
            assert rel_err(got, lora[n].delta_weight()) <= 1e-5, (to, n)


def test_lossy_report_notes():
    g = gen(4)
    d = LoHa(torch.randn(16, 4, generator=g), torch.randn(4, 16, generator=g),
             torch.randn(16, 4, generator=g), torch.randn(4, 16, generator=g))
    a = Adapter(modules={"x": AdapterModule(d, scale=1.0, layout=Layout("linear", False, (16, 16)))})
    report = ConvertReport()
    out = types.convert_type(a, "lora", rank=2, report=report)
    assert out["x"].rank == 2 and not report.rows[0]["exact"]
    assert report.rows[0]["rel_error"] > 0 and "1 lossy" in report.notes[0]
    with pytest.raises(ValueError):
        types.convert_type(a, "lora", rank=2, energy=0.9)


def test_factored_svd_used_for_lokr_matches_dense_spectrum():
    g = gen(5)
    d = LoKr(w1=torch.randn(4, 4, generator=g), w2a=torch.randn(16, 2, generator=g), w2b=torch.randn(2, 16, generator=g))
    up, down = types.lokr_factors(d)
    assert up.shape[1] == 8
    s_fact = factored_svd([up], [down]).S
    s_dense = torch.linalg.svdvals(d.product())
    assert torch.allclose(s_fact[:8], s_dense[:8], rtol=1e-4, atol=1e-4)
