"""Math of peft_surgery.surgery.init: PiSSA / OLoRA / MiLoRA factors, to_lora, recompress (no files, no models)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_surgery.surgery import init as I

SETTINGS = settings(max_examples=25, deadline=None)


def _matrix(out: int, inn: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # decaying spectrum, distinct singular values (so PiSSA's subspace is unique)
    k = min(out, inn)
    U, _ = torch.linalg.qr(torch.randn(out, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(inn, k, generator=g, dtype=torch.float64))
    S = torch.linspace(3.0, 0.1, k, dtype=torch.float64) ** 2
    return (U * S @ V.T).to(dtype)


shapes = st.tuples(st.integers(2, 24), st.integers(2, 24))


@SETTINGS
@given(shape=shapes, frac=st.floats(0.01, 1.0), scale=st.sampled_from([0.25, 1.0, 2.0, 1 / math.sqrt(3)]),
       seed=st.integers(0, 1000), method=st.sampled_from(["pissa", "olora", "milora"]))
def test_residual_plus_adapter_is_w(shape, frac, scale, seed, method):
    W = _matrix(*shape, seed)
    r = max(1, int(frac * min(shape)))
    up, down, res = I.init_factors(method, W, r, scale)
    assert up.shape == (shape[0], r) and down.shape == (r, shape[1]) and res.shape == W.shape
    assert up.dtype == down.dtype == res.dtype == torch.float32
    torch.testing.assert_close(res + scale * up @ down, W, atol=1e-5, rtol=1e-5)


@SETTINGS
@given(shape=shapes, frac=st.floats(0.01, 1.0), scale=st.sampled_from([0.5, 1.0, 4.0]), seed=st.integers(0, 1000))
def test_pissa_is_principal_part_eckart_young(shape, frac, scale, seed):
    W = _matrix(*shape, seed, torch.float64)
    r = max(1, int(frac * min(shape)))
    up, down, res = I.pissa(W, r, scale)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    principal = U[:, :r] * S[:r] @ Vh[:r]
    torch.testing.assert_close(scale * up @ down, principal, atol=1e-10, rtol=1e-10)
    # Eckart–Young: the residual is the optimal rank-r error
    assert math.isclose(float(res.norm()), float(S[r:].norm()), rel_tol=1e-9, abs_tol=1e-12)
    # PEFT's split: A = √(S/s)·Vh, B = U·√(S/s), so BᵀB = AAᵀ = diag(S/s)
    torch.testing.assert_close(up.T @ up, torch.diag(S[:r] / scale), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(down @ down.T, torch.diag(S[:r] / scale), atol=1e-10, rtol=1e-10)
    assert math.isclose(I.captured_energy(W, up, down, scale), float((S[:r] ** 2).sum() / (S ** 2).sum()),
                        rel_tol=1e-9)


@SETTINGS
@given(shape=shapes, frac=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_milora_takes_minor_components(shape, frac, seed):
    W = _matrix(*shape, seed, torch.float64)
    r = max(1, int(frac * min(shape)))
    up, down, res = I.milora(W, r, 1.0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    k = S.numel()
    torch.testing.assert_close(up @ down, U[:, k - r:] * S[k - r:] @ Vh[k - r:], atol=1e-10, rtol=1e-10)
    assert math.isclose(float(res.norm()), float(S[: k - r].norm()), rel_tol=1e-9, abs_tol=1e-12)


@SETTINGS
@given(shape=shapes, frac=st.floats(0.01, 1.0), scale=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 1000))
def test_olora_matches_peft_definition(shape, frac, scale, seed):
    W = _matrix(*shape, seed, torch.float64)
    r = max(1, int(frac * min(shape)))
    up, down, res = I.olora(W, r, scale)
    Q, R = torch.linalg.qr(W)
    assert torch.equal(up, Q[:, :r]) and torch.equal(down, R[:r])  # PEFT: B = Q_r, A = R_r (scale not divided)
    torch.testing.assert_close(up.T @ up, torch.eye(r, dtype=W.dtype), atol=1e-10, rtol=0)
    # B·A is the projection of W on the first r Gram–Schmidt directions; the residual is W − s·that
    torch.testing.assert_close(up @ down, up @ up.T @ W, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(res, W - scale * (up @ up.T @ W), atol=1e-10, rtol=1e-10)


def test_half_precision_inputs_compute_in_fp32():
    W = _matrix(20, 12, 3).to(torch.bfloat16)
    up, down, res = I.pissa(W, 4, 1.0)
    assert up.dtype == down.dtype == res.dtype == torch.float32
    ref_up, ref_down, _ = I.pissa(W.float(), 4, 1.0)
    torch.testing.assert_close(up @ down, ref_up @ ref_down)


def test_randomized_pissa_is_seeded_and_close_to_exact():
    W = _matrix(64, 40, 7)
    a = I.pissa(W, 6, 1.0, niter=4, seed=3)
    b = I.pissa(W, 6, 1.0, niter=4, seed=3)
    assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and torch.equal(a.residual, b.residual)
    exact = I.pissa(W, 6, 1.0)
    # the identity holds exactly for the approximate factors too (residual is computed from them)
    torch.testing.assert_close(a.residual + a.up @ a.down, W, atol=1e-5, rtol=1e-5)
    # and the subspace is essentially the exact one for a decaying spectrum
    rel = float((a.up @ a.down - exact.up @ exact.down).norm() / (exact.up @ exact.down).norm())
    assert rel < 1e-3
    # and its residual is within 0.1% of the Eckart–Young optimum
    assert float(a.residual.norm()) <= 1.001 * float(exact.residual.norm())


@pytest.mark.parametrize("method", ["pissa", "olora", "milora"])
def test_bad_rank_and_scale(method):
    W = torch.randn(5, 3)
    with pytest.raises(ValueError, match="larger than the matrix"):
        I.init_factors(method, W, 4, 1.0)
    with pytest.raises(ValueError, match="rank must be"):
        I.init_factors(method, W, 0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        I.init_factors(method, W, 2, 0.0)
    with pytest.raises(TypeError, match="floating-point"):
        I.init_factors(method, W.to(torch.int8), 2, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        I.init_factors(method, torch.randn(3, 3, 3), 2, 1.0)


def test_rank_equal_to_min_dim_moves_everything():
    W = _matrix(7, 5, 1)
    up, down, res = I.pissa(W, 5, 1.0)
    assert float(res.norm()) < 1e-5 * float(W.norm())


@SETTINGS
@given(out=st.integers(2, 20), inn=st.integers(2, 20), r=st.integers(1, 6), seed=st.integers(0, 1000))
def test_to_lora_concat_is_difference(out, inn, r, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)
    B0, A0 = torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)
    up, down = I.to_lora((B, A), (B0, A0))
    assert up.shape == (out, 2 * r) and down.shape == (2 * r, inn)
    assert torch.equal(down, torch.cat([A, A0], 0)) and torch.equal(up, torch.cat([B, -B0], 1))
    torch.testing.assert_close(up @ down, B @ A - B0 @ A0, atol=1e-5, rtol=1e-5)


def test_to_lora_rejects_mismatched_factors():
    with pytest.raises(ValueError, match="do not fit"):
        I.to_lora((torch.zeros(4, 2), torch.zeros(2, 3)), (torch.zeros(5, 2), torch.zeros(2, 3)))


def test_converted_alpha_keeps_scale():
    from peft_surgery.surgery.delta import rank_scale

    for r, a in [(4, 8.0), (16, 16.0), (3, 1.5)]:
        assert rank_scale(I.converted_alpha(a), 2 * r) == pytest.approx(rank_scale(a, r))
        assert rank_scale(I.converted_alpha(a, True), 2 * r, True) == pytest.approx(rank_scale(a, r, True))


@SETTINGS
@given(out=st.integers(3, 24), inn=st.integers(3, 24), r=st.integers(1, 6), k=st.integers(1, 8),
       scale=st.sampled_from([0.5, 1.0, 3.0]), seed=st.integers(0, 1000))
def test_recompress_is_eckart_young_optimal(out, inn, r, k, scale, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(out, r, generator=g, dtype=torch.float64), torch.randn(r, inn, generator=g, dtype=torch.float64)
    dense = scale * B @ A
    up, down, err = I.recompress(B, A, k, scale)
    S = torch.linalg.svdvals(dense)
    kk = min(k, min(out, inn, r))
    expected = float(S[kk:].norm() / S.norm())
    assert up.shape[1] == down.shape[0] <= k
    assert math.isclose(err, expected, rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(float((dense - up @ down).norm() / dense.norm()), expected, rel_tol=1e-6, abs_tol=1e-7)
