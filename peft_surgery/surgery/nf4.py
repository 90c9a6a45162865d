"""NF4 / FP4 4-bit blockwise quantization with double quantization, byte-compatible with bitsandbytes.

Pure tensor functions (no file formats): quantize a floating tensor into bitsandbytes' packed 4-bit layout
and a :class:`QuantState4bit`, dequantize it back, and convert the state to and from the state-dict keys
that ``bitsandbytes.nn.Linear4bit`` saves (and transformers loads).

The rules follow bitsandbytes' CUDA kernels, taken as canonical (see the README, section "NF4 / FP4 quantization"):

* blocks are runs of ``blocksize`` consecutive elements of the row-major flattened tensor; the last block may
  be partial; ``absmax`` is the float32 max |x| of each block;
* ``x_n = x * (1/absmax)`` (a reciprocal multiply, IEEE here; CUDA's ``MUFU.RCP`` is approximate);
* NF4 code = number of the 15 CUDA-compiled thresholds strictly below ``x_n`` (ties take the lower code);
  FP4 = sign bit ``x_n < 0`` plus a 7-threshold search on ``|x_n|``; NaN (all-zero block) gives code 0;
* element ``2j`` goes to the high nibble; an odd-length tensor is padded with one 0.0 element;
* double quantization: ``offset = mean(absmax)``; ``absmax - offset`` is quantized to uint8 codes of the
  256-entry signed dynamic map in blocks of 256 with the CUDA kernel's 7-step binary search and tie rule.

>>> import torch
>>> w = torch.randn(96, 128)
>>> packed, state = quantize_nf4(w)                  # blocksize 64, double quantization
>>> packed.shape, packed.dtype, state.absmax.dtype
(torch.Size([6144, 1]), torch.uint8, torch.uint8)
>>> w_hat = dequantize(packed, state)                # float32 again, shape (96, 128)
>>> bool(((w - w_hat).norm() / w.norm()) < 0.11)
True
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Mapping

import torch
from torch import Tensor

from ..errors import FormatError, SurgeryError

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
STORAGE_DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float32": torch.float32, "float64": torch.float64}

# --------------------------------------------------------------------------------------------------------
# Constants, as float32 bit patterns (exact; no decimal round trip)
# --------------------------------------------------------------------------------------------------------

# NF4 code values, index = 4-bit code (bitsandbytes get_4bit_type('nf4'), kernels.cu nf4_dequantization_lut).
_NF4_HEX = (0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
            0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000)
# The 15 decision thresholds compiled into the CUDA dQuantizeNF4 (SASS immediates). Four of them (k = 0, 8, 12,
# 14) are one ulp away from the float32 midpoint torch computes, because nvcc rounds the decimal literal.
_NF4_THRESH_HEX = (0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
                   0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF,
                   0x3F5C89D9)
# FP4 (bitsandbytes' E2M1 variant divided by 12), index = 4-bit code; bit 3 is the sign.
_FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
# dQuantizeFP4 thresholds on |x_n| in ascending order (float32 of the decimal literals in kernels.cu), and the
# 3-bit magnitude code of each interval between them.
_FP4_THRESH_HEX = (0x3B2AAAB9, 0x3DB00000, 0x3E555555, 0x3E955555, 0x3ED55556, 0x3F155550, 0x3F555555)
_FP4_MAG_CODES = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
# The 256-entry signed dynamic map (create_dynamic_map(signed=True)) used for the double-quant constants,
# float32 little-endian. SHA-256: e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c.
_DYNAMIC_HEX = (
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf000053bf66664fbf"
    "cdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf"
    "666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be"
    "0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be"
    "666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd"
    "2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bc"
    "cdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbbfca9f1ba9defa7ba"
    "ff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6"
    "b7a313b500000000b7a31335941a5a36ff0502370642b23734803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a"
    "806a3c3a3ee8593aff65773a9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d"
    "0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e"
    "9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e"
    "9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f"
    "3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f"
    "9a99443f3333483fcdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"
)
DYNAMIC_MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


def _f32(hex_words: tuple[int, ...]) -> Tensor:
    return torch.tensor(struct.unpack(f"<{len(hex_words)}f", struct.pack(f"<{len(hex_words)}I", *hex_words)),
                        dtype=torch.float32)


@lru_cache(maxsize=None)
def _constants(device: str) -> dict[str, Tensor]:
    dyn = torch.frombuffer(bytearray(bytes.fromhex("".join(_DYNAMIC_HEX))), dtype=torch.float32).clone()
    consts = {
        "nf4": _f32(_NF4_HEX),
        "nf4_thresholds": _f32(_NF4_THRESH_HEX),
        "fp4": torch.tensor(_FP4_VALUES, dtype=torch.float32) / 12.0,
        "fp4_thresholds": _f32(_FP4_THRESH_HEX),
        "fp4_mag_codes": torch.tensor(_FP4_MAG_CODES, dtype=torch.uint8),
        "dynamic": dyn,
    }
    consts["nf4_base"], consts["nf4_thr"] = _bucket_tables(consts["nf4_thresholds"], -1.0, _BUCKETS_PER_UNIT)
    consts["fp4_base"], consts["fp4_thr"] = _bucket_tables(consts["fp4_thresholds"], 0.0, _BUCKETS_PER_UNIT)
    return {k: v.to(device) for k, v in consts.items()}


def _consts(device: torch.device | str) -> dict[str, Tensor]:
    return _constants(str(torch.device(device)))


def code_table(quant_type: str = "nf4", device: torch.device | str = "cpu") -> Tensor:
    """The 16 float32 code values of ``quant_type`` ('nf4' or 'fp4'), index = 4-bit code (a copy)."""
    _check_quant_type(quant_type)
    return _consts(device)[quant_type].clone()


def cuda_thresholds(quant_type: str = "nf4", device: torch.device | str = "cpu") -> Tensor:
    """The float32 decision thresholds of the CUDA kernel: 15 signed ones for NF4, 7 on |x| for FP4."""
    _check_quant_type(quant_type)
    return _consts(device)[f"{quant_type}_thresholds"].clone()


def dynamic_map(device: torch.device | str = "cpu") -> Tensor:
    """The 256-entry signed dynamic map used for double quantization (float32, ascending; a copy)."""
    return _consts(device)["dynamic"].clone()


# --------------------------------------------------------------------------------------------------------
# Quant state
# --------------------------------------------------------------------------------------------------------


@dataclass
class QuantState4bit:
    """What bitsandbytes calls a ``QuantState`` for one 4-bit tensor.

    ``absmax`` is float32 (one per block) without double quantization, or uint8 codes into ``nested_code``
    with it; then the float32 scale of block ``i`` is ``nested_code[absmax[i]] * nested_absmax[i // 256] +
    offset``.
    """

    absmax: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: Tensor | None = None
    offset: Tensor | None = None
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    quant_storage: torch.dtype = torch.uint8

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.code is None:
            self.code = code_table(self.quant_type, self.absmax.device)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.absmax.device

    def to(self, device: torch.device | str) -> "QuantState4bit":
        """A copy with every tensor on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, absmax=mv(self.absmax), code=mv(self.code), offset=mv(self.offset),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))

    def dequantize_absmax(self) -> Tensor:
        """The float32 per-block scales (undoing double quantization: a float32 multiply, then add offset)."""
        if not self.nested:
            return self.absmax.float()
        assert self.nested_code is not None and self.offset is not None and self.nested_absmax is not None
        return dequantize_blockwise(self.absmax, self.nested_absmax, self.nested_code,
                                    self.nested_blocksize) + self.offset.float()

    # -- sizes --------------------------------------------------------------------------------------------

    def constant_bytes(self) -> int:
        """Bytes of the per-block constants: absmax (+ nested_absmax and offset with double quantization)."""
        n = self.absmax.numel() * self.absmax.element_size()
        if self.nested:
            n += self.nested_absmax.numel() * 4 + 4
        return n

    def bits_per_param(self) -> float:
        """Bits per parameter for the codes and per-block constants (≈4.127 with double quant, 4.5 without)."""
        packed_bytes = (self.numel + 1) // 2
        return 8.0 * (packed_bytes + self.constant_bytes()) / max(1, self.numel)

    # -- serialization -------------------------------------------------------------------------------------

    def json_dict(self) -> dict:
        """The non-tensor fields in bitsandbytes' ``QuantState.as_dict`` order."""
        d: dict = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": DTYPE_NAMES[self.dtype],
                   "shape": list(self.shape)}
        if self.nested:
            d.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                     nested_offset=float(self.offset.float().item()))
        return d

    def json_bytes(self) -> bytes:
        """The bytes bitsandbytes stores in ``quant_state.bitsandbytes__<type>`` (``json.dumps``, UTF-8)."""
        return json.dumps(self.json_dict()).encode("utf-8")

    def to_state_dict(self, packed: Tensor, prefix: str = "weight") -> dict[str, Tensor]:
        """The tensors ``Linear4bit`` saves for its weight: ``prefix``, ``prefix.absmax``, ``.quant_map``,
        ``.nested_absmax``, ``.nested_quant_map`` (double quant only) and ``.quant_state.bitsandbytes__<type>``.
        """
        p = f"{prefix}." if prefix else ""
        out = {prefix: packed, f"{p}absmax": self.absmax, f"{p}quant_map": self.code.float().clone()}
        if self.nested:
            out[f"{p}nested_absmax"] = self.nested_absmax
            out[f"{p}nested_quant_map"] = self.nested_code.float().clone()
        blob = self.json_bytes()
        out[f"{p}quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, Tensor], prefix: str = "weight", *,
                        path: object = None) -> tuple[Tensor, "QuantState4bit"]:
        """Read ``(packed, state)`` back from the keys :meth:`to_state_dict` (or bitsandbytes) writes.

        ``tensors`` may hold other keys too; only ``prefix`` and ``prefix.*`` are used. The stored
        ``nested_quant_map`` is used as is (bnb 0.46–0.49 CPU files carry map[0] = -1.0).
        """
        p = f"{prefix}." if prefix else ""
        blobs = [k for k in (f"{p}quant_state.bitsandbytes__nf4", f"{p}quant_state.bitsandbytes__fp4") if k in tensors]
        if len(blobs) != 1:
            raise FormatError("expected exactly one quant_state.bitsandbytes__nf4|fp4 entry", path=path, tensor=prefix)
        try:
            meta = json.loads(bytes(tensors[blobs[0]].to(torch.uint8).cpu().tolist()).decode("utf-8"))
            quant_type = meta["quant_type"]
            shape = tuple(int(s) for s in meta["shape"])
            dtype = getattr(torch, meta["dtype"])
            blocksize = int(meta["blocksize"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise FormatError("unreadable bitsandbytes quant_state JSON", path=path, tensor=blobs[0]) from None
        if quant_type not in QUANT_TYPES or dtype not in FLOAT_DTYPES or blocksize not in BLOCKSIZES:
            raise FormatError(f"unsupported quant state {meta}", path=path, tensor=blobs[0])
        for k in (prefix, f"{p}absmax"):
            if k not in tensors:
                raise FormatError("quantized weight is missing a tensor", path=path, tensor=k)
        packed = tensors[prefix]
        storage = packed.dtype
        nested = "nested_offset" in meta or f"{p}nested_absmax" in tensors
        state = cls(absmax=tensors[f"{p}absmax"], shape=shape, dtype=dtype, blocksize=blocksize,
                    quant_type=quant_type, code=tensors.get(f"{p}quant_map"), quant_storage=storage)
        if nested:
            missing = [k for k in (f"{p}nested_absmax", f"{p}nested_quant_map") if k not in tensors]
            if missing or "nested_offset" not in meta:
                raise FormatError("double-quantized weight is missing nested_absmax/nested_quant_map/nested_offset",
                                  path=path, tensor=prefix)
            state.nested_absmax = tensors[f"{p}nested_absmax"].float()
            state.nested_code = tensors[f"{p}nested_quant_map"].float()
            state.nested_blocksize = int(meta.get("nested_blocksize", NESTED_BLOCKSIZE))
            state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        _validate_state(packed, state, path=path, tensor=prefix)
        return packed, state


def _validate_state(packed: Tensor, state: QuantState4bit, *, path: object = None, tensor: str | None = None) -> None:
    n = state.numel
    nbytes = packed.numel() * packed.element_size()
    if nbytes != (n + 1) // 2:
        raise FormatError(f"packed data has {nbytes} bytes, expected {(n + 1) // 2} for shape {list(state.shape)}",
                          path=path, tensor=tensor)
    if state.absmax.numel() != state.num_blocks:
        raise FormatError(f"absmax has {state.absmax.numel()} entries, expected {state.num_blocks}",
                          path=path, tensor=tensor)
    if state.nested:
        if state.absmax.dtype != torch.uint8:
            raise FormatError("double-quantized absmax must be uint8", path=path, tensor=tensor)
        nn_ = -(-state.num_blocks // state.nested_blocksize)
        if state.nested_absmax.numel() != nn_ or state.nested_code.numel() != 256:
            raise FormatError("nested_absmax/nested_quant_map have the wrong size", path=path, tensor=tensor)


# --------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise SurgeryError(f"unknown quant type '{quant_type}' (use nf4 or fp4)")


def _check_input(t: Tensor, blocksize: int, name: str | None = None) -> None:
    if not isinstance(t, Tensor):
        raise SurgeryError("expected a torch.Tensor", tensor=name)
    if t.dtype not in FLOAT_DTYPES:
        what = "not a floating-point tensor" if not t.is_floating_point() else "unsupported float dtype"
        raise SurgeryError(f"{what} ({str(t.dtype).removeprefix('torch.')}); 4-bit quantization takes "
                           "float32, float16 or bfloat16", tensor=name)
    if blocksize not in BLOCKSIZES:
        raise SurgeryError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")
    if t.numel() == 0:
        raise SurgeryError("cannot quantize an empty tensor", tensor=name)


def _chunk_elems(device: torch.device, blocksize: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        # CPU: ~1 MB of float32 per chunk keeps temporaries in cache; GPU: large launches amortize overhead.
        chunk_size = (1 << 18) if device.type == "cpu" else (1 << 26)
    return max(blocksize, chunk_size // blocksize * blocksize)


def _for_chunks(work, starts: range, device: torch.device) -> None:
    """Run ``work(start)`` for every chunk. On CPU, chunks run on a thread pool with single-threaded torch
    ops: many small ops each opening an OpenMP region stall badly on a busy machine, while independent
    chunks (disjoint output slices; torch releases the GIL) scale without barriers."""
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    if workers <= 1 or len(starts) <= 1:
        for s in starts:
            work(s)
        return
    from concurrent.futures import ThreadPoolExecutor

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as pool:
            for f in [pool.submit(work, s) for s in starts]:
                f.result()
    finally:
        torch.set_num_threads(prev)


# --------------------------------------------------------------------------------------------------------
# 4-bit code selection (CUDA rules)
# --------------------------------------------------------------------------------------------------------


def _bucket_tables(thresholds: Tensor, lo: float, per_unit: int) -> tuple[Tensor, Tensor]:
    """Tables for an exact bucketize: buckets of width 1/per_unit from ``lo``, each holding at most one
    threshold; ``base[b]`` counts the thresholds below bucket b and ``thr[b]`` is the one inside (or +inf).

    Then ``#{T < x} = base[b] + (x > thr[b])`` exactly, even if float rounding puts ``x`` into a neighbouring
    bucket, because no threshold lies near a bucket edge (checked here).
    """
    t = thresholds.double()
    nbuckets = int(round((1.0 - lo) * per_unit))
    edges = lo + torch.arange(nbuckets + 1, dtype=torch.float64) / per_unit
    assert float((t[:, None] - edges[None, :]).abs().min()) > 1e-4, "threshold too close to a bucket edge"
    base = torch.tensor([int((t < e).sum()) for e in edges[:-1]], dtype=torch.uint8)
    thr = torch.full((nbuckets,), math.inf, dtype=torch.float32)
    for k, v in enumerate(t.tolist()):
        b = int((v - lo) * per_unit)
        assert math.isinf(float(thr[b])), "two thresholds in one bucket"
        thr[b] = thresholds[k]
    return base, thr


_BUCKETS_PER_UNIT = 16  # bucket width 1/16 < the smallest gap between thresholds (NF4: 0.0805, FP4: 0.0833)


def _codes(xn: Tensor, quant_type: str, consts: dict[str, Tensor]) -> Tensor:
    """4-bit codes (uint8) of normalized float32 values with the CUDA decision rules.

    NF4: ``#{T_k < x}`` (the kernel's decision tree with strict ``>`` compares); FP4: sign bit ``x < 0`` and
    the magnitude code of ``#{T_k < |x|}``. Computed with a bucket table and one compare instead of a binary
    search (several times faster than ``torch.bucketize`` on CPU, identical results).
    """
    k = _BUCKETS_PER_UNIT
    if quant_type == "nf4":
        base, thr = consts["nf4_base"], consts["nf4_thr"]
        idx = torch.mul(xn, k).add_(k).to(torch.int32).clamp_(0, base.numel() - 1).view(-1)
        return base.index_select(0, idx).add_(xn.view(-1) > thr.index_select(0, idx)).view(xn.shape)
    base, thr = consts["fp4_base"], consts["fp4_thr"]
    a = xn.abs().view(-1)
    idx = torch.mul(a, k).to(torch.int32).clamp_(0, base.numel() - 1)
    count = base.index_select(0, idx).add_(a > thr.index_select(0, idx))
    code = consts["fp4_mag_codes"].index_select(0, count.to(torch.int32))
    code |= (xn.view(-1) < 0).to(torch.uint8) << 3
    return code.view(xn.shape)


def _codes_bucketize(xn: Tensor, quant_type: str, device: torch.device | str = "cpu") -> Tensor:
    """Reference implementation of :func:`_codes` with ``torch.bucketize`` (for tests)."""
    consts = _consts(device)
    if quant_type == "nf4":
        return torch.bucketize(xn, consts["nf4_thresholds"]).to(torch.uint8)
    mag = torch.bucketize(xn.abs(), consts["fp4_thresholds"])
    return consts["fp4_mag_codes"][mag] | ((xn < 0).to(torch.uint8) << 3)


def _normalized_codes(xb: Tensor, absmax: Tensor, quant_type: str, consts: dict[str, Tensor]) -> Tensor:
    """Codes of a (blocks, blocksize) float32 view given its per-block absmax."""
    r = absmax.reciprocal()  # IEEE 1/absmax; an all-zero block gives inf and then NaN → code 0
    xn = xb * r.unsqueeze(1)
    codes = _codes(xn, quant_type, consts)
    zero = absmax == 0
    if bool(zero.any()):
        codes[zero] = 0
    return codes


def quantize_4bit(tensor: Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True, *,
                  quant_storage: torch.dtype = torch.uint8, chunk_size: int | None = None,
                  name: str | None = None) -> tuple[Tensor, QuantState4bit]:
    """Quantize a float32/float16/bfloat16 tensor to bitsandbytes' packed 4-bit layout.

    Returns ``(packed, state)``: ``packed`` is ``((n+1)//2, 1)`` uint8 (or viewed as ``quant_storage``),
    on the tensor's device. Work is done in chunks of ``chunk_size`` elements, so extra memory stays at a
    few times the chunk size (plus the per-block absmax vector). ``name`` only labels errors.

    >>> packed, state = quantize_4bit(torch.ones(3), quant_type="fp4", double_quant=False)
    >>> packed.flatten().tolist(), state.absmax.tolist()   # 1.0 → code 3; odd n pads one 0.0 → code 0
    ([51, 48], [1.0])
    """
    _check_quant_type(quant_type)
    _check_input(tensor, blocksize, name)
    device = tensor.device
    consts = _consts(device)
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    nb = -(-n // blocksize)
    chunk = _chunk_elems(device, blocksize, chunk_size)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(nb, dtype=torch.float32, device=device)

    def work(start: int) -> None:
        m = min(chunk, n - start)
        rows = -(-m // blocksize)
        x = flat[start:start + m].float()
        if m % blocksize:  # partial last block: zero padding changes neither the absmax nor the kept codes
            x = torch.nn.functional.pad(x, (0, rows * blocksize - m))
        xb = x.view(rows, blocksize)
        am = xb.abs().amax(1)
        absmax[start // blocksize:start // blocksize + rows] = am
        codes = _normalized_codes(xb, am, quant_type, consts).view(-1)
        m2 = m + (m & 1)  # an odd tail keeps the code of one padded 0.0 as its low nibble
        packed[start // 2:(start + m2) // 2] = (codes[0:m2:2] << 4) | codes[1:m2:2]

    _for_chunks(work, range(0, n, chunk), device)
    packed = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = _view_storage(packed, quant_storage)
    state = QuantState4bit(absmax=absmax, shape=tuple(tensor.shape), dtype=tensor.dtype, blocksize=blocksize,
                           quant_type=quant_type, code=consts[quant_type].clone(), quant_storage=quant_storage)
    if double_quant:
        state = _double_quantize(state)
    return packed, state


def quantize_nf4(tensor: Tensor, blocksize: int = 64, double_quant: bool = True, **kwargs) -> tuple[Tensor, QuantState4bit]:
    """NF4 (QLoRA's 4-bit NormalFloat) quantization; see :func:`quantize_4bit`."""
    return quantize_4bit(tensor, blocksize, "nf4", double_quant, **kwargs)


def quantize_fp4(tensor: Tensor, blocksize: int = 64, double_quant: bool = True, **kwargs) -> tuple[Tensor, QuantState4bit]:
    """bitsandbytes FP4 quantization; see :func:`quantize_4bit`."""
    return quantize_4bit(tensor, blocksize, "fp4", double_quant, **kwargs)


def _view_storage(packed: Tensor, storage: torch.dtype) -> Tensor:
    itemsize = torch.empty((), dtype=storage).element_size()
    flat = packed.reshape(-1)
    if flat.numel() % itemsize:
        raise SurgeryError(f"packed size {flat.numel()} bytes is not a multiple of the {storage} item size")
    return flat.view(storage).unsqueeze(1)


def packed_bytes(packed: Tensor) -> Tensor:
    """The packed data as a flat uint8 tensor (undoing a non-uint8 ``quant_storage`` view)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.contiguous().view(torch.uint8)


def unpack_codes(packed: Tensor, n: int | None = None) -> Tensor:
    """The 4-bit codes (uint8, high nibble first) of a packed tensor, optionally cut to ``n`` elements."""
    b = packed_bytes(packed)
    codes = torch.stack((b >> 4, b & 0xF), dim=1).reshape(-1)
    return codes if n is None else codes[:n]


# --------------------------------------------------------------------------------------------------------
# Double quantization (8-bit blockwise with the dynamic map, CUDA dQuantize<0> rule)
# --------------------------------------------------------------------------------------------------------


def dynamic_codes(x: Tensor, code: Tensor) -> Tensor:
    """Indices (int64) of ``x`` in the sorted 256-entry ``code``, exactly as CUDA's ``dQuantize<0>``:
    a 7-step binary search from pivot 127, then a float32 midpoint compare with the neighbour.

    At an exact midpoint the kernel returns the final pivot, which is the lower index when ``x`` lies above
    the pivot's value and the upper one otherwise (127 of the 255 midpoints round up). NaN gives 0.
    """
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lower = torch.zeros_like(pivot)
    upper = torch.full_like(pivot, 255)
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > code[pivot]
        lower = torch.where(gt, pivot, lower)
        upper = torch.where(gt, upper, pivot)
        pivot = pivot + torch.where(gt, step, -step)
    val = code[pivot]
    gt = x > val
    up = torch.where(x > (code[upper] + val) * 0.5, upper, pivot)
    down = torch.where(x < (code[lower] + val) * 0.5, lower, pivot)
    return torch.where(gt, up, down)


def quantize_blockwise(x: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of a float32 vector: ``(uint8 codes, float32 absmax per block)``."""
    x = x.float().reshape(-1)
    n = x.numel()
    rows = -(-n // blocksize)
    xp = torch.nn.functional.pad(x, (0, rows * blocksize - n)).view(rows, blocksize)
    am = xp.abs().amax(1)
    xn = xp * am.reciprocal().unsqueeze(1)
    q = dynamic_codes(xn.reshape(-1)[:n], code.to(x.device, torch.float32))
    return q.to(torch.uint8), am


def dequantize_blockwise(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int = NESTED_BLOCKSIZE) -> Tensor:
    """``code[q] * absmax[block]`` in float32 (the inverse of :func:`quantize_blockwise`)."""
    vals = code.to(q.device, torch.float32)[q.reshape(-1).long()]
    n = vals.numel()
    rows = -(-n // blocksize)
    vp = torch.nn.functional.pad(vals, (0, rows * blocksize - n)).view(rows, blocksize)
    return (vp * absmax.float().view(-1, 1)).reshape(-1)[:n]


def _double_quantize(state: QuantState4bit) -> QuantState4bit:
    absmax = state.absmax
    offset = absmax.mean()  # float32 torch.mean on the tensor's device, as bitsandbytes does
    code = _consts(absmax.device)["dynamic"]
    q, absmax2 = quantize_blockwise(absmax - offset, code, NESTED_BLOCKSIZE)
    return replace(state, absmax=q, offset=offset, nested_absmax=absmax2, nested_code=code.clone(),
                   nested_blocksize=NESTED_BLOCKSIZE)


# --------------------------------------------------------------------------------------------------------
# Dequantization
# --------------------------------------------------------------------------------------------------------


def dequantize_4bit(packed: Tensor, state: QuantState4bit, *, dtype: torch.dtype | None = None,
                    chunk_size: int | None = None) -> Tensor:
    """Inverse of :func:`quantize_4bit`: ``code[nibble] * absmax`` in float32, then rounded to ``dtype``
    (default: the original dtype), shaped like the original tensor.

    The 4-bit table is the canonical one for ``state.quant_type`` (bitsandbytes ignores a stored
    ``quant_map`` too); double-quant scales use the stored ``nested_quant_map``.
    """
    _validate_state(packed, state)
    device = packed.device
    dtype = dtype or state.dtype
    code = _consts(device)[state.quant_type]
    absmax = state.to(device).dequantize_absmax() if state.device != device else state.dequantize_absmax()
    b = packed_bytes(packed)
    n = state.numel
    bs = state.blocksize
    chunk = _chunk_elems(device, bs, chunk_size)
    out = torch.empty(n, dtype=dtype, device=device)

    def work(start: int) -> None:
        m = min(chunk, n - start)
        rows = -(-m // bs)
        nib = b[start // 2:(start + m + 1) // 2]
        idx = torch.stack((nib >> 4, nib & 0xF), dim=1).view(-1)[:m].to(torch.int32)
        vals = code.index_select(0, idx)
        if m % bs:
            vals = torch.nn.functional.pad(vals, (0, rows * bs - m))
        vals = vals.view(rows, bs) * absmax[start // bs:start // bs + rows].unsqueeze(1)
        out[start:start + m] = vals.view(-1)[:m]  # float32 product, then one rounding to dtype

    _for_chunks(work, range(0, n, chunk), device)
    return out.view(state.shape)


def dequantize(packed: Tensor, state: QuantState4bit, **kwargs) -> Tensor:
    """Dequantize NF4 or FP4 (see :func:`dequantize_4bit`)."""
    return dequantize_4bit(packed, state, **kwargs)


dequantize_nf4 = dequantize


# --------------------------------------------------------------------------------------------------------
# int4 absmax (for comparisons) and error metrics
# --------------------------------------------------------------------------------------------------------


def quantize_int4_absmax(tensor: Tensor, blocksize: int = 64) -> tuple[Tensor, Tensor]:
    """Symmetric blockwise int4: ``q = round(7·x/absmax)`` in [-7, 7] (int8) and the float32 absmax."""
    _check_input(tensor, blocksize)
    x = tensor.detach().reshape(-1).float()
    n = x.numel()
    rows = -(-n // blocksize)
    xb = torch.nn.functional.pad(x, (0, rows * blocksize - n)).view(rows, blocksize)
    am = xb.abs().amax(1)
    scale = torch.where(am > 0, 7.0 / am, torch.zeros_like(am))
    q = torch.round(xb * scale.unsqueeze(1)).clamp_(-7, 7).to(torch.int8)
    return q.view(-1)[:n], am


def dequantize_int4_absmax(q: Tensor, absmax: Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                           blocksize: int = 64) -> Tensor:
    n = q.numel()
    rows = -(-n // blocksize)
    qb = torch.nn.functional.pad(q.float(), (0, rows * blocksize - n)).view(rows, blocksize)
    return (qb * (absmax / 7.0).unsqueeze(1)).view(-1)[:n].to(dtype).view(shape)


METHODS = ("nf4", "fp4", "int4")


def roundtrip(tensor: Tensor, method: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> tuple[Tensor, float]:
    """Quantize and dequantize (in float32); return ``(w_hat, bits_per_param)``. ``method``: nf4, fp4, int4."""
    if method == "int4":
        q, am = quantize_int4_absmax(tensor, blocksize)
        n = tensor.numel()
        return dequantize_int4_absmax(q, am, tuple(tensor.shape), torch.float32, blocksize), \
            8.0 * ((n + 1) // 2 + am.numel() * 4) / n
    packed, state = quantize_4bit(tensor, blocksize, method, double_quant)
    return dequantize_4bit(packed, state, dtype=torch.float32), state.bits_per_param()


def error_stats(w: Tensor, w_hat: Tensor) -> dict[str, float]:
    """MSE, relative Frobenius error, SQNR (dB), max |error|, plus the sums behind them (float64)."""
    w64 = w.detach().double().reshape(-1)
    e = w_hat.detach().double().reshape(-1) - w64
    sse = float(e.square().sum())
    ssw = float(w64.square().sum())
    n = max(1, w64.numel())
    return {
        "mse": sse / n,
        "rel_fro": math.sqrt(sse / ssw) if ssw > 0 else (0.0 if sse == 0 else math.inf),
        "sqnr_db": 10 * math.log10(ssw / sse) if sse > 0 and ssw > 0 else math.inf,
        "max_abs": float(e.abs().max()) if e.numel() else 0.0,
        "sse": sse,
        "ssw": ssw,
        "numel": w64.numel(),
    }


__all__ = [
    "BLOCKSIZES",
    "DYNAMIC_MAP_SHA256",
    "METHODS",
    "QUANT_TYPES",
    "QuantState4bit",
    "code_table",
    "cuda_thresholds",
    "dequantize",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_int4_absmax",
    "dequantize_nf4",
    "dynamic_codes",
    "dynamic_map",
    "error_stats",
    "packed_bytes",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_int4_absmax",
    "quantize_nf4",
    "roundtrip",
    "unpack_codes",
]
