"""Benchmark: peft-surgery's pure-torch NF4/FP4 quantizer against ``bitsandbytes.functional.quantize_4bit``.

Same tensors, same process, best of ``--repeat`` runs. Prints throughput (million parameters per second) and
the ratio ours/bnb, plus how many packed bytes and double-quant codes differ (expected: 0 bytes for NF4 away
from exact ties; ~0.1–0.2 % of the uint8 scale codes, from bnb 0.50's CPU lookup table).

On a GPU (``--device cuda``) it also reports the effective memory bandwidth against the floor of
2.5625 B/param for bf16 input (read 2 B, write 0.5 B codes + 1/16 B absmax).

    python benchmarks/nf4.py                 # CPU, default shapes
    python benchmarks/nf4.py --device cuda   # when a GPU is present
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_of(fn, repeat: int, device: str) -> float:
    fn()  # warm-up (kernel caches, allocator, bnb's lazy setup)
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    args = ap.parse_args()

    import bitsandbytes
    import bitsandbytes.functional as F

    from peft_surgery.surgery import nf4

    dev = args.device
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, device {dev}, "
          f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}, {platform.processor() or platform.machine()}")
    if dev.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")
    shapes = [tuple(int(s) for s in sh.split("x")) for sh in args.shapes.split(",")]
    cases = []
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            cases.append((shape, dtype, "nf4", True))
    cases += [(shapes[0], torch.bfloat16, "nf4", False), (shapes[0], torch.bfloat16, "fp4", True)]

    header = (f"{'shape':>12} {'dtype':>8} {'type':>7} | {'ours ms':>8} {'bnb ms':>8} {'ours Mp/s':>9} "
              f"{'bnb Mp/s':>9} {'ratio':>6} | {'bytes≠':>7} {'dq codes≠':>9} | {'deq ours':>8} {'deq bnb':>8}")
    print(header)
    print("-" * len(header))
    g = torch.Generator(device="cpu").manual_seed(0)
    for shape, dtype, qt, dq in cases:
        w = (torch.randn(shape, generator=g) * 0.02).to(dtype).to(dev)
        n = w.numel()
        t_ours = best_of(lambda: nf4.quantize_4bit(w, 64, qt, dq), args.repeat, dev)
        t_bnb = best_of(lambda: F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq),
                        args.repeat, dev)
        p, s = nf4.quantize_4bit(w, 64, qt, dq)
        bp, bs = F.quantize_4bit(w, blocksize=64, quant_type=qt, compress_statistics=dq)
        nbytes = int((p != bp).sum())
        ncodes = int((s.absmax != bs.absmax).sum()) if dq else 0
        d_ours = best_of(lambda: nf4.dequantize(p, s), args.repeat, dev)
        d_bnb = best_of(lambda: F.dequantize_4bit(bp, bs), args.repeat, dev)
        label = f"{qt}+dq" if dq else qt
        print(f"{'x'.join(map(str, shape)):>12} {str(dtype).removeprefix('torch.'):>8} {label:>7} | "
              f"{t_ours * 1e3:8.1f} {t_bnb * 1e3:8.1f} {n / t_ours / 1e6:9.1f} {n / t_bnb / 1e6:9.1f} "
              f"{t_bnb / t_ours:6.2f} | {nbytes:7d} {ncodes:9d} | {d_ours * 1e3:8.1f} {d_bnb * 1e3:8.1f}")
        if dev.startswith("cuda"):
            floor = n * (w.element_size() + 0.5 + 4 / 64)
            print(f"{'':>30} GPU effective bandwidth (floor bytes / time): ours {floor / t_ours / 1e9:.0f} GB/s, "
                  f"bnb {floor / t_bnb / 1e9:.0f} GB/s")
        del w, p, s, bp, bs


if __name__ == "__main__":
    main()
