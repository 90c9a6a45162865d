"""Hub input from a populated local cache (offline) and Hub output against a local fake Hub server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_surgery import Adapter, AdapterModule, LoRA
from peft_surgery.checkpoint import Checkpoint
from peft_surgery.cli.main import cli
from peft_surgery.errors import SurgeryError
from peft_surgery.hub import (CardInfo, describe_upload, front_matter_yaml, make_model_card, parse_front_matter,
                              push_folder)
from peft_surgery.report import Report

from .hubfake import FakeHub, populate_hub_cache
from .models import save, tiny_llama


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF cache in tmp, used by huggingface_hub in this process, with offline mode on."""
    import huggingface_hub.constants as c

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def online(tmp_path, monkeypatch):
    """Online mode against a fake Hub on 127.0.0.1 with a dummy token (never the real Hub)."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_dummy_token_for_tests")
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    with FakeHub(lifetime=60) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def _adapter(seed: int = 0, base: str | None = "org/base") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        mods[name] = AdapterModule(LoRA(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)),
                                   scale=2.0, alpha=8.0)
    return Adapter(modules=mods, base_model=base)


def _peft_folder(tmp_path: Path, name: str = "adapter", **kw) -> Path:
    out = tmp_path / name
    _adapter(**kw).save(out, format="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["task_type"] = "CAUSAL_LM"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


# ---------------------------------------------------------------------------------------------------------
# Hub input: the cache layout huggingface_hub reads, offline
# ---------------------------------------------------------------------------------------------------------


def test_checkpoint_opens_by_repo_id_from_offline_cache(tmp_path, hub_cache):
    local = save(tiny_llama(seed=0), tmp_path / "base")
    populate_hub_cache(hub_cache, "org/base", local)
    ref = Checkpoint.open(local)
    ckpt = Checkpoint.open("org/base")
    assert hub_cache in ckpt.root.resolve().parents or str(ckpt.root).startswith(str(hub_cache))
    assert set(ckpt.keys()) == set(ref.keys()) and len(ref) > 0
    for k in ref.keys():
        assert torch.equal(ckpt.get_tensor(k), ref.get_tensor(k)), k
    assert ckpt.config()["model_type"] == "llama"
    # an explicit @revision resolves through refs/<revision> as well
    assert set(Checkpoint.open("org/base@main").keys()) == set(ref.keys())


def test_offline_cache_revisions_and_subfolder(tmp_path, hub_cache):
    a = save(tiny_llama(seed=0), tmp_path / "a")
    b = save(tiny_llama(seed=1), tmp_path / "b")
    populate_hub_cache(hub_cache, "org/m", a)
    populate_hub_cache(hub_cache, "org/m", b, revision="v2")
    key = "model.layers.0.self_attn.q_proj.weight"
    main = Checkpoint.open("org/m").get_tensor(key)
    v2 = Checkpoint.open("org/m@v2").get_tensor(key)
    assert torch.equal(main, Checkpoint.open(a).get_tensor(key))
    assert torch.equal(v2, Checkpoint.open(b).get_tensor(key))
    assert not torch.equal(main, v2)
    # a repo whose weights live in a sub-folder (diffusers-style component folders)
    nested = tmp_path / "nested"
    (nested / "text_encoder").mkdir(parents=True)
    for f in b.iterdir():
        (nested / "text_encoder" / f.name).write_bytes(f.read_bytes())
    populate_hub_cache(hub_cache, "org/pipe", nested)
    sub = Checkpoint.open("org/pipe", subfolder="text_encoder")
    assert torch.equal(sub.get_tensor(key), v2)


def test_hf_url_subfolder_and_single_file(tmp_path, hub_cache):
    """hf://org/name[@rev]/path selects a sub-folder or one weight file of a repo (every command gets it)."""
    from safetensors.torch import save_file

    repo = tmp_path / "loras"
    (repo / "styles").mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(repo / "one.safetensors"))
    save_file({"b": torch.zeros(3)}, str(repo / "two.safetensors"))
    save_file({"c": torch.full((4,), 2.0)}, str(repo / "styles" / "model.safetensors"))
    populate_hub_cache(hub_cache, "org/loras", repo)
    assert list(Checkpoint.open("hf://org/loras/two.safetensors").keys()) == ["b"]
    assert list(Checkpoint.open("hf://org/loras@main/one.safetensors").keys()) == ["a"]
    assert torch.equal(Checkpoint.open("hf://org/loras/styles").get_tensor("c"), torch.full((4,), 2.0))
    assert list(Checkpoint.open("hf://org/loras", subfolder="styles").keys()) == ["c"]
    with pytest.raises(SurgeryError, match="hf://org/loras/missing.safetensors|org/loras"):
        Checkpoint.open("hf://org/loras/missing.safetensors")


def test_offline_missing_repo_is_one_clear_error(hub_cache):
    with pytest.raises(SurgeryError) as ei:
        Checkpoint.open("org/not-cached")
    msg = str(ei.value)
    assert msg.startswith("org/not-cached:") and "cache" in msg and "\n" not in msg


def test_cli_inspect_by_repo_id_offline(tmp_path, hub_cache):
    populate_hub_cache(hub_cache, "org/adapter", _peft_folder(tmp_path))
    res = CliRunner().invoke(cli, ["inspect", "org/adapter", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["format"] == "peft" and info["num_modules"] == 2 and info["base_model"] == "org/base"


# ---------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------


def test_card_front_matter_and_body(tmp_path):
    folder = _peft_folder(tmp_path)
    info = describe_upload(folder)
    assert (info.kind, info.library_name, info.pipeline_tag, info.base_model) == \
        ("adapter", "peft", "text-generation", "org/base")
    report = Report(title="extract", rows=[{"module": "q_proj", "rank": 4, "rel_error": 0.0123}],
                    totals={"rel_error": 0.0123})
    cmd = "peft-surgery extract org/base org/ft --rank 4 -o 'my out'"
    card = make_model_card(info, repo_id="me/x", command=cmd, report=report)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "org/base" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"peft-surgery", "lora", "base_model:adapter:org/base"} <= set(meta["tags"])
    assert f"```bash\n{cmd}\n```" in card
    assert report.to_markdown() in card
    assert parse_front_matter(card) == meta


def test_card_for_model_and_local_base(tmp_path):
    model = save(tiny_llama(seed=0), tmp_path / "model")
    info = describe_upload(model)
    assert (info.kind, info.library_name, info.pipeline_tag) == ("model", "transformers", "text-generation")
    # a local base path is not a Hub id: it must not become `base_model` in the front matter
    info = CardInfo(base_model=str(tmp_path / "model"), library_name="peft")
    assert "base_model" not in info.front_matter()


@settings(max_examples=30, deadline=None)
@given(base=st.from_regex(r"[A-Za-z0-9][\w.\-]{0,10}/[\w.\-]{1,12}", fullmatch=True),
       tags=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")),
                             min_size=1, max_size=12).filter(lambda s: s.strip() == s), max_size=5))
def test_front_matter_yaml_round_trips(base, tags):
    meta = {"base_model": base, "library_name": "peft", "tags": tags or ["x"]}
    assert yaml.safe_load(front_matter_yaml(meta)) == meta


# ---------------------------------------------------------------------------------------------------------
# Push against the fake Hub
# ---------------------------------------------------------------------------------------------------------


def _arrived(hub: FakeHub, repo: str, folder: Path) -> dict[str, bytes]:
    files = hub.repos[repo]["files"]
    for f in folder.iterdir():
        assert files[f.name] == f.read_bytes(), f.name
    return files


def test_push_folder_files_arrive_with_card(tmp_path, online):
    folder = _peft_folder(tmp_path)
    report = Report(title="extract", rows=[{"module": "q_proj", "rel_error": 0.5}])
    res = push_folder(folder, "me/my-adapter", private=True, commit_message="first", report=report,
                      command="peft-surgery extract org/base org/ft --rank 4 -o adapter")
    assert res.url == f"{online.url}/me/my-adapter" and not res.dry_run
    repo = online.repos["me/my-adapter"]
    assert repo["visibility"] == "private" and repo["commits"][0]["summary"] == "first"
    files = _arrived(online, "me/my-adapter", folder)
    assert set(files) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "org/base" and meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "peft-surgery extract org/base org/ft --rank 4 -o adapter" in card
    assert "| module | rel_error |" in card
    assert set(online.auth_headers) == {"Bearer hf_dummy_token_for_tests"}
    # pushing again updates the existing repo (create_repo exist_ok)
    push_folder(folder, "me/my-adapter", commit_message="second")
    assert [c["summary"] for c in repo["commits"]] == ["first", "second"]


def test_push_lfs_path_without_xet(tmp_path, online, monkeypatch):
    """With hf_xet disabled, weights go through the LFS batch API + PUT, then the commit references them."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    online.lfs_suffixes = (".safetensors",)
    folder = _peft_folder(tmp_path)
    push_folder(folder, "me/lfs", command="x")
    _arrived(online, "me/lfs", folder)
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in online.requests)
    assert len(online.lfs) == 1


def test_push_single_file(tmp_path, online):
    from safetensors.torch import save_file

    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(f))
    push_folder(f, "me/file", kind="adapter", command="peft-surgery convert ...")
    files = online.repos["me/file"]["files"]
    assert files["lora.safetensors"] == f.read_bytes()
    assert parse_front_matter(files["README.md"].decode())["tags"][0] == "peft-surgery"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.README.md", "lora.safetensors"]  # no staging left


def test_cli_push_and_dry_run(tmp_path, online):
    folder = _peft_folder(tmp_path)
    rep = tmp_path / "report.json"
    Report(title="t", rows=[{"module": "m", "rel_error": 0.25}], notes=["n1"]).save_json(str(rep))
    runner = CliRunner()
    res = runner.invoke(cli, ["push", str(folder), "me/dry", "--dry-run", "--report", str(rep),
                              "--command", "peft-surgery extract a b -o adapter"])
    assert res.exit_code == 0, res.output
    assert "would upload 3 file(s)" in res.output and "adapter_model.safetensors" in res.output
    assert online.requests == []  # nothing was sent
    card = (folder / "README.md").read_text()
    assert "| m | 0.25 |" in card and "- n1" in card and "peft-surgery extract a b -o adapter" in card
    # edit the reviewed card, then push for real: the edited card is uploaded as is
    (folder / "README.md").write_text(card.replace("## Error report", "## Error report\n\nReviewed."))
    res = runner.invoke(cli, ["push", str(folder), "me/dry", "--json", "--commit-message", "go"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["url"].endswith("/me/dry") and {f["path"] for f in out["files"]} >= {"README.md"}
    assert b"Reviewed." in online.repos["me/dry"]["files"]["README.md"]


def test_convert_push_to_hub_records_the_command(tmp_path, online, monkeypatch):
    """A writing command with --push-to-hub uploads its output; the card holds the exact (quoted) command."""
    import sys

    src = _peft_folder(tmp_path, "in put")
    out = tmp_path / "out dir"
    argv = ["peft-surgery", "convert", str(src), "--to", "peft", "-o", str(out), "--push-to-hub", "me/conv",
            "--private", "--commit-message", "converted"]
    monkeypatch.setattr(sys, "argv", argv)
    res = CliRunner().invoke(cli, argv[1:])
    assert res.exit_code == 0, res.output
    assert f"pushed to {online.url}/me/conv" in res.output
    repo = online.repos["me/conv"]
    assert repo["visibility"] == "private" and repo["commits"][-1]["summary"] == "converted"
    card = repo["files"]["README.md"].decode()
    import shlex

    assert shlex.join(argv) in card and shlex.split(shlex.join(argv)) == argv
    assert parse_front_matter(card)["library_name"] == "peft"
    assert repo["files"]["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


def test_push_errors_are_one_line_and_send_nothing(tmp_path, online, monkeypatch):
    import huggingface_hub.constants as c

    folder = _peft_folder(tmp_path)
    runner = CliRunner()
    monkeypatch.delenv("HF_TOKEN")
    res = runner.invoke(cli, ["push", str(folder), "me/x"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "HF_TOKEN" in res.output
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    res = runner.invoke(cli, ["push", str(folder), "me/x"])
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.output and res.output.count("\n") == 1
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    res = runner.invoke(cli, ["push", str(folder), "not a repo id"])
    assert res.exit_code == 2 and "not a repo id" in res.output
    res = runner.invoke(cli, ["push", str(tmp_path / "missing"), "me/x"])
    assert res.exit_code == 2 and "missing" in res.output
    assert online.requests == []
    # the server refuses (repo create is unauthorized): one line naming the repo, exit 2
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    online.stop()
    res = runner.invoke(cli, ["push", str(folder), "me/x"])
    assert res.exit_code == 2 and res.output.startswith("Error: me/x: upload failed") and \
        res.output.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# extract by repo id, offline (needs the extract command)
# ---------------------------------------------------------------------------------------------------------


def _low_rank_finetune(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A tiny Llama and a 'fine-tune' whose q_proj/v_proj changed by exact rank-2 updates."""
    base_model = tiny_llama(seed=0)
    base = save(base_model, tmp_path / "base-local")
    ft_model = tiny_llama(seed=0)
    g = torch.Generator().manual_seed(7)
    deltas = {}
    with torch.no_grad():
        for name, mod in ft_model.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                out_f, in_f = mod.weight.shape
                d = 0.05 * torch.randn(out_f, 2, generator=g) @ torch.randn(2, in_f, generator=g)
                mod.weight += d
                deltas[name] = d
    ft = save(ft_model, tmp_path / "ft-local")
    return base, ft, deltas


def test_cli_extract_by_repo_id_offline(tmp_path):
    """`peft-surgery extract org/base org/ft --rank 4` from a populated cache, HF_HUB_OFFLINE=1, no network."""
    pytest.importorskip("peft_surgery.extract")
    import subprocess
    import sys

    from peft_surgery import load_adapter

    base, ft, deltas = _low_rank_finetune(tmp_path)
    cache = tmp_path / "hf" / "hub"
    populate_hub_cache(cache, "org/base", base)
    populate_hub_cache(cache, "org/ft", ft)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # discard port: any request would fail
    env.pop("HF_TOKEN", None)
    exe = Path(sys.executable).with_name("peft-surgery")
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "peft_surgery.cli.main"])]
    res = subprocess.run([*cmd, "extract", "org/base", "org/ft", "--rank", "4", "-o", str(tmp_path / "out"),
                          "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    adapter = load_adapter(tmp_path / "out")
    assert {n for n in adapter.modules} >= set(deltas), sorted(adapter.modules)
    for name, d in deltas.items():
        got = adapter[name].delta_weight()
        # the fine-tune's change is exactly rank 2 <= 4: extraction must reproduce it
        assert torch.allclose(got, d, atol=1e-5 * float(d.abs().max()) + 1e-7), name
    for name in set(adapter.modules) - set(deltas):
        assert float(adapter[name].delta_weight().abs().max()) < 1e-6, name  # unchanged weights: ~zero delta
    # same adapter as extracting from the local folders
    res2 = subprocess.run([*cmd, "extract", str(base), str(ft), "--rank", "4", "-o", str(tmp_path / "out-local"),
                           "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert res2.returncode == 0, res2.stderr
    local = load_adapter(tmp_path / "out-local")
    for name in deltas:
        assert torch.equal(local[name].delta_weight(), adapter[name].delta_weight()), name


def test_subfolder_option_on_every_reading_command(tmp_path, hub_cache):
    """`--subfolder DIR` narrows the input to a sub-folder, for local folders and Hub repo ids alike."""
    import shutil

    from click.testing import CliRunner

    from peft_surgery import load_adapter
    from peft_surgery.cli.common import with_subfolder
    from peft_surgery.cli.main import cli

    from .conftest import FIXTURES

    assert with_subfolder("org/pipe@v2", "unet") == "hf://org/pipe@v2/unet"
    assert with_subfolder("hf://org/pipe/a", "unet") == "hf://org/pipe/a/unet"
    pipe = tmp_path / "pipe"
    shutil.copytree(FIXTURES / "tiny_peft_lora", pipe / "unet")
    populate_hub_cache(hub_cache, "org/pipe-lora", pipe)
    expected = load_adapter(FIXTURES / "tiny_peft_lora")
    for i, src in enumerate([str(pipe), "org/pipe-lora"]):
        r = CliRunner().invoke(cli, ["inspect", src, "--subfolder", "unet", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["ranks"] == expected.ranks()
        out = tmp_path / f"resized{i}"
        r = CliRunner().invoke(cli, ["resize", src, "--subfolder", "unet", "--rank", "2", "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output
        assert set(load_adapter(out).ranks().values()) == {2}
    # without --subfolder the folder reads as a per-component adapter: the same modules under 'unet.'
    r = CliRunner().invoke(cli, ["inspect", str(pipe), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["ranks"] == {f"unet.{k}": v for k, v in expected.ranks().items()}
