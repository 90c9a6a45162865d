"""Benchmark `peft-surgery extract` against exact-SVD baselines and mergekit-extract-lora.

Builds a Llama-shaped BASE/FT pair (default: hidden 896, 8 layers, intermediate 4864, vocab 32000, bf16,
≈176M parameters; FT = BASE + rank-8 delta + noise on every linear weight), writes it to a temp folder (BASE
sharded, FT single file), then runs each extractor in its own process on the same files:

* ``ours-auto``     ``peft-surgery extract BASE FT --rank 8`` (``--svd auto``: randomized here)
* ``ours-exact``    the same with ``--svd exact`` (our code path, exact thin SVD)
* ``dense-loop``    a plain loop: load both state dicts, ``torch.linalg.svd`` of every ΔW, truncate, save
* ``mergekit``      ``mergekit-extract-lora --max-rank 8`` when installed (``--mergekit PATH`` or on PATH),
                    with ``-e embed_tokens -e lm_head --skip-undecomposable`` so it does the same work (it
                    would otherwise copy the unchanged embeddings and norms into the adapter)

For each: wall time, peak RSS of the process (``wait4`` rusage), and the mean relative error
‖ΔW − BA‖_F/‖ΔW‖_F over the LoRA modules, measured here from the written files against FT − BASE.

    python benchmarks/extract.py                    # full size (~180M)
    python benchmarks/extract.py --small            # hidden 512, 4 layers, vocab 8000 (~28M)
    python benchmarks/extract.py --mergekit /work/venv-mk/bin/mergekit-extract-lora --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RANK = 8


def llama_shapes(hidden: int, layers: int, inter: int, vocab: int, heads: int, kv_heads: int) -> dict[str, tuple]:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes: dict[str, tuple] = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
                                "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


def build_pair(root: Path, *, hidden: int, layers: int, inter: int, vocab: int, heads: int, kv_heads: int,
               noise: float = 0.1) -> tuple[Path, Path, int]:
    """Write BASE (sharded) and FT = BASE + rank-8 delta + noise (single file), both bf16, plus config.json."""
    from transformers import LlamaConfig

    from peft_surgery.checkpoint import ShardedWriter, save_tensors

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                      torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    base_dir, ft_dir = root / "base", root / "ft"
    base_dir.mkdir()
    ft_dir.mkdir()
    cfg.save_pretrained(base_dir)
    cfg.save_pretrained(ft_dir)
    g = torch.Generator().manual_seed(0)
    writer = ShardedWriter(base_dir, base_name="model", max_shard_size="150MB", metadata={"format": "pt"})
    ft: dict[str, torch.Tensor] = {}
    n = 0
    for key, shape in llama_shapes(hidden, layers, inter, vocab, heads, kv_heads).items():
        w = torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=g)
        n += w.numel()
        wb = w.to(torch.bfloat16)
        writer.add(key, wb)
        if len(shape) == 2 and "embed" not in key and "lm_head" not in key:
            out, inn = shape
            # per-element RMS of the delta ≈ 0.002 (10% of the weights), noise ≈ noise × that
            d = torch.randn(out, RANK, generator=g) @ torch.randn(RANK, inn, generator=g) * (0.002 / RANK ** 0.5)
            d += noise * 0.002 * torch.randn(shape, generator=g)
            ft[key] = (wb.float() + d).to(torch.bfloat16)
        else:
            ft[key] = wb
    writer.close()
    save_tensors(ft, ft_dir / "model.safetensors", {"format": "pt"})
    return base_dir, ft_dir, n


DENSE_LOOP = r"""
import sys, torch
from safetensors.torch import load_file, save_file
base_dir, ft_dir, out, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
from pathlib import Path
base = {}
for f in sorted(Path(base_dir).glob("*.safetensors")):
    base.update(load_file(str(f)))
ft = load_file(str(Path(ft_dir) / "model.safetensors"))
outd = {}
for k, w in ft.items():
    if w.dim() != 2 or "embed" in k or "lm_head" in k:
        continue
    d = w.float() - base[k].float()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    m = k[: -len(".weight")]
    outd[f"base_model.model.{m}.lora_A.weight"] = Vh[:rank].to(w.dtype).contiguous()
    outd[f"base_model.model.{m}.lora_B.weight"] = (U[:, :rank] * S[:rank]).to(w.dtype).contiguous()
Path(out).mkdir()
save_file(outd, str(Path(out) / "adapter_model.safetensors"))
"""


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, return code, tail of output) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = p.stdout.read().decode(errors="replace")  # type: ignore[union-attr]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return wall, usage.ru_maxrss / 1024, p.returncode, out[-1500:]


def lora_errors(adapter_dir: Path, base_dir: Path, ft_dir: Path) -> tuple[float, float, int]:
    """(mean, max) relative Frobenius error of each LoRA module against FT − BASE, and the module count."""
    from safetensors import safe_open

    from peft_surgery.checkpoint import Checkpoint

    base = Checkpoint.open(base_dir)
    ft = Checkpoint.open(ft_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    files = sorted(adapter_dir.glob("*.safetensors"))
    tensors = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    errs = []
    for k, a in tensors.items():
        if not k.endswith("lora_A.weight"):
            continue
        m = k[len("base_model.model."): -len(".lora_A.weight")]
        b = tensors[k.replace("lora_A", "lora_B")]
        r = a.shape[0]
        alpha = (cfg.get("alpha_pattern") or {}).get(m, cfg.get("lora_alpha", r))
        rp = (cfg.get("rank_pattern") or {}).get(m, cfg.get("r", r))
        scale = alpha / rp if cfg else 1.0
        d = ft.get_tensor(m + ".weight").float() - base.get_tensor(m + ".weight").float()
        approx = scale * (b.float() @ a.float())
        errs.append(float(torch.linalg.vector_norm(d - approx) / torch.linalg.vector_norm(d)))
    return (sum(errs) / len(errs) if errs else float("nan")), (max(errs) if errs else float("nan")), len(errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="hidden 512, 4 layers, vocab 8000 (≈25M parameters)")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-extract-lora"),
                    help="path of mergekit-extract-lora (default: from PATH)")
    ap.add_argument("--skip", default="", help="comma-separated runs to skip (ours-exact,dense-loop,mergekit)")
    ap.add_argument("--keep", default=None, help="build the pair in this folder and keep it")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--repeat", type=int, default=1, help="run every tool N times, interleaved; report the best")
    args = ap.parse_args()
    dims = dict(hidden=512, layers=4, inter=2816, vocab=8000, heads=8, kv_heads=2) if args.small else \
        dict(hidden=896, layers=8, inter=4864, vocab=32000, heads=14, kv_heads=2)
    skip = set(filter(None, args.skip.split(",")))
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-extract-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        base_dir, ft_dir, n_params = build_pair(tmp, **dims)
        print(f"built pair: {n_params / 1e6:.1f}M parameters, bf16, {dims} in {time.perf_counter() - t0:.1f}s "
              f"({tmp})", flush=True)
        # Flush the freshly written files first, so the first timed run does not compete with disk write-back.
        os.sync()
        surgery = [sys.executable, "-m", "peft_surgery.cli.main"]
        env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
        runs = {
            "ours-auto": surgery + ["extract", str(base_dir), str(ft_dir), "--rank", str(RANK), "--device", "cpu",
                                    "-o", str(tmp / "ours-auto"), "--quiet"],
            "ours-exact": surgery + ["extract", str(base_dir), str(ft_dir), "--rank", str(RANK), "--svd", "exact",
                                     "--device", "cpu", "-o", str(tmp / "ours-exact"), "--quiet"],
            "dense-loop": [sys.executable, "-c", DENSE_LOOP, str(base_dir), str(ft_dir), str(tmp / "dense-loop"),
                           str(RANK)],
        }
        if args.mergekit and Path(args.mergekit).exists():
            runs["mergekit"] = [args.mergekit, "--model", str(ft_dir), "--base-model", str(base_dir),
                                "--out-path", str(tmp / "mergekit"), "--max-rank", str(RANK),
                                "-e", "embed_tokens", "-e", "lm_head", "--skip-undecomposable"]
        else:
            print("mergekit-extract-lora not found: skipping it (pass --mergekit PATH)", flush=True)
        results: dict[str, dict] = {}
        times: dict[str, list[float]] = {}
        rss: dict[str, float] = {}
        # Interleave the repeats (A B C, A B C, ...) and keep each tool's fastest run: the machine is shared,
        # and this gives every tool the same chance of hitting a quiet moment.
        for rep in range(args.repeat):
            for name, cmd in runs.items():
                if name in skip or results.get(name, {}).get("failed"):
                    continue
                shutil.rmtree(tmp / name, ignore_errors=True)
                wall, peak, rc, tail = run(cmd, env)
                if rc != 0:
                    print(f"{name}: FAILED (exit {rc})\n{tail}", flush=True)
                    results[name] = {"failed": rc}
                    continue
                times.setdefault(name, []).append(wall)
                rss[name] = max(rss.get(name, 0.0), peak)
                print(f"  run {rep + 1}: {name:11s} {wall:7.1f} s  peak RSS {peak:6.0f} MiB", flush=True)
        print()
        for name, ts in times.items():
            mean_err, max_err, n_mod = lora_errors(tmp / name, base_dir, ft_dir)
            results[name] = {"time_s": round(min(ts), 2), "times_s": [round(t, 2) for t in ts],
                             "peak_rss_mib": round(rss[name]), "mean_rel_error": mean_err, "max_rel_error": max_err,
                             "modules": n_mod}
            print(f"{name:11s} {min(ts):7.1f} s (best of {len(ts)})  peak RSS {rss[name]:7.0f} MiB  "
                  f"mean rel error {mean_err:.6f}  max {max_err:.6f}  ({n_mod} modules)", flush=True)
        ours = results.get("ours-auto", {})
        if "time_s" in ours:
            print("\nratios (ours-auto vs X): speed-up ×, error ratio")
            for name, r in results.items():
                if name != "ours-auto" and "time_s" in r:
                    print(f"  vs {name:11s} {r['time_s'] / ours['time_s']:6.2f}×   "
                          f"{ours['mean_rel_error'] / r['mean_rel_error']:.6f}")
        meta = {"parameters": n_params, "dims": dims, "rank": RANK, "repeat": args.repeat, "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                "torch": torch.__version__, "results": results}
        if args.json:
            Path(args.json).write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
