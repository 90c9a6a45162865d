"""Extraction math: exact low-rank recovery, Eckart–Young optimality, randomized accuracy, budget allocation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_surgery.checkpoint import save_tensors
from peft_surgery.extract import decompose, decompose_adaptive, extract_adapter, truncation_error
from peft_surgery.surgery.linalg import low_rank_error, select_rank, split_scale
from peft_surgery.surgery.rank import (ModuleSpectrum, allocate_budget, allocation_energy, allocation_params,
                                       uniform_ranks)

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _low_rank(m: int, n: int, r: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)


def _optimum(M: torch.Tensor, r: int) -> float:
    """Eckart–Young: the best rank-r relative error is sqrt(Σ_{i≥r} σ_i²)/‖M‖ (dense float64 SVD)."""
    s = torch.linalg.svdvals(M.double())
    return math.sqrt(float((s[r:] ** 2).sum()) / float((s ** 2).sum()))


@FAST
@given(m=st.integers(4, 40), n=st.integers(4, 40), true_rank=st.integers(1, 6), extra=st.integers(0, 3),
       method=st.sampled_from(["exact", "randomized", "auto"]), seed=st.integers(0, 2**16))
def test_exact_low_rank_diff_is_reproduced(m, n, true_rank, extra, method, seed):
    true_rank = min(true_rank, m, n)
    M = _low_rank(m, n, true_rank, seed, torch.float32)
    svd = decompose(M, true_rank + extra, method=method, seed=seed)
    up, down = split_scale(svd, svd.rank)
    assert torch.allclose(up @ down, M, atol=2e-5 * float(M.abs().max()) + 1e-6)


@FAST
@given(m=st.integers(3, 48), n=st.integers(3, 48), r=st.integers(1, 12), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 0.5, 4.0]), distribute=st.booleans())
def test_exact_backend_error_is_eckart_young_optimum(m, n, r, seed, scale, distribute):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(m, n, generator=g, dtype=torch.float64)
    r = min(r, m, n)
    svd = decompose(M, r, method="exact")
    up, down = split_scale(svd, r, scale=scale, distribute=distribute)
    err = low_rank_error(M, up, down, scale=scale)
    opt = _optimum(M, r)
    assert err == pytest.approx(opt, rel=1e-9, abs=1e-12)
    # and the error the report shows is the same number (direct residual when small, else from the spectrum)
    assert truncation_error(svd, r, M) == pytest.approx(opt, rel=1e-7, abs=1e-12)


def _spectrum_matrix(m: int, n: int, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":  # flat spectrum: the hardest case for a randomized range finder
        return torch.randn(m, n, generator=g)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    i = torch.arange(1, k + 1, dtype=torch.float32)
    s = {"power": i ** -0.5, "exp": torch.exp(-i / 10), "lowrank+noise": torch.where(i <= 6, 5.0, 0.05)}[kind]
    return (U * s) @ V.T


@settings(max_examples=25, deadline=None)
@given(m=st.integers(40, 160), n=st.integers(40, 160), frac=st.floats(0.02, 0.25),
       kind=st.sampled_from(["gaussian", "power", "exp", "lowrank+noise"]), seed=st.integers(0, 2**16))
def test_randomized_within_one_percent_of_optimum(m, n, frac, kind, seed):
    M = _spectrum_matrix(m, n, kind, seed)
    r = max(1, int(frac * min(m, n)))
    svd = decompose(M, r, method="randomized", seed=seed)
    up, down = split_scale(svd, r)
    err = low_rank_error(M, up, down)
    opt = _optimum(M, r)
    assert err <= 1.01 * opt + 1e-6


@settings(max_examples=15, deadline=None)
@given(m=st.integers(64, 160), n=st.integers(64, 160), r=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_auto_picks_randomized_for_small_rank_and_stays_within_one_percent(m, n, r, seed):
    M = _spectrum_matrix(m, n, "gaussian", seed)
    svd = decompose(M, r, method="auto", seed=seed)
    assert svd.rank == r
    assert svd.relative_error(r) <= 1.01 * _optimum(M, r)


def test_decompose_is_deterministic_under_seed():
    M = _spectrum_matrix(120, 90, "power", 3)
    a = decompose(M, 5, method="randomized", seed=7)
    b = decompose(M, 5, method="randomized", seed=7)
    c = decompose(M, 5, method="randomized", seed=8)
    assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh)
    assert not torch.equal(a.U, c.U)


@FAST
@given(m=st.integers(40, 120), n=st.integers(40, 120), energy=st.floats(0.3, 0.99),
       method=st.sampled_from(["exact", "randomized", "auto"]), seed=st.integers(0, 2**16))
def test_energy_rank_uses_exact_total_energy(m, n, energy, method, seed):
    M = _spectrum_matrix(m, n, "power", seed).double()
    svd = decompose_adaptive(M, energy=energy, method=method, seed=seed, start_rank=4)
    k = select_rank(svd, energy=energy)
    s2 = torch.linalg.svdvals(M) ** 2
    cum = torch.cumsum(s2, 0) / s2.sum()
    expected = int((cum < energy * (1 - 1e-12)).sum()) + 1
    # randomized singular values can only be (slightly) smaller, so the rank is never too small
    assert k >= expected
    assert k <= expected + (0 if method == "exact" else 2)
    assert svd.retained_energy(k) >= energy * float(s2.sum()) * (1 - 1e-9)


# ---------------------------------------------------------------------------------------------------------
# Budget allocation
# ---------------------------------------------------------------------------------------------------------


@st.composite
def spectra_sets(draw):
    n_mod = draw(st.integers(1, 6))
    out = []
    for i in range(n_mod):
        k = draw(st.integers(1, 12))
        vals = draw(st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=k, max_size=k))
        s = torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)
        tail = draw(st.floats(0.0, 50.0))
        total = float((s ** 2).sum()) + tail
        out.append(ModuleSpectrum(f"m{i}", s, total, draw(st.integers(1, 40))))
    return out


@settings(max_examples=30, deadline=None)
@given(spectra=spectra_sets(), u=st.integers(0, 12), slack=st.integers(0, 30))
def test_budget_allocation_never_worse_than_uniform(spectra, u, slack):
    uni = uniform_ranks(spectra, u)
    budget = allocation_params(spectra, uni) + slack
    alloc = allocate_budget(spectra, budget)
    assert alloc.params <= budget
    assert alloc.params == allocation_params(spectra, alloc.ranks)
    assert all(0 <= alloc.ranks[s.name] <= s.cap for s in spectra)
    assert alloc.retained_energy >= allocation_energy(spectra, uni) - 1e-9
    assert alloc.retained_energy == pytest.approx(allocation_energy(spectra, alloc.ranks))


def test_budget_allocation_prefers_modules_with_energy():
    # one module holds nearly all the change: the budget should go there, not be spread uniformly
    hot = ModuleSpectrum("hot", torch.tensor([10.0, 9.0, 8.0, 7.0]), 294.0, 10)
    cold = [ModuleSpectrum(f"c{i}", torch.tensor([0.1, 0.05, 0.01, 0.0]), 0.0126, 10) for i in range(3)]
    alloc = allocate_budget([hot, *cold], 40)
    assert alloc.ranks["hot"] == 4 and alloc.method == "greedy"
    assert alloc.retained_energy > allocation_energy([hot, *cold], uniform_ranks([hot, *cold], 1))


# ---------------------------------------------------------------------------------------------------------
# Checkpoint-level: conv layout, budget mode, dtypes, determinism
# ---------------------------------------------------------------------------------------------------------


def _pair(tmp_path, deltas: dict[str, torch.Tensor], base: dict[str, torch.Tensor], ft_dtype=None):
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    save_tensors(base, tmp_path / "base" / "model.safetensors")
    ft = {k: (v + deltas[k] if k in deltas else v.clone()) for k, v in base.items()}
    if ft_dtype is not None:
        ft = {k: v.to(ft_dtype) for k, v in ft.items()}
    save_tensors(ft, tmp_path / "ft" / "model.safetensors")
    return tmp_path / "base", tmp_path / "ft"


def test_conv_weights_become_conv_lora(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(8, 6, 3, 3, generator=g), "lin.weight": torch.randn(10, 12, generator=g)}
    A = torch.randn(2, 6 * 9, generator=g)
    B = torch.randn(8, 2, generator=g)
    deltas = {"conv.weight": (B @ A).reshape(8, 6, 3, 3)}
    b, f = _pair(tmp_path, deltas, base)
    adapter, report = extract_adapter(b, f, rank=2, svd="exact")
    m = adapter["conv"]
    assert m.layout.kind == "conv"
    assert tuple(m.delta.down.shape) == (2, 6, 3, 3) and tuple(m.delta.up.shape) == (8, 2, 1, 1)
    assert torch.allclose(m.delta_weight(), deltas["conv.weight"], atol=1e-5)
    assert report.totals["unchanged_skipped"] == 1 and "lin" not in adapter.modules


def test_budget_mode_respects_budget_and_beats_uniform(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {f"l{i}.weight": torch.randn(48, 40, generator=g) for i in range(4)}
    # very different spectra: a strong rank-6 change, weak changes elsewhere
    deltas = {"l0.weight": _low_rank(48, 40, 6, 2, torch.float32),
              **{f"l{i}.weight": 0.01 * torch.randn(48, 40, generator=g) for i in range(1, 4)}}
    b, f = _pair(tmp_path, deltas, base)
    budget = 4 * 3 * (48 + 40)  # what uniform rank 3 costs
    adapter, report = extract_adapter(b, f, param_budget=budget, svd="exact")
    assert adapter.num_params <= budget
    ranks = adapter.ranks()
    assert ranks["l0"] == 6  # the energy is there
    uni, _ = extract_adapter(b, f, rank=3, svd="exact")
    assert uni.num_params == budget

    def sq_error(ad):  # total squared error; a module the budget dropped keeps its whole ΔW as error
        return sum(float(((ad[k[:-7]].delta_weight() if k[:-7] in ad.modules else 0) - d).pow(2).sum())
                   for k, d in deltas.items())

    assert sq_error(adapter) < sq_error(uni)
    assert report.totals["rank_mode"] == "budget"


def test_size_budget_and_dtypes(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {f"l{i}.weight": torch.randn(32, 32, generator=g) for i in range(3)}
    deltas = {k: _low_rank(32, 32, 2, i, torch.float32) for i, k in enumerate(base)}
    b, f = _pair(tmp_path, deltas, base, ft_dtype=torch.bfloat16)  # BASE fp32, FT bf16
    adapter, report = extract_adapter(b, f, size="1KB")
    assert all(t.dtype == torch.bfloat16 for m in adapter.modules.values() for _, t in m.tensors())
    assert report.totals["adapter_bytes"] <= 1000
    assert adapter.num_params <= 500


def test_extraction_is_deterministic(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"w.weight": torch.randn(200, 180, generator=g)}
    b, f = _pair(tmp_path, {"w.weight": torch.randn(200, 180, generator=g)}, base)
    a1, _ = extract_adapter(b, f, rank=8, svd="randomized", seed=5)
    a2, _ = extract_adapter(b, f, rank=8, svd="randomized", seed=5)
    assert torch.equal(a1["w"].delta.up, a2["w"].delta.up) and torch.equal(a1["w"].delta.down, a2["w"].delta.down)


def test_cuda_matches_cpu(tmp_path, cuda_device):
    g = torch.Generator().manual_seed(4)
    base = {"w.weight": torch.randn(96, 80, generator=g), "n.weight": torch.ones(96)}
    deltas = {"w.weight": _low_rank(96, 80, 3, 1, torch.float32), "n.weight": torch.full((96,), 0.5)}
    b, f = _pair(tmp_path, deltas, base)
    cpu, _ = extract_adapter(b, f, rank=3, device="cpu")
    gpu, rep = extract_adapter(b, f, rank=3, device=cuda_device)
    assert rep.totals["device"].startswith("cuda")
    assert gpu["w"].delta.up.device.type == "cpu"  # only factors come back, on CPU
    assert torch.allclose(gpu["w"].delta_weight(), cpu["w"].delta_weight(), atol=1e-5)
    assert torch.equal(gpu.modules_to_save["n.weight"], cpu.modules_to_save["n.weight"])


def test_background_reader_gives_same_result_and_passes_errors(tmp_path, monkeypatch):
    import sys

    from peft_surgery.checkpoint import Checkpoint
    from peft_surgery.errors import SurgeryError

    mod = sys.modules["peft_surgery.extract"]
    g = torch.Generator().manual_seed(6)
    base = {f"l{i}.weight": torch.randn(40, 30, generator=g) for i in range(5)}
    deltas = {k: _low_rank(40, 30, 2, i, torch.float32) for i, k in enumerate(base)}
    b, f = _pair(tmp_path, deltas, base)
    inline, _ = extract_adapter(b, f, rank=2, svd="randomized")
    monkeypatch.setattr(mod, "_overlap_reads", lambda device: True)
    threaded, _ = extract_adapter(b, f, rank=2, svd="randomized")
    for name in inline.modules:
        assert torch.equal(inline[name].delta.up, threaded[name].delta.up)

    real = Checkpoint.get_tensor

    def failing(self, key):
        if key == "l3.weight":
            raise SurgeryError("cannot read tensor: simulated", path=self.source, tensor=key)
        return real(self, key)

    monkeypatch.setattr(Checkpoint, "get_tensor", failing)
    with pytest.raises(SurgeryError, match="l3.weight"):
        extract_adapter(b, f, rank=2)
