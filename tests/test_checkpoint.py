"""Checkpoint reading (files, folders, shards, diffusers components, pickles, Hub ids) and atomic writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peft_surgery.checkpoint import Checkpoint, ShardedWriter, atomic_output, parse_size, save_tensors
from peft_surgery.errors import FormatError, OutputExistsError, SurgeryError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(5, generator=g).to(torch.float16),
        "d.idx": torch.arange(7, dtype=torch.int64),
    }


def _check_same(ckpt: Checkpoint, tensors):
    assert set(ckpt.keys()) == set(tensors)
    for k, t in tensors.items():
        assert ckpt.dtype(k) == t.dtype
        assert ckpt.shape(k) == tuple(t.shape)
        got = ckpt[k]
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_single_file_and_metadata(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "m.safetensors", metadata={"format": "pt", "ss_network_dim": "4"})
    ckpt = Checkpoint.open(tmp_path / "m.safetensors")
    _check_same(ckpt, t)
    assert ckpt.metadata == {"format": "pt", "ss_network_dim": "4"}
    assert ckpt.files == [tmp_path / "m.safetensors"]


def test_sharded_folder_round_trip(tmp_path):
    t = _tensors()
    with atomic_output(tmp_path / "model", is_dir=True) as tmp:
        w = ShardedWriter(tmp, max_shard_size=300)
        for k, v in t.items():
            w.add(k, v)
        names = w.close()
    assert len(names) > 1
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    ckpt = Checkpoint.open(tmp_path / "model")
    _check_same(ckpt, t)
    assert len(ckpt.files) == len(names)


def test_writer_plan_reproduces_base_sharding(tmp_path):
    t = _tensors()
    plan = {"a.weight": "x-1.safetensors", "b.weight": "x-2.safetensors", "c.bias": "x-1.safetensors",
            "d.idx": "x-2.safetensors"}
    with atomic_output(tmp_path / "out", is_dir=True) as tmp:
        w = ShardedWriter(tmp, plan=plan)
        for k in ["b.weight", "a.weight", "d.idx", "c.bias"]:
            w.add(k, t[k])
        w.close()
    ckpt = Checkpoint.open(tmp_path / "out")
    _check_same(ckpt, t)
    assert {k: ckpt.shard_of(k).name for k in t} == plan


def test_writer_plan_missing_tensor_is_error_and_no_output(tmp_path):
    plan = {"a.weight": "x-1.safetensors", "b.weight": "x-1.safetensors"}
    with pytest.raises(SurgeryError, match="never written"):
        with atomic_output(tmp_path / "out", is_dir=True) as tmp:
            w = ShardedWriter(tmp, plan=plan)
            w.add("a.weight", torch.zeros(2))
            w.close()
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_diffusers_component_folders(tmp_path):
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    (tmp_path / "pipe" / "text_encoder").mkdir()
    save_file({"conv_in.weight": torch.ones(2, 2)}, tmp_path / "pipe/unet/diffusion_pytorch_model.safetensors")
    save_file({"text_model.embeddings.x": torch.zeros(3)}, tmp_path / "pipe/text_encoder/model.safetensors")
    ckpt = Checkpoint.open(tmp_path / "pipe")
    assert set(ckpt.keys()) == {"unet.conv_in.weight", "text_encoder.text_model.embeddings.x"}
    assert torch.equal(ckpt["unet.conv_in.weight"], torch.ones(2, 2))
    sub = Checkpoint.open(tmp_path / "pipe", subfolder="unet")
    assert set(sub.keys()) == {"conv_in.weight"}


def test_truncated_file_names_file_and_tensor(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file(_tensors(), p)
    data = p.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-40])
    with pytest.raises(FormatError, match=r"t\.safetensors.*truncated"):
        Checkpoint.open(tmp_path / "t.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(FormatError, match="junk.safetensors"):
        Checkpoint.open(tmp_path / "junk.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all....}")
    with pytest.raises(FormatError, match="corrupt"):
        Checkpoint.open(tmp_path / "garbage.safetensors")


def test_pickle_refused_unless_allowed(tmp_path):
    t = {"w": torch.randn(3, 3)}
    torch.save(t, tmp_path / "adapter_model.bin")
    with pytest.raises(SurgeryError, match="pickle.*--allow-pickle"):
        Checkpoint.open(tmp_path / "adapter_model.bin")
    ckpt = Checkpoint.open(tmp_path / "adapter_model.bin", allow_pickle=True)
    assert torch.equal(ckpt["w"], t["w"])


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(FormatError, match="weights_only"):
        Checkpoint.open(tmp_path / "evil.pt", allow_pickle=True)


def test_missing_path_and_unknown_hub_id(tmp_path, monkeypatch):
    with pytest.raises(SurgeryError, match="no such file"):
        Checkpoint.open(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SurgeryError, match="not found on the Hugging Face Hub or in the local cache"):
        Checkpoint.open("some-org/does-not-exist")


def test_atomic_output_rules(tmp_path):
    src = tmp_path / "in.safetensors"
    save_tensors({"x": torch.zeros(1)}, src)
    with pytest.raises(OutputExistsError, match="overwrite or be written inside the input"):
        with atomic_output(src, is_dir=False, inputs=[src], overwrite=True):
            pass
    (tmp_path / "in_dir").mkdir()
    with pytest.raises(OutputExistsError):
        with atomic_output(tmp_path / "in_dir" / "sub", is_dir=True, inputs=[tmp_path / "in_dir"]):
            pass
    out = tmp_path / "out.safetensors"
    out.write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        with atomic_output(out, is_dir=False):
            pass
    with atomic_output(out, is_dir=False, overwrite=True) as tmp:
        save_tensors({"y": torch.ones(2)}, tmp)
    assert torch.equal(Checkpoint.open(out)["y"], torch.ones(2))
    # An error inside leaves neither the output nor temporaries behind.
    with pytest.raises(RuntimeError):
        with atomic_output(tmp_path / "new", is_dir=True) as tmp:
            (tmp / "f").write_text("partial")
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parse_size():
    assert parse_size("50MB") == 50_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(SurgeryError):
        parse_size("lots")


def test_index_with_missing_shard(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.zeros(1)}, d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(SurgeryError, match="00002-of-00002.safetensors' listed in the index is missing"):
        Checkpoint.open(d)
    assert Path(d).exists()
