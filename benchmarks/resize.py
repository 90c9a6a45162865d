"""Factored resize vs the dense-SVD resize kohya's resize_lora.py does, on a synthetic SDXL-sized LoRA.

    python benchmarks/resize.py [--rank 64] [--new-rank 16] [--dense-repeats 2] [--threads 1]

The LoRA has ~800 modules shaped like SDXL's UNet attention/FF layers (60 transformer blocks at width 1280,
10 at 640; FF widths up to 5120) plus CLIP text-encoder layers, rank 64, fp16 factors with a decaying
spectrum. Both methods run in this process:

* factored: ``peft_surgery.algebra.resize_adapter`` over every module (QR of B and Aᵀ + SVD of the 64×64 core);
* dense (kohya): ΔW = B@A materialised in float32, full ``torch.linalg.svd``, keep the top 16.

A full dense pass takes many minutes on a small CPU, so the dense baseline is timed on every distinct
module shape (``--dense-repeats`` modules each) and extrapolated as Σ count(shape)·time(shape); the
errors of both methods are compared on those same modules. Pass ``--dense-all`` to time it on every module.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections import Counter

import torch

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoRA
from peft_surgery.algebra import resize_adapter
from peft_surgery.surgery.resize import dense_resize


def sdxl_like_shapes() -> list[tuple[str, int, int]]:
    """(name, out, in) for ~800 linear modules with SDXL's widths (cross-attention context 2048)."""
    shapes: list[tuple[str, int, int]] = []

    def block(prefix: str, d: int) -> None:
        for p in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"):
            shapes.append((f"{prefix}.{p}", d, d))
        shapes.append((f"{prefix}.attn2.to_k", d, 2048))
        shapes.append((f"{prefix}.attn2.to_v", d, 2048))
        shapes.append((f"{prefix}.ff.net.0.proj", min(4 * d, 5120), d))
        shapes.append((f"{prefix}.ff.net.2", d, min(4 * d, 5120)))

    for i in range(60):
        block(f"unet.b1280.{i}", 1280)
    for i in range(10):
        block(f"unet.b640.{i}", 640)
    for i in range(12):  # CLIP-L
        p = f"text_encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.append((f"{p}.self_attn.{n}", 768, 768))
        shapes += [(f"{p}.mlp.fc1", 3072, 768), (f"{p}.mlp.fc2", 768, 3072)]
    i = 0
    while len(shapes) < 800:  # CLIP-G layers until ~800 modules
        p = f"text_encoder_2.layers.{i}"
        for n, o, k in (("self_attn.q_proj", 1280, 1280), ("self_attn.k_proj", 1280, 1280),
                        ("self_attn.v_proj", 1280, 1280), ("self_attn.out_proj", 1280, 1280),
                        ("mlp.fc1", 5120, 1280), ("mlp.fc2", 1280, 5120)):
            if len(shapes) < 800:
                shapes.append((f"{p}.{n}", o, k))
        i += 1
    return shapes


def make_adapter(rank: int, seed: int = 0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.9 ** i for i in range(rank)])  # a trained-LoRA-like decaying spectrum
    modules = {}
    for name, out, inp in sdxl_like_shapes():
        down = (torch.randn(rank, inp, generator=g) / math.sqrt(inp)).half()
        up = (torch.randn(out, rank, generator=g) * decay / math.sqrt(rank)).half()
        modules[name] = AdapterModule(LoRA(down, up), scale=1.0, layout=Layout("linear", False, (out, inp)),
                                      alpha=float(rank))
    return Adapter(modules)


def dense_one(m: AdapterModule, new_rank: int) -> tuple[float, float]:
    """kohya's resize of one module: (seconds, relative error of the result)."""
    t = time.perf_counter()
    dw = m.delta.up.float() @ m.delta.down.float()  # materialise ΔW (out × in), float32 as kohya does
    up, down, S = dense_resize(dw, new_rank)
    elapsed = time.perf_counter() - t
    err = float(torch.linalg.norm(dw - up @ down) / torch.linalg.norm(dw))
    return elapsed, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--new-rank", type=int, default=16)
    ap.add_argument("--dense-repeats", type=int, default=2, help="modules timed per distinct shape (dense)")
    ap.add_argument("--dense-all", action="store_true", help="time the dense baseline on every module")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared, oversubscribed CPU more threads slow LAPACK down)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    adapter = make_adapter(args.rank)
    shapes = Counter((m.layout.weight_shape for m in adapter.modules.values()))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"LoRA: {len(adapter)} modules, rank {args.rank} → {args.new_rank}, "
          f"{adapter.num_params / 1e6:.1f} M params, {len(shapes)} distinct shapes, max width "
          f"{max(max(s) for s in shapes)}")

    t = time.perf_counter()
    small, report = resize_adapter(adapter, rank=args.new_rank)
    factored_s = time.perf_counter() - t
    ferr = {r["module"]: r["rel_error"] for r in report.rows}
    print(f"factored resize, all {len(adapter)} modules: {factored_s:.2f} s "
          f"({1000 * factored_s / len(adapter):.2f} ms/module)")

    # dense baseline
    per_shape: dict[tuple, list[float]] = {}
    err_pairs: list[tuple[float, float]] = []
    chosen = list(adapter.items()) if args.dense_all else []
    if not args.dense_all:
        seen: Counter = Counter()
        for name, m in adapter.items():
            if seen[m.layout.weight_shape] < args.dense_repeats:
                seen[m.layout.weight_shape] += 1
                chosen.append((name, m))
    t_all = time.perf_counter()
    for name, m in chosen:
        secs, err = dense_one(m, args.new_rank)
        per_shape.setdefault(m.layout.weight_shape, []).append(secs)
        err_pairs.append((err, ferr[name]))
    dense_measured = time.perf_counter() - t_all
    if args.dense_all:
        dense_total = dense_measured
        how = "measured on every module"
    else:
        dense_total = sum(statistics.mean(per_shape[s]) * n for s, n in shapes.items())
        how = (f"extrapolated from {len(chosen)} modules ({args.dense_repeats} per shape, {dense_measured:.1f} s "
               "measured) as Σ count(shape)·mean time(shape)")
    print(f"dense (kohya-style) resize: {dense_total:.1f} s, {how}")
    for s in sorted(per_shape, key=lambda s: -s[0] * s[1]):
        print(f"  shape {s}: {shapes[s]:4d} modules × {statistics.mean(per_shape[s]) * 1000:8.1f} ms")
    max_diff = max(abs(d - f) for d, f in err_pairs)
    dense_mean = statistics.mean(d for d, _ in err_pairs)
    fact_mean = statistics.mean(f for _, f in err_pairs)
    print(f"relative error on the {len(err_pairs)} compared modules: dense mean {dense_mean:.6f}, "
          f"factored mean {fact_mean:.6f}, max |difference| {max_diff:.2e}")
    print(f"speed-up: {dense_total / factored_s:.1f}× (factored vs dense, same process)")


if __name__ == "__main__":
    main()
