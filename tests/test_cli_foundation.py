"""CLI: inspect/convert output, and bad input → one clear line, non-zero exit, no traceback, no output."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from peft_surgery import __version__, load_adapter
from peft_surgery.adapter import frobenius
from peft_surgery.cli.main import cli

from .conftest import FIXTURES, corpus_path

TINY = FIXTURES / "tiny_peft_lora"


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *needles: str):
    assert result.exit_code != 0, result.output
    out = result.output.strip()
    assert "Traceback" not in out
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("Error: ")
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_version_and_help():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = run("--help")
    assert r.exit_code == 0 and "inspect" in r.output and "convert" in r.output
    for cmd in ("inspect", "convert"):
        h = run(cmd, "--help")
        assert h.exit_code == 0 and "Example:" in h.output


def test_console_script_entry_point():
    exe = Path(sys.executable).parent / "peft-surgery"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert __version__ in out.stdout


def test_inspect_json_fields_and_norms():
    r = run("inspect", TINY, "--json", "--norms")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    for key in ("format", "num_modules", "module_types", "ranks", "scales", "num_params", "dtypes",
                "modules_to_save", "base_model", "config", "norms"):
        assert key in info
    adapter = load_adapter(TINY)
    assert info["format"] == "peft"
    assert info["num_modules"] == len(adapter) == 4
    assert info["module_types"] == {"lora": 4}
    assert info["ranks"] == {k: 4 for k in adapter.modules}
    assert info["scales"] == {k: 2.0 for k in adapter.modules}
    assert info["num_params"] == sum(t.numel() for m in adapter.modules.values() for _, t in m.tensors())
    for name, m in adapter.items():
        expected = float(torch.linalg.matrix_norm(2.0 * m.delta.up.double() @ m.delta.down.double()))
        assert math.isclose(info["norms"][name], expected, rel_tol=1e-6)
        assert math.isclose(frobenius(m.delta_weight()), expected, rel_tol=1e-6)


def test_inspect_table_and_rslora_scale(tmp_path):
    r = run("inspect", TINY)
    assert r.exit_code == 0
    assert "format:      peft" in r.output and "model.layers.0.self_attn.q_proj" in r.output
    d = tmp_path / "rs"
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_rslora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    info = json.loads(run("inspect", d, "--json").output)
    assert set(info["scales"].values()) == {8 / math.sqrt(4)}


def test_inspect_plain_checkpoint():
    info = json.loads(run("inspect", corpus_path("base_tiny_gpt2_n2"), "--json").output)
    assert info["format"] == "checkpoint"
    assert info["num_tensors"] == 28


def test_convert_peft_to_peft_round_trip(tmp_path):
    r = run("convert", TINY, "--to", "peft", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    a, b = load_adapter(TINY), load_adapter(tmp_path / "out")
    for name in a.modules:
        assert torch.equal(a[name].delta_weight(), b[name].delta_weight())
    # refuses to overwrite without --overwrite, and never writes over its input
    assert_user_error(run("convert", TINY, "--to", "peft", "-o", tmp_path / "out"), "already exists")
    assert run("convert", TINY, "--to", "peft", "-o", tmp_path / "out", "--overwrite").exit_code == 0
    assert_user_error(run("convert", tmp_path / "out", "--to", "peft", "-o", tmp_path / "out", "--overwrite"),
                      "input")


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line naming file and problem, non-zero exit, no traceback, nothing written
# ---------------------------------------------------------------------------------------------------------


def _no_output(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_truncated_safetensors(tmp_path):
    d = tmp_path / "trunc"
    shutil.copytree(TINY, d)
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    for cmd in (["inspect", d], ["convert", d, "--to", "peft", "-o", tmp_path / "out"]):
        assert_user_error(run(*cmd), "adapter_model.safetensors", "truncated")
    _no_output(tmp_path)


def test_non_adapter_file(tmp_path):
    save_file({"w_a_000": torch.zeros(2, 2), "something": torch.zeros(3)}, tmp_path / "x.safetensors")
    assert_user_error(run("convert", tmp_path / "x.safetensors", "--to", "peft", "-o", tmp_path / "out"),
                      "x.safetensors", "format")
    _no_output(tmp_path)


def test_keys_missing_b_matrices(tmp_path):
    src = corpus_path("custom_lora_vit")
    for cmd in (["inspect", src], ["convert", src, "--to", "peft", "-o", tmp_path / "out"]):
        assert_user_error(run(*cmd), "custom_lora_vit")
    _no_output(tmp_path)


def test_peft_module_missing_lora_b(tmp_path):
    d = tmp_path / "noB"
    shutil.copytree(TINY, d)
    from peft_surgery.checkpoint import Checkpoint

    ck = Checkpoint.open(d)
    kept = {k: ck[k] for k in ck.keys() if not k.endswith("layers.1.self_attn.v_proj.lora_B.weight")}
    ck.close()
    save_file(kept, d / "adapter_model.safetensors")
    assert_user_error(run("convert", d, "--to", "peft", "-o", tmp_path / "out"),
                      "model.layers.1.self_attn.v_proj", "lora_B")
    _no_output(tmp_path)


def test_unknown_peft_type(tmp_path):
    d = tmp_path / "ia3"
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert_user_error(run("convert", d, "--to", "peft", "-o", tmp_path / "out"), "adapter_config.json", "IA3")
    _no_output(tmp_path)


def test_pickle_without_allow_pickle(tmp_path):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(TINY / "adapter_config.json", d)
    from peft_surgery.checkpoint import Checkpoint

    ck = Checkpoint.open(TINY)
    torch.save({k: ck[k] for k in ck.keys()}, d / "adapter_model.bin")
    assert_user_error(run("convert", d, "--to", "peft", "-o", tmp_path / "out"), "adapter_model.bin",
                      "--allow-pickle")
    _no_output(tmp_path)
    r = run("convert", d, "--to", "peft", "-o", tmp_path / "out", "--allow-pickle")
    assert r.exit_code == 0, r.output
    a, b = load_adapter(TINY), load_adapter(tmp_path / "out")
    assert all(torch.equal(a[n].delta_weight(), b[n].delta_weight()) for n in a.modules)


def test_missing_path(tmp_path):
    assert_user_error(run("inspect", tmp_path / "nothing-here"), "nothing-here", "no such file")
