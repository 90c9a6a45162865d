"""End to end: tiny transformers models built here, `peft-surgery extract`, then PEFT on BASE must give FT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from peft_surgery.cli.main import cli
from peft_surgery.formats import load_adapter

from .models import input_ids, logits, save, tiny_gpt2, tiny_llama

# module-name suffix → true rank of the delta added to it (different ranks, so the budget test is meaningful)
LLAMA_DELTAS = {"self_attn.q_proj": 1, "self_attn.v_proj": 3, "mlp.down_proj": 2}


def _run(*args, cwd: Path | None = None):
    return CliRunner().invoke(cli, ["extract", *[str(a) for a in args]], catch_exceptions=False)


def _add_low_rank(model, deltas: dict[str, int], seed: int = 0, *, transposed: bool = False) -> dict[str, int]:
    """FT = BASE + exact low-rank deltas on weights whose name contains a key of ``deltas``."""
    g = torch.Generator().manual_seed(seed)
    touched = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            for suffix, r in deltas.items():
                if name.endswith(suffix + ".weight"):
                    a, b = p.shape
                    p += 0.2 * torch.randn(a, r, generator=g) @ torch.randn(r, b, generator=g) / b ** 0.5
                    touched[name[: -len(".weight")]] = r
    return touched


def _peft_logits(base_dir: Path, adapter_dir: Path, loader) -> torch.Tensor:
    from peft import PeftModel

    base = loader()
    pm = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return logits(pm, input_ids())


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(0)
    save(base, root / "base")
    ft = tiny_llama(0)
    touched = _add_low_rank(ft, LLAMA_DELTAS)
    with torch.no_grad():
        ft.model.layers[0].input_layernorm.weight += 0.25  # a changed 1-D tensor
    save(ft, root / "ft")
    return root, touched, logits(ft, input_ids())


def _load_llama(path: Path):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("args", [
    ["--rank", "4"],
    ["--rank", "4", "--alpha", "8", "--distribute-scale", "--svd", "exact"],
    ["--rank", "6", "--rslora", "--svd", "randomized", "--seed", "3"],
    ["--energy", "0.9999"],
], ids=["rank", "alpha-distribute-exact", "rslora-randomized", "energy"])
def test_llama_adapter_reproduces_finetune(llama_pair, tmp_path, args):
    root, touched, ft_logits = llama_pair
    out = tmp_path / "adapter"
    res = _run(root / "base", root / "ft", *args, "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(root / "base")
    assert cfg["task_type"] == "CAUSAL_LM"
    assert set(cfg["target_modules"]) == set(touched)
    assert cfg["modules_to_save"] == ["model.layers.0.input_layernorm"]
    if "--energy" in args:  # exactly rank-r deltas: the energy criterion finds r
        ranks = {m: cfg["rank_pattern"].get(m, cfg["r"]) for m in touched}
        assert ranks == touched
    got = _peft_logits(root / "base", out, _load_llama(root / "base"))
    assert torch.allclose(got, ft_logits, atol=1e-4), float((got - ft_logits).abs().max())


def test_param_budget_finds_true_ranks(llama_pair, tmp_path):
    root, touched, ft_logits = llama_pair
    shapes = {"self_attn.q_proj": 32 + 32, "self_attn.v_proj": 16 + 32, "mlp.down_proj": 32 + 48}
    cost = sum(r * shapes[m.split("layers.")[1].split(".", 1)[1]] for m, r in touched.items())
    budget = cost + 32  # + the changed norm kept whole
    out = tmp_path / "adapter"
    res = _run(root / "base", root / "ft", "--param-budget", budget, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["totals"]["parameters"] <= budget
    adapter = load_adapter(out)
    assert adapter.ranks() == touched  # uniform rank 3 would not fit; the allocator spends rank where it matters
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]
    got = _peft_logits(root / "base", out, _load_llama(root / "base"))
    assert torch.allclose(got, ft_logits, atol=1e-4)


def test_gpt2_conv1d_fan_in_fan_out_and_bias(tmp_path):
    base = tiny_gpt2(0)
    save(base, tmp_path / "base")
    ft = tiny_gpt2(0)
    touched = _add_low_rank(ft, {"attn.c_attn": 2, "mlp.c_fc": 3})
    with torch.no_grad():
        ft.transformer.h[1].attn.c_attn.bias += 0.3  # bias of a LoRA'd module → lora_B.bias
    save(ft, tmp_path / "ft")
    out = tmp_path / "adapter"
    res = _run(tmp_path / "base", tmp_path / "ft", "--rank", "3", "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["lora_bias"] is True
    assert set(cfg["target_modules"]) == set(touched)
    from transformers import AutoModelForCausalLM

    got = _peft_logits(tmp_path / "base", out,
                       lambda: AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval())
    assert torch.allclose(got, logits(ft, input_ids()), atol=1e-4)


@pytest.mark.parametrize("embed_lora", [False, True], ids=["modules_to_save", "embed-lora"])
def test_tied_embeddings(tmp_path, embed_lora):
    base = tiny_llama(0, tie=True)
    save(base, tmp_path / "base")
    ft = tiny_llama(0, tie=True)
    _add_low_rank(ft, {"embed_tokens": 2, "self_attn.q_proj": 1})
    save(ft, tmp_path / "ft")
    out = tmp_path / "adapter"
    res = _run(tmp_path / "base", tmp_path / "ft", "--rank", "2", "-o", out, "--quiet",
               *(["--embed-lora"] if embed_lora else []))
    assert res.exit_code == 0, res.output
    adapter = load_adapter(out)
    if embed_lora:
        assert adapter["model.embed_tokens"].layout.kind == "embedding" and "lm_head" in adapter.modules
    else:
        assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(adapter.modules_to_save)
    got = _peft_logits(tmp_path / "base", out, _load_llama(tmp_path / "base"))
    assert torch.allclose(got, logits(ft, input_ids()), atol=1e-4)


def test_sharded_bf16_base_and_fp32_finetune(tmp_path):
    base = tiny_llama(0, dtype=torch.bfloat16)
    save(base, tmp_path / "base", max_shard_size="20KB")
    assert (tmp_path / "base" / "model.safetensors.index.json").exists()
    ft = tiny_llama(0, dtype=torch.bfloat16).float()
    _add_low_rank(ft, {"mlp.up_proj": 2})
    save(ft, tmp_path / "ft")
    out = tmp_path / "adapter"
    res = _run(tmp_path / "base", tmp_path / "ft", "--rank", "2", "-o", out, "--quiet")
    assert res.exit_code == 0, res.output
    adapter = load_adapter(out)
    b = {k: v for f in (tmp_path / "base").glob("*.safetensors") for k, v in load_file(f).items()}
    f = load_file(tmp_path / "ft" / "model.safetensors")
    assert set(adapter.modules) == {f"model.layers.{i}.mlp.up_proj" for i in range(2)}
    for name, m in adapter.items():
        assert m.delta.up.dtype == torch.float32  # FT's dtype
        diff = f[name + ".weight"] - b[name + ".weight"].float()
        assert torch.allclose(m.delta_weight(), diff, atol=1e-5)


def test_report_json_plot_and_default_name(llama_pair, tmp_path, monkeypatch):
    root, touched, _ = llama_pair
    monkeypatch.chdir(tmp_path)
    res = _run(root / "base", root / "ft", "--rank", "4", "--report", "r.json", "--plot", "p.png", "--quiet")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ft-lora-r4" / "adapter_model.safetensors").exists()
    rep = json.loads((tmp_path / "r.json").read_text())
    rows = {r["module"]: r for r in rep["rows"]}
    for m, r in touched.items():
        assert rows[m]["rank"] == 4 and rows[m]["rel_error"] < 1e-5 and rows[m]["energy"] == pytest.approx(1.0)
        assert rows[m]["params"] == 4 * sum(int(x) for x in rows[m]["shape"].split("x"))
    assert rep["totals"]["lora_modules"] == len(touched) and rep["totals"]["max_rel_error"] < 1e-5
    assert rep["totals"]["unchanged_skipped"] > 0 and rep["written"] is True
    assert (tmp_path / "p.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the file/tensor, nothing written
# ---------------------------------------------------------------------------------------------------------


def _assert_error(res, out: Path, *needles: str):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error:") and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_path_and_unknown_hub_id(llama_pair, tmp_path):
    root, _, _ = llama_pair
    out = tmp_path / "adapter"
    _assert_error(_run(tmp_path / "nope", root / "ft", "-o", out), out, str(tmp_path / "nope"), "no such file")
    _assert_error(_run(root / "base", "no-such-org-xyz/no-such-model", "-o", out), out,
                  "no-such-org-xyz/no-such-model")


def test_mismatched_architectures_and_shapes(llama_pair, tmp_path):
    root, _, _ = llama_pair
    save(tiny_gpt2(0), tmp_path / "gpt2")
    out = tmp_path / "adapter"
    _assert_error(_run(root / "base", tmp_path / "gpt2", "-o", out), out, "different architectures", "llama", "gpt2")
    save(tiny_llama(0, intermediate=64), tmp_path / "wide")
    _assert_error(_run(root / "base", tmp_path / "wide", "-o", out), out, "mlp.down_proj.weight", "shape")
    res = _run(root / "base", tmp_path / "wide", "-o", out, "--skip-mismatched", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["totals"]["mismatched_skipped"] == 6  # gate/up/down in two layers
    assert any("mismatched" in n for n in rep["notes"])


def test_nan_names_tensor_and_file(llama_pair, tmp_path):
    root, _, _ = llama_pair
    (tmp_path / "bad").mkdir()
    sd = load_file(root / "ft" / "model.safetensors")
    sd["model.layers.1.self_attn.o_proj.weight"][3, 4] = float("nan")
    save_file(sd, tmp_path / "bad" / "model.safetensors")
    out = tmp_path / "adapter"
    _assert_error(_run(root / "base", tmp_path / "bad", "-o", out), out, "model.layers.1.self_attn.o_proj.weight",
                  str(tmp_path / "bad" / "model.safetensors"), "NaN")


def test_identical_models_write_nothing(llama_pair, tmp_path):
    root, _, _ = llama_pair
    out = tmp_path / "adapter"
    res = _run(root / "base", root / "base", "-o", out)
    assert res.exit_code == 0
    assert "Warning" in res.stderr and "nothing was written" in res.stderr
    assert not out.exists()


def test_existing_output_and_unknown_format_fail_before_work(llama_pair, tmp_path):
    root, _, _ = llama_pair
    out = tmp_path / "adapter"
    out.mkdir()
    res = _run(root / "base", root / "ft", "-o", out)
    assert res.exit_code == 2 and "already exists" in res.stderr
    out2 = tmp_path / "adapter2"
    _assert_error(_run(root / "base", root / "ft", "-o", out2, "--format", "nope"), out2, "cannot write format")
    _assert_error(_run(root / "base", root / "ft", "-o", out2, "--rank", "4", "--energy", "0.9"), out2, "only one")


def test_pickles_need_allow_pickle(llama_pair, tmp_path):
    root, touched, _ = llama_pair
    (tmp_path / "pkl").mkdir()
    torch.save(load_file(root / "ft" / "model.safetensors"), tmp_path / "pkl" / "pytorch_model.bin")
    out = tmp_path / "adapter"
    _assert_error(_run(root / "base", tmp_path / "pkl", "-o", out), out, "pickle", "--allow-pickle")
    res = _run(root / "base", tmp_path / "pkl", "-o", out, "--allow-pickle", "--quiet")
    assert res.exit_code == 0, res.output
    assert set(load_adapter(out).modules) == set(touched)
