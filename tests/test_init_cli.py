"""init at checkpoint level: streaming on sharded checkpoints, round trip through to-lora, CLI, bad input, GPU."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_surgery import checkpoint as ckpt_mod
from peft_surgery.checkpoint import Checkpoint, save_tensors
from peft_surgery.cli.main import cli
from peft_surgery.formats import load_adapter, save_adapter
from peft_surgery.initialize import init_adapter, to_lora

from .models import save, tiny_llama


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _write_base(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, folder / "model.safetensors", {"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded") / "base"
    save(tiny_llama(5, hidden=32, heads=4, kv_heads=2, intermediate=48, dtype=torch.bfloat16), d,
         max_shard_size="8KB")
    (d / "tokenizer_config.json").write_text("{}")
    return d


# --------------------------------------------------------------------------------------------------------
# streaming, layout, dtype
# --------------------------------------------------------------------------------------------------------


def test_sharded_bf16_layout_and_streaming(sharded_bf16, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_get, real_write = Checkpoint.get_tensor, ckpt_mod.ShardedWriter._write

    def get(self, key):
        events.append(("read", Path(self.shard_of(key)).name))
        return real_get(self, key)

    def write(self, fname, tensors):
        events.append(("write", fname))
        return real_write(self, fname, tensors)

    monkeypatch.setattr(Checkpoint, "get_tensor", get)
    monkeypatch.setattr(ckpt_mod.ShardedWriter, "_write", write)
    out = tmp_path / "out"
    rep = init_adapter(sharded_bf16, out, method="pissa", rank=4, alpha=8, target_modules="q_proj,v_proj,down_proj")
    monkeypatch.undo()

    base = Checkpoint.open(sharded_bf16)
    res = Checkpoint.open(out / "residual")
    assert len(base.files) >= 3
    # streaming: each input shard is written out before the next input shard is read
    writes = [f for e, f in events if e == "write"]
    assert writes == sorted(writes) and len(writes) == len(base.files)
    for i, (e, f) in enumerate(events):
        if e == "read":
            assert all(w < f for e2, w in events[:i] if e2 == "write")
    # same files, same index, same dtypes, same metadata, same side files
    assert [p.name for p in res.files] == [p.name for p in base.files]
    assert res.index["weight_map"] == base.index["weight_map"]
    assert res.metadata == base.metadata
    names = {p.name for p in (out / "residual").iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    ad = load_adapter(out / "adapter")
    for k in base.keys():
        assert res.dtype(k) == base.dtype(k) == torch.bfloat16
        module = k[: -len(".weight")]
        if module in ad.modules:
            m = ad[module]
            expected = (base.get_tensor(k).float() - m.delta_weight()).to(torch.bfloat16)
            assert torch.equal(res.get_tensor(k), expected), k
        else:
            assert torch.equal(res.get_tensor(k), base.get_tensor(k)), k
    assert {m.delta.up.dtype for m in ad.modules.values()} == {torch.float32}
    # the only loss is the bf16 cast of the residual: ≤ half an ulp of bf16 relative to |W| entries
    assert 1e-5 < rep.totals["max_recon_error"] < 2 ** -8
    assert all(0 < r["energy"] < 1 for r in rep.rows) and len(rep.rows) == 6


def test_cli_json_report_and_files(sharded_bf16, tmp_path):
    out = tmp_path / "o"
    r = run("init", "olora", sharded_bf16, "-r", "2", "--target-modules", "k_proj", "--json", "--device", "cpu",
            "-o", out)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["method"] == "olora" and rep["totals"]["modules"] == 2
    assert json.loads((out / "report.json").read_text())["rows"] == rep["rows"]
    side = json.loads((out / "adapter" / "peft_surgery_init.json").read_text())
    assert side["init_lora_weights"] == "olora" and side["rank"] == 2
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["target_modules"] == ["k_proj"] and cfg["r"] == 2
    # existing output is refused without --overwrite, accepted with it
    r = run("init", "olora", sharded_bf16, "-r", "2", "--target-modules", "k_proj", "-q", "-o", out)
    assert r.exit_code == 2 and "already exists" in r.output
    r = run("init", "pissa", sharded_bf16, "-r", "2", "--target-modules", "k_proj", "-q", "--overwrite", "-o", out)
    assert r.exit_code == 0 and r.output == ""


# --------------------------------------------------------------------------------------------------------
# round trip: init → train → to-lora → merge into BASE == merge trained into residual
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(out_dim=st.integers(2, 14), in_dim=st.integers(2, 14), frac=st.floats(0.0, 1.0),
       method=st.sampled_from(["pissa", "olora", "milora"]), conv1d=st.booleans(), rslora=st.booleans(),
       alpha=st.sampled_from([1.0, 4.0, 6.0]), seed=st.integers(0, 10_000))
def test_round_trip_to_lora(out_dim, in_dim, frac, method, conv1d, rslora, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    rank = max(1, round(frac * min(out_dim, in_dim)))
    name = "h.0.attn.c_attn" if conv1d else "layers.0.proj"
    stored = (in_dim, out_dim) if conv1d else (out_dim, in_dim)
    W = torch.randn(stored, generator=g)
    tensors = {f"{name}.weight": W, f"{name}.bias": torch.randn(out_dim, generator=g),
               "layers.0.other.weight": torch.randn(3, 3, generator=g)}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        base = _write_base(td / "base", tensors, {"model_type": "gpt2"} if conv1d else {"model_type": "custom"})
        init_adapter(base, td / "init", method=method, rank=rank, alpha=alpha, rslora=rslora,
                     target_modules=[name.rsplit(".", 1)[-1]])
        res = Checkpoint.open(td / "init" / "residual")
        assert torch.equal(res.get_tensor("layers.0.other.weight"), tensors["layers.0.other.weight"])
        ad = load_adapter(td / "init" / "adapter")
        assert ad[name].layout.fan_in_fan_out == conv1d
        # "training": perturb both factors
        m = ad[name]
        trained_mod = m.replace(delta=type(m.delta)(down=m.delta.down + 0.3 * torch.randn(m.delta.down.shape,
                                                                                            generator=g),
                                                    up=m.delta.up + 0.3 * torch.randn(m.delta.up.shape, generator=g)))
        trained = ad.copy(modules={name: trained_mod})
        save_adapter(trained, td / "trained")
        W_res = res.get_tensor(f"{name}.weight")
        expected = W_res + trained_mod.delta_weight()  # merge trained into the residual

        to_lora(td / "trained", td / "lora_i", initial=td / "init" / "adapter")
        to_lora(td / "trained", td / "lora_b", base=base, method=method)
        for out in ("lora_i", "lora_b"):
            lora = load_adapter(td / out)
            lm = lora[name]
            assert lm.rank == 2 * rank and lm.layout.fan_in_fan_out == conv1d
            cfg = json.loads((td / out / "adapter_config.json").read_text())
            assert cfg["lora_alpha"] == pytest.approx(alpha * (math.sqrt(2) if rslora else 2))
            merged = W + lm.delta_weight()  # merge the plain LoRA into the ORIGINAL base
            torch.testing.assert_close(merged, expected, atol=2e-5, rtol=2e-5)
        # exact recompression back to the doubled rank changes nothing; a smaller rank reports its error
        full = min(2 * rank, out_dim, in_dim)
        rep = to_lora(td / "trained", td / "lora_r", initial=td / "init" / "adapter", rank=full)
        torch.testing.assert_close(W + load_adapter(td / "lora_r")[name].delta_weight(), expected,
                                   atol=2e-5, rtol=2e-5)
        assert rep.rows[0]["recompress_error"] < 1e-5


def test_to_lora_recompress_error_is_measured(tmp_path):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 16, generator=g)
    base = _write_base(tmp_path / "base", {"blk.q.weight": W})
    init_adapter(base, tmp_path / "init", method="pissa", rank=4, target_modules=["q"])
    ad = load_adapter(tmp_path / "init" / "adapter")
    m = ad["blk.q"]
    tm = m.replace(delta=type(m.delta)(down=m.delta.down + torch.randn(m.delta.down.shape, generator=g),
                                       up=m.delta.up + torch.randn(m.delta.up.shape, generator=g)))
    save_adapter(ad.copy(modules={"blk.q": tm}), tmp_path / "trained")
    r = run("init", "to-lora", tmp_path / "trained", "--initial", tmp_path / "init" / "adapter", "--rank", "3",
            "--json", "-o", tmp_path / "lora3")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    lora = load_adapter(tmp_path / "lora3")["blk.q"]
    assert lora.rank == 3
    exact = tm.delta_weight() - m.delta_weight()
    measured = float((exact - lora.delta_weight()).norm() / exact.norm())
    S = torch.linalg.svdvals(exact.double())
    assert rep["rows"][0]["recompress_error"] == pytest.approx(measured, rel=1e-4)
    assert measured == pytest.approx(float(S[3:].norm() / S.norm()), rel=1e-4)  # Eckart–Young optimal


# --------------------------------------------------------------------------------------------------------
# bad input: one line naming file and tensor, exit 2, nothing written
# --------------------------------------------------------------------------------------------------------


def _assert_clean_error(r, out: Path, *needles: str):
    assert r.exit_code == 2, r.output
    # a terminal shows what follows the last carriage return (the progress bar erases itself on error)
    lines = [ln.split("\r")[-1] for ln in r.output.strip().split("\n")]
    lines = [ln for ln in lines if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.tmp") for p in out.parent.iterdir())


def test_bad_rank_too_large(tmp_path):
    base = _write_base(tmp_path / "base", {"a.q_proj.weight": torch.randn(6, 4)})
    r = run("init", "pissa", base, "-r", "5", "--target-modules", "q_proj", "-o", tmp_path / "out")
    _assert_clean_error(r, tmp_path / "out", "model.safetensors", "a.q_proj.weight", "rank 5", "max rank 4")


def test_bad_targets_match_nothing(tmp_path):
    base = _write_base(tmp_path / "base", {"a.q_proj.weight": torch.randn(6, 4), "a.norm.weight": torch.ones(4)})
    r = run("init", "olora", base, "-r", "2", "--target-modules", "v_proj,o_proj", "-o", tmp_path / "out")
    _assert_clean_error(r, tmp_path / "out", str(base), "match no 2-D weight", "q_proj")
    # no config.json and no --target-modules: no default to fall back on
    r = run("init", "olora", base, "-r", "2", "-o", tmp_path / "out")
    _assert_clean_error(r, tmp_path / "out", "--target-modules")
    # a 1-D weight (norm) cannot be targeted
    r = run("init", "pissa", base, "-r", "1", "--target-modules", "norm", "-o", tmp_path / "out")
    _assert_clean_error(r, tmp_path / "out", "a.norm.weight", "2-D")


def test_bad_non_float_and_non_finite(tmp_path):
    base = _write_base(tmp_path / "base", {"a.q_proj.weight": torch.randint(-5, 5, (6, 4), dtype=torch.int8)})
    r = run("init", "pissa", base, "-r", "2", "--target-modules", "q_proj", "-o", tmp_path / "out")
    _assert_clean_error(r, tmp_path / "out", "model.safetensors", "a.q_proj.weight", "int8")
    W = torch.randn(6, 4)
    W[1, 1] = float("nan")
    base2 = _write_base(tmp_path / "base2", {"a.q_proj.weight": W})
    r = run("init", "milora", base2, "-r", "2", "--target-modules", "q_proj", "-o", tmp_path / "out")
    _assert_clean_error(r, tmp_path / "out", "a.q_proj.weight", "NaN")


def test_bad_to_lora_requests(tmp_path):
    base = _write_base(tmp_path / "base", {"x.q.weight": torch.randn(8, 6)})
    r = run("init", "pissa", base, "-r", "2", "--target-modules", "q", "--niter", "2", "-q", "-o", tmp_path / "init")
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "init" / "adapter" / "peft_surgery_init.json").read_text())
    assert side["init_lora_weights"] == "pissa_niter_2"
    out = tmp_path / "lora"
    # neither --initial nor --base
    _assert_clean_error(run("init", "to-lora", tmp_path / "init" / "adapter", "-o", out), out, "--initial")
    # randomized PiSSA cannot be recomputed from the base (the side file says pissa_niter_2)
    _assert_clean_error(run("init", "to-lora", tmp_path / "init" / "adapter", "--base", base, "-o", out), out,
                        "pissa_niter", "--initial")
    # a PEFT config that says pissa_niter_4 is refused the same way
    trained = tmp_path / "trained"
    ad = load_adapter(tmp_path / "init" / "adapter")
    save_adapter(ad.copy(config={**ad.config, "init_lora_weights": "pissa_niter_4"}), trained)
    _assert_clean_error(run("init", "to-lora", trained, "--base", base, "-o", out), out, "pissa_niter")
    # plain LoRA config and no --method: we cannot tell what to recompute
    plain = tmp_path / "plain"
    save_adapter(ad, plain)
    _assert_clean_error(run("init", "to-lora", plain, "--base", base, "-o", out), out, "--method")
    # rsLoRA with patterns is refused like PEFT does
    rs = tmp_path / "rs"
    m = ad["x.q"]
    save_adapter(ad.copy(modules={"x.q": m.replace(rslora=True, scale=m.scale)},
                         config={**ad.config, "use_rslora": True, "lora_alpha": m.scale * math.sqrt(2),
                                 "alpha_pattern": {"q": m.scale * math.sqrt(2)}}), rs)
    _assert_clean_error(run("init", "to-lora", rs, "--initial", tmp_path / "init" / "adapter", "-o", out), out,
                        "rsLoRA")
    # the initial adapter must fit the trained one
    other = _write_base(tmp_path / "other", {"x.q.weight": torch.randn(8, 6)})
    init_adapter(other, tmp_path / "init3", method="pissa", rank=3, target_modules=["q"])
    _assert_clean_error(run("init", "to-lora", tmp_path / "init" / "adapter", "--initial",
                            tmp_path / "init3" / "adapter", "-o", out), out, "x.q", "differ")


def test_help_has_examples():
    for sub in ("pissa", "olora", "milora", "to-lora"):
        r = run("init", sub, "--help")
        assert r.exit_code == 0 and "Example:" in r.output and "--overwrite" in r.output and "--device" in r.output


# --------------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_gpu_matches_cpu(cuda_device, tmp_path, method):
    g = torch.Generator().manual_seed(0)
    base = _write_base(tmp_path / "base", {"l.q.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
                                           "l.v.weight": torch.randn(32, 48, generator=g).to(torch.bfloat16)})
    init_adapter(base, tmp_path / "cpu", method=method, rank=8, target_modules=["q", "v"], device="cpu")
    init_adapter(base, tmp_path / "gpu", method=method, rank=8, target_modules=["q", "v"], device=cuda_device)
    a, b = load_adapter(tmp_path / "cpu" / "adapter"), load_adapter(tmp_path / "gpu" / "adapter")
    for name in a.modules:
        torch.testing.assert_close(a[name].delta_weight(), b[name].delta_weight(), atol=1e-4, rtol=1e-4)
    ra, rb = Checkpoint.open(tmp_path / "cpu" / "residual"), Checkpoint.open(tmp_path / "gpu" / "residual")
    for k in ra.keys():
        assert rb.dtype(k) == torch.bfloat16 and rb.get_tensor(k).device.type == "cpu"
        torch.testing.assert_close(ra.get_tensor(k).float(), rb.get_tensor(k).float(), atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------------
# QPiSSA error report (NF4 from peft_surgery.surgery.nf4)
# --------------------------------------------------------------------------------------------------------


def test_nf4_comparison_math():
    nf4 = pytest.importorskip("peft_surgery.surgery.nf4")
    from peft_surgery.initialize import nf4_comparison
    from peft_surgery.surgery.init import pissa

    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 96, generator=g).to(torch.bfloat16)
    f = pissa(W, 8, 1.0)
    res = f.residual.to(torch.bfloat16)
    q = nf4_comparison(W, res, f.up @ f.down)

    def rt(t):
        p, s = nf4.quantize_nf4(t, blocksize=64, double_quant=True)
        return nf4.dequantize(p, s, dtype=torch.float32)

    e_l = W.float() - rt(W)
    e_p = W.float() - (rt(res) + f.up @ f.down)
    assert q["qlora_error"] == pytest.approx(float(e_l.norm() / W.float().norm()), rel=1e-6)
    assert q["qpissa_error"] == pytest.approx(float(e_p.norm() / W.float().norm()), rel=1e-6)
    assert q["nuc_reduction"] == pytest.approx(1 - float(torch.linalg.svdvals(e_p).sum() /
                                                         torch.linalg.svdvals(e_l).sum()), rel=1e-5)
    assert 0.08 < q["qlora_error"] < 0.11  # NF4 on Gaussian weights: ≈ 0.092 (reference baseline)
    # the residual has a smaller range than W, so its NF4 error is smaller: QPiSSA beats QLoRA
    assert q["qpissa_error"] < q["qlora_error"] and q["error_reduction"] > 0.05


def test_quantize_without_checkpoint_quantizer_is_a_clean_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft_surgery.quantize", None)  # a build without the quantizer
    base = _write_base(tmp_path / "base", {"a.q_proj.weight": torch.randn(8, 8)})
    r = run("init", "pissa", base, "-r", "2", "--target-modules", "q_proj", "--quantize", "nf4", "-o", tmp_path / "o")
    _assert_clean_error(r, tmp_path / "o", "peft_surgery.quantize")


def test_qpissa_stores_nf4_residual_and_reports_it(sharded_bf16, tmp_path):
    nf4 = pytest.importorskip("peft_surgery.surgery.nf4")
    pytest.importorskip("peft_surgery.quantize")
    out = tmp_path / "q"
    rep = init_adapter(sharded_bf16, out, method="pissa", rank=4, target_modules="q_proj,v_proj", quantize="nf4")
    res = Checkpoint.open(out / "residual")
    base = Checkpoint.open(sharded_bf16)
    cfg = json.loads((out / "residual" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    # every linear layer is 4-bit (as transformers' load_in_4bit would have it), embeddings/head are not
    qkeys = {k.split(".quant_state.")[0] for k in res.keys() if ".quant_state." in k}
    assert len(qkeys) == 2 * 7 and not any("embed" in k or "lm_head" in k for k in qkeys)
    ad = load_adapter(out / "adapter")
    sq_l = sq_p = 0.0
    for row in rep.rows:
        name = row["module"]
        key = name + ".weight"
        group = {k: res.get_tensor(k) for k in res.keys() if k == key or k.startswith(key + ".")}
        packed, state = nf4.QuantState4bit.from_state_dict(group, key)
        stored = nf4.dequantize(packed, state, dtype=torch.float32)
        W = base.get_tensor(key)
        delta = ad[name].delta_weight()
        # what is stored is NF4 of the bf16 residual W − s·B·A
        p2, s2 = nf4.quantize_nf4((W.float() - delta).to(torch.bfloat16), blocksize=64, double_quant=True)
        assert torch.equal(stored, nf4.dequantize(p2, s2, dtype=torch.float32))
        # and the report measured exactly this model
        err = float((W.float() - (stored + delta)).norm() / W.float().norm())
        assert row["qpissa_error"] == pytest.approx(err, rel=1e-5)
        assert row["qpissa_error"] < row["qlora_error"]
        sq_l += (row["qlora_error"] * float(W.float().norm())) ** 2
        sq_p += (err * float(W.float().norm())) ** 2
    assert rep.totals["error_reduction"] == pytest.approx(1 - math.sqrt(sq_p / sq_l), rel=1e-4)
    assert rep.totals["error_reduction"] > 0.05
