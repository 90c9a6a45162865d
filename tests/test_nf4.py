"""NF4/FP4 + double quantization: bit-compatibility with real bitsandbytes and the CUDA kernel rules.

References used here are independent of the implementation under test: bitsandbytes 0.50 itself (CPU
backend), plus numpy/Python ports of the CUDA decision rules (``dQuantizeNF4``, ``dQuantizeFP4`` and the
7-step ``dQuantize<0>`` binary search) written directly from the kernel's description.
"""

from __future__ import annotations

import hashlib
import json
import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peft_surgery.errors import FormatError, SurgeryError
from peft_surgery.surgery import nf4

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message=".*kernels.*")
F = pytest.importorskip("bitsandbytes.functional")

STARRED = (0, 8, 12, 14)  # NF4 thresholds where nvcc's literal is one ulp off torch's float32 midpoint
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_dynamo():
    # bnb's default CPU dequant path is wrapped in torch.compile; compiling per shape is slow and irrelevant here.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


# --------------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------------


def ref_normalized(x: torch.Tensor, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """x_n = x * (1/absmax) in numpy float32 (IEEE reciprocal), one per element; and the absmax per block."""
    a = x.detach().reshape(-1).float().numpy()
    n = a.size
    rows = -(-n // blocksize)
    pad = np.zeros(rows * blocksize, dtype=np.float32)
    pad[:n] = a
    am = np.abs(pad.reshape(rows, blocksize)).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (np.float32(1.0) / am).astype(np.float32)
        xn = (pad.reshape(rows, blocksize) * r[:, None]).astype(np.float32).reshape(-1)
    return xn, am


def ref_codes(xn: np.ndarray, quant_type: str) -> np.ndarray:
    """CUDA decision trees: strict '>' compares against the compiled thresholds; NaN falls to code 0."""
    T = nf4.cuda_thresholds(quant_type).numpy()
    if quant_type == "nf4":
        codes = (xn[:, None] > T[None, :]).sum(1)
    else:
        mag = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011])
        codes = mag[(np.abs(xn)[:, None] > T[None, :]).sum(1)] + np.where(xn < 0, 8, 0)
    codes[np.isnan(xn)] = 0
    return codes.astype(np.uint8)


def ref_pack(x: torch.Tensor, quant_type: str, blocksize: int) -> np.ndarray:
    xn, _ = ref_normalized(x, blocksize)
    n = x.numel()
    codes = ref_codes(xn, quant_type)[: n + (n & 1)]  # odd n: one padded 0.0 in the last (partial) block
    return (codes[0::2] << 4) | codes[1::2]


def ref_dquantize(x: float, code: list[float]) -> int:
    """Python port of CUDA dQuantize<0> (7-step binary search, float32 midpoint compare)."""
    x = f32(x)
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        if x > val:
            lower_pivot = pivot
            pivot += i
        else:
            upper_pivot = pivot
            pivot -= i
        val = code[pivot]
    upper, lower = code[upper_pivot], code[lower_pivot]
    if x > val:
        return upper_pivot if x > f32(f32(upper + val) * 0.5) else pivot
    return lower_pivot if x < f32(f32(lower + val) * 0.5) else pivot


def bnb_state(packed: torch.Tensor, state: nf4.QuantState4bit):
    sd = state.to_state_dict(packed, prefix="weight")
    return F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in sd.items() if k != "weight"},
                                  device=torch.device("cpu"))


def bnb_dequantize(packed: torch.Tensor, state: nf4.QuantState4bit) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit of our state, flattened.

    Two bnb 0.50 CPU quirks are side-stepped by calling its flat (CUDA-equivalent) torch kernel with bnb's own
    scale dequantization: a packed tensor of one byte, shape (1, 1), hits the legacy "transposed input" shim;
    and the C++ CPU kernel (used when the last dimension is even) indexes blocks per row, so its output is wrong
    when the row length is not a multiple of the blocksize (e.g. (3, 96) with blocksize 64).
    """
    qs = bnb_state(packed, state)
    last = state.shape[-1]
    if packed.shape[0] > 1 and (len(state.shape) == 1 or last % 2 or last % state.blocksize == 0):
        return F.dequantize_4bit(packed, qs).reshape(-1)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = F.get_4bit_type(qs.quant_type, device="cpu")
    return _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), code, qs.blocksize, qs.shape,
                                    qs.dtype).reshape(-1)


# --------------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------------


def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4.code_table("nf4"), F.get_4bit_type("nf4", device="cpu").float())
    assert torch.equal(nf4.code_table("fp4"), F.get_4bit_type("fp4", device="cpu").float())
    assert hashlib.sha256(nf4.code_table("nf4").numpy().tobytes()).hexdigest() == \
        "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"
    dyn = nf4.dynamic_map()
    assert hashlib.sha256(dyn.numpy().tobytes()).hexdigest() == nf4.DYNAMIC_MAP_SHA256
    assert torch.equal(dyn, F.create_dynamic_map(signed=True).float())
    assert bool((dyn[1:] > dyn[:-1]).all()) and dyn[255] == 1.0 and dyn[127] == 0.0


def test_nf4_thresholds_are_midpoints_except_four_nvcc_roundings():
    code = nf4.code_table("nf4")
    mid = (code[:-1] + code[1:]) / 2  # float32, as torch (and bnb 0.50 CPU) computes it
    T = nf4.cuda_thresholds("nf4")
    differ = [k for k in range(15) if T[k] != mid[k]]
    assert differ == list(STARRED)
    for k in STARRED:  # one ulp apart, and the exact midpoint (float64) lies half-way between them
        assert abs(int(T[k].view(torch.int32)) - int(mid[k].view(torch.int32))) == 1
        exact = (code[k].double() + code[k + 1].double()) / 2
        assert abs(float(T[k]) - float(exact)) == pytest.approx(abs(float(mid[k]) - float(exact)), rel=1e-6)


def test_code_selection_matches_decision_tree_and_bucketize():
    T = nf4.cuda_thresholds("nf4")
    TF = nf4.cuda_thresholds("fp4")
    g = torch.Generator().manual_seed(0)
    edge = torch.cat([T, TF, -TF, torch.nextafter(T, torch.full_like(T, 2)), torch.nextafter(T, torch.full_like(T, -2)),
                      torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 5e-39, -5e-39])])
    x = torch.cat([torch.rand(200_000, generator=g) * 2.2 - 1.1, edge])
    consts = nf4._consts("cpu")
    for qt in nf4.QUANT_TYPES:
        ours = nf4._codes(x, qt, consts)
        assert np.array_equal(ours.numpy(), ref_codes(x.numpy(), qt))
        assert torch.equal(ours, nf4._codes_bucketize(x, qt))
    nan = torch.tensor([float("nan")])
    assert nf4._codes(nan, "nf4", consts).item() == 0 and nf4._codes(nan, "fp4", consts).item() == 0
    # a tie takes the lower code: x_n == T_k gives code k, the next float up gives k + 1
    assert nf4._codes(T, "nf4", consts).tolist() == list(range(15))


# --------------------------------------------------------------------------------------------------------
# Against bitsandbytes, hypothesis over shapes and dtypes
# --------------------------------------------------------------------------------------------------------

shapes = st.one_of(
    st.tuples(st.integers(1, 700)),
    st.tuples(st.integers(1, 40), st.integers(1, 90)),
    st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 33)),
)


def _tensor(shape, dtype, seed, scale, ties: bool, blocksize: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    if ties and flat.numel() >= blocksize:
        # First block: absmax exactly 1, so x_n == x; plant the CUDA thresholds and torch midpoints there.
        code = nf4.code_table("nf4")
        mid = (code[:-1] + code[1:]) / 2
        vals = torch.cat([torch.tensor([1.0]), nf4.cuda_thresholds("nf4"), mid[list(STARRED)]])
        flat[: vals.numel()] = vals
        flat[vals.numel():blocksize].clamp_(-0.9, 0.9)
    return x.to(dtype)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), scale=st.sampled_from([0.02, 1.0, 300.0]),
       blocksize=st.sampled_from([32, 64, 128]), ties=st.booleans())
@example(shape=(4, 64), dtype=torch.float32, seed=1, scale=1.0, blocksize=64, ties=True)
@example(shape=(3, 5, 31), dtype=torch.bfloat16, seed=2, scale=0.02, blocksize=128, ties=False)
def test_nf4_matches_bitsandbytes(shape, dtype, seed, scale, blocksize, ties):
    x = _tensor(shape, dtype, seed, scale, ties and dtype == torch.float32, blocksize)
    n = x.numel()
    packed, state = nf4.quantize_4bit(x, blocksize, "nf4", double_quant=False)
    bp, bs = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert packed.shape == bp.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(state.absmax, bs.absmax)
    # our bytes are exactly the CUDA rule ...
    assert np.array_equal(packed.flatten().numpy(), ref_pack(x, "nf4", blocksize))
    # ... and differ from bnb 0.50 CPU only where its rules differ from CUDA's: x_n on one of the four
    # one-ulp threshold gaps (bucketize on torch midpoints), the tail block (a division instead of a
    # reciprocal multiply) and all-zero blocks (0x77 instead of 0x00).
    ours_c = nf4.unpack_codes(packed, n).numpy()
    bnb_c = nf4.unpack_codes(bp, n).numpy()
    xn, am = ref_normalized(x, blocksize)
    xn = xn[:n]
    code = nf4.code_table("nf4")
    mid = ((code[:-1] + code[1:]) / 2).numpy()
    T = nf4.cuda_thresholds("nf4").numpy()
    gap_vals = np.array([max(T[k], mid[k]) for k in STARRED], dtype=np.float32)
    on_gap = np.isin(xn, gap_vals)
    block = np.arange(n) // blocksize
    tail = block == (n - 1) // blocksize if n % blocksize else np.zeros(n, bool)
    zero = am[block] == 0
    diff = ours_c != bnb_c
    assert not (diff & ~(on_gap | tail | zero)).any()
    if ties and dtype == torch.float32 and n >= blocksize and not tail[:blocksize].any():
        assert diff[:blocksize].sum() == len(STARRED)  # each planted torch-midpoint value is coded differently
    # dequantization equals bnb's dequantize_4bit of our state, bit for bit
    ours_d = nf4.dequantize(packed, state)
    assert ours_d.dtype == dtype and ours_d.shape == x.shape
    assert torch.equal(ours_d.reshape(-1), bnb_dequantize(packed, state))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       quant_type=st.sampled_from(nf4.QUANT_TYPES), nblocks_extra=st.sampled_from([0, 300, 700]))
def test_double_quant_matches_cuda_rule_and_bitsandbytes(shape, dtype, seed, quant_type, nblocks_extra):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(shape, generator=g).reshape(-1),
                   torch.randn(nblocks_extra * 64, generator=g) * 3]).to(dtype)  # >256 blocks: several nested blocks
    packed, state = nf4.quantize_4bit(x, 64, quant_type, double_quant=True)
    bp, bs = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
    # offset (torch.mean) and nested_absmax are bit-identical to bitsandbytes
    assert state.offset.dtype == torch.float32 and torch.equal(state.offset, bs.offset)
    assert torch.equal(state.nested_absmax, bs.state2.absmax)
    assert torch.equal(state.nested_code, bs.state2.code)
    # our uint8 scale codes follow the CUDA dQuantize<0> search exactly
    am = nf4.quantize_4bit(x, 64, quant_type, double_quant=False)[1].absmax
    v = (am - state.offset).numpy()
    am2 = state.nested_absmax.numpy()
    dyn = nf4.dynamic_map().tolist()
    idx = np.arange(v.size) // 256
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = v * (np.float32(1) / am2[idx]).astype(np.float32)
    expect = [ref_dquantize(float(t), dyn) for t in xs.astype(np.float32)]
    assert state.absmax.tolist() == expect
    # bnb 0.50's CPU kernel uses a 65,536-bin lookup table instead: rare, small index differences (documented)
    # (bins of 2/65535 on the normalized value): every differing code is within two bins of optimal.
    d = state.absmax.long() - bs.absmax.long()
    assert int(d.abs().max()) <= 4
    dyn_t = torch.tensor(dyn)
    xs_t = torch.from_numpy(xs.astype(np.float32)).double()
    ours_err = (xs_t - dyn_t[state.absmax.long()].double()).abs()
    bnb_err = (xs_t - dyn_t[bs.absmax.long()].double()).abs()
    ok = torch.isfinite(xs_t)  # NaN: a nested block whose scales all equal the offset (CUDA: code 0)
    assert bool((bnb_err <= ours_err + 2 * 2 / 65535)[ok].all())
    assert bool((ours_err <= bnb_err + 1e-12)[ok].all())  # ours is never the worse choice
    # the packed 4-bit codes do not depend on double quantization
    assert torch.equal(packed, nf4.quantize_4bit(x, 64, quant_type, double_quant=False)[0])
    # JSON blob: identical bytes
    assert state.json_bytes() == bytes(bs.as_dict(packed=True)[f"quant_state.bitsandbytes__{quant_type}"].tolist())
    # dequantized values equal bnb's dequantize_4bit of our state (scales: multiply, then add offset)
    ours_d = nf4.dequantize(packed, state)
    assert torch.equal(ours_d.reshape(-1), bnb_dequantize(packed, state))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 3000), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_fp4_differences_are_only_the_documented_ones(n, dtype, seed):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed))).to(dtype)
    packed, state = nf4.quantize_4bit(x, 64, "fp4", double_quant=False)
    bp, bs = F.quantize_4bit(x, blocksize=64, quant_type="fp4")
    assert torch.equal(state.absmax, bs.absmax)
    assert np.array_equal(packed.flatten().numpy(), ref_pack(x, "fp4", 64))
    ours_c = nf4.unpack_codes(packed, n).numpy()
    bnb_c = nf4.unpack_codes(bp, n).numpy()
    code = nf4.code_table("fp4").numpy()
    xn = ref_normalized(x, 64)[0][:n]
    # bnb CPU: bucketize on true midpoints, so |x_n| between a kernel literal and the true midpoint differs;
    # exact ties on negative values go the other way (it sorts the signed table); and it resolves ±0
    # differently (same value after dequantization).
    lit = nf4.cuda_thresholds("fp4").numpy()
    mags = np.sort(np.unique(np.abs(code)))
    true_mid = ((mags[:-1] + mags[1:]) / 2).astype(np.float32)
    a = np.abs(xn)
    in_gap = ((a[:, None] >= np.minimum(lit, true_mid)) & (a[:, None] <= np.maximum(lit, true_mid))).any(1)
    tail = (np.arange(n) // 64 == (n - 1) // 64) if n % 64 else np.zeros(n, bool)
    diff = ours_c != bnb_c
    same_value = code[ours_c] == code[bnb_c]
    assert not (diff & ~(same_value | in_gap | tail)).any()
    assert torch.equal(nf4.dequantize(packed, state).reshape(-1),
                       bnb_dequantize(packed, state))


def test_dynamic_codes_tie_rule_and_nearest():
    dyn = nf4.dynamic_map()
    mids = (dyn[:-1] + dyn[1:]) * 0.5
    got = nf4.dynamic_codes(mids, dyn)
    ups = int((got == torch.arange(1, 256)).sum())
    assert ((got == torch.arange(255)) | (got == torch.arange(1, 256))).all()
    assert ups == 127  # the CUDA search rounds 127 of the 255 exact midpoints up
    assert got.tolist() == [ref_dquantize(float(m), dyn.tolist()) for m in mids]
    g = torch.Generator().manual_seed(3)
    x = torch.rand(20_000, generator=g) * 2 - 1
    got = nf4.dynamic_codes(x, dyn)
    brute = (x[:, None].double() - dyn[None, :].double()).abs().argmin(1)
    assert torch.equal(got, brute)  # away from exact midpoints it is the nearest code
    assert nf4.dynamic_codes(torch.tensor([float("nan")]), dyn).item() == 0


# --------------------------------------------------------------------------------------------------------
# Conventions, sizes, round trips
# --------------------------------------------------------------------------------------------------------


def test_zero_block_odd_tail_and_single_block():
    x = torch.cat([torch.zeros(64), torch.ones(3)])
    packed, state = nf4.quantize_nf4(x, double_quant=False)
    b = packed.flatten().tolist()
    assert b[:32] == [0] * 32  # all-zero block: NaN path → code 0 (bnb 0.50 CPU writes 0x77)
    assert b[32:] == [0xFF, 0xF7]  # 1.0 → 15; odd n: padded 0.0 → 7 in the last low nibble
    bp, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert bp.flatten()[:32].tolist() == [0x77] * 32 and bp.flatten()[32:].tolist() == [0xFF, 0xF7]
    assert torch.equal(nf4.dequantize(packed, state), x)
    # a tensor of one block: absmax - offset == 0 → the nested scale is 0 and the scale is exactly the offset
    w = torch.randn(50)
    p, s = nf4.quantize_nf4(w)
    assert s.nested_absmax.item() == 0 and torch.equal(s.dequantize_absmax(), w.abs().amax().reshape(1))


@pytest.mark.parametrize("chunk", [64, 640, 1 << 12])
def test_chunking_does_not_change_results(chunk):
    x = torch.randn(3 * 4096 + 77, dtype=torch.bfloat16)
    p0, s0 = nf4.quantize_nf4(x)
    p1, s1 = nf4.quantize_nf4(x, chunk_size=chunk)
    assert torch.equal(p0, p1) and torch.equal(s0.absmax, s1.absmax) and torch.equal(s0.offset, s1.offset)
    assert torch.equal(nf4.dequantize(p0, s0), nf4.dequantize(p1, s1, chunk_size=chunk))


def test_bits_per_param_and_gaussian_error():
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02  # 4096 blocks, 16 nested blocks
    p, s = nf4.quantize_nf4(w, double_quant=True)
    assert s.bits_per_param() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel())  # ≈ 4.127
    assert round(s.bits_per_param(), 3) == 4.127
    p2, s2 = nf4.quantize_nf4(w, double_quant=False)
    assert s2.bits_per_param() == 4.5
    errs = {m: nf4.error_stats(w, nf4.roundtrip(w, m, 64, True)[0]) for m in nf4.METHODS}
    assert errs["nf4"]["rel_fro"] == pytest.approx(0.092, abs=0.003)  # Gaussian baseline from the reference
    assert errs["fp4"]["rel_fro"] == pytest.approx(0.122, abs=0.003)
    assert errs["nf4"]["rel_fro"] < errs["int4"]["rel_fro"] < errs["fp4"]["rel_fro"]
    st_ = errs["nf4"]
    assert st_["sqnr_db"] == pytest.approx(-20 * np.log10(st_["rel_fro"]))
    assert st_["mse"] == pytest.approx(st_["sse"] / w.numel())


def test_state_dict_round_trip_and_bnb_layout():
    w = torch.randn(96, 128, dtype=torch.bfloat16)
    packed, state = nf4.quantize_nf4(w)
    sd = state.to_state_dict(packed, prefix="model.q_proj.weight")
    assert {k.removeprefix("model.q_proj.weight") for k in sd} == {
        "", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4"}
    blob = json.loads(bytes(sd["model.q_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(blob) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert blob["dtype"] == "bfloat16" and blob["shape"] == [96, 128]
    p2, s2 = nf4.QuantState4bit.from_state_dict(sd, "model.q_proj.weight")
    assert torch.equal(nf4.dequantize(p2, s2), nf4.dequantize(packed, state))
    # bitsandbytes' own state dict reads back through the same function
    bp, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    bsd = {"w": bp, **{f"w.{k}": v for k, v in bs.as_dict(packed=True).items()}}
    p3, s3 = nf4.QuantState4bit.from_state_dict(bsd, "w")
    assert torch.equal(nf4.dequantize(p3, s3), F.dequantize_4bit(bp, bs))
    bad = dict(sd)
    bad["model.q_proj.weight.absmax"] = bad["model.q_proj.weight.absmax"][:-1]
    with pytest.raises(FormatError, match="absmax"):
        nf4.QuantState4bit.from_state_dict(bad, "model.q_proj.weight")


def test_quant_storage_view():
    w = torch.randn(64, 64)
    p, s = nf4.quantize_nf4(w, quant_storage=torch.bfloat16)
    bp, bs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16)
    assert p.dtype == torch.bfloat16 and p.shape == bp.shape
    assert torch.equal(nf4.packed_bytes(p), nf4.packed_bytes(nf4.quantize_nf4(w)[0]))
    assert torch.equal(nf4.dequantize(p, s), nf4.dequantize(*nf4.quantize_nf4(w)))


@pytest.mark.parametrize("bad", [torch.arange(64), torch.ones(64, dtype=torch.bool), torch.ones(64, dtype=torch.float64)])
def test_rejects_non_float_and_bad_blocksize(bad):
    with pytest.raises(SurgeryError, match="float"):
        nf4.quantize_nf4(bad, name="layer.weight")
    with pytest.raises(SurgeryError, match="blocksize"):
        nf4.quantize_nf4(torch.ones(64), blocksize=48)
    with pytest.raises(SurgeryError, match="quant type"):
        nf4.quantize_4bit(torch.ones(64), quant_type="int4")


def test_same_results_on_cuda(cuda_device):
    x = torch.randn(4097, 33)
    p, s = nf4.quantize_nf4(x)
    pc, sc = nf4.quantize_nf4(x.to(cuda_device))
    assert torch.equal(pc.cpu(), p) and torch.equal(sc.absmax.cpu(), s.absmax)
    assert torch.equal(sc.nested_absmax.cpu(), s.nested_absmax)
    # offset = torch.mean on the device: the reduction order may differ in the last ulp (documented)
    assert abs(float(sc.offset) - float(s.offset)) <= 1e-6 * abs(float(s.offset))
    assert torch.allclose(nf4.dequantize(pc, sc).cpu(), nf4.dequantize(p, s), rtol=0, atol=1e-5)
