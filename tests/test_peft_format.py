"""PEFT format: bit-exact round trips (corpus and hypothesis), PEFT's pattern semantics, config handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_surgery import Adapter, AdapterModule, Layout, LoHa, LoKr, LoRA, load_adapter, save_adapter
from peft_surgery.checkpoint import Checkpoint
from peft_surgery.errors import FormatError
from peft_surgery.formats.peft import pattern_key, resolve_rank_alpha

from .conftest import corpus_path

PEFT_CORPUS = ["peft_gemma3_270m", "peft_opt125m", "peft_bert_multitask", "sd15_peft_unet_adapter_plus_diffusers"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_same_files(src, dst):
    a, b = Checkpoint.open(src), Checkpoint.open(dst)
    assert set(a.keys()) == set(b.keys())
    for k in a.keys():
        ta, tb = a[k], b[k]
        assert ta.dtype == tb.dtype, k
        assert ta.shape == tb.shape, k
        assert torch.equal(ta.view(torch.uint8) if ta.dtype == torch.bfloat16 else ta,
                           tb.view(torch.uint8) if tb.dtype == torch.bfloat16 else tb), k


@pytest.mark.parametrize("name", PEFT_CORPUS)
def test_corpus_round_trip_bit_exact(name, tmp_path):
    src = corpus_path(name)
    adapter = load_adapter(src)
    save_adapter(adapter, tmp_path / "out")
    _assert_same_files(src / "adapter_model.safetensors", tmp_path / "out" / "adapter_model.safetensors")
    assert json.loads((src / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "out" / "adapter_config.json").read_text())


def test_corpus_expected_scales():
    expect = {"peft_gemma3_270m": (4, 1.0), "peft_opt125m": (16, 2.0), "peft_bert_multitask": (8, 4.0),
              "sd15_peft_unet_adapter_plus_diffusers": (4, 4.0)}
    for name, (r, s) in expect.items():
        a = load_adapter(corpus_path(name))
        assert set(a.ranks().values()) == {r}
        assert set(a.scales().values()) == {s}
    bert = load_adapter(corpus_path("peft_bert_multitask"))
    assert set(bert.modules_to_save) == {"classifier.weight", "classifier.bias"}
    opt = load_adapter(corpus_path("peft_opt125m"))
    assert opt.dtypes() == {"bfloat16": 48}


# ---------------------------------------------------------------------------------------------------------
# Pattern semantics against peft's own implementation
# ---------------------------------------------------------------------------------------------------------

NAME_PARTS = ["model", "layers", "0", "1", "12", "self_attn", "q_proj", "v_proj", "mlp", "down_proj", "foo", "foobar"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=5),
       st.lists(st.sampled_from(["q_proj", "v_proj", "foo", "^foo", "layers.0.self_attn.q_proj", "layers\\.1.*",
                                 "mlp.down_proj", "proj"]), min_size=0, max_size=4, unique=True))
def test_pattern_key_matches_peft(parts, keys):
    from peft.utils.other import get_pattern_key

    module = ".".join(parts)
    patterns = {k: i + 1 for i, k in enumerate(keys)}
    theirs = get_pattern_key(list(patterns), module)
    # peft returns the module name itself when no key matches; we return None.
    expected = theirs if any(__import__("re").match(rf"(.*\.)?({k})$", module) for k in patterns) else None
    assert pattern_key(patterns, module) == expected


def test_resolve_rank_alpha_independent_patterns():
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"layers.0.self_attn.q_proj": 2}}
    assert resolve_rank_alpha(cfg, "model.layers.0.self_attn.q_proj") == (4, 2.0)
    assert resolve_rank_alpha(cfg, "model.layers.1.self_attn.q_proj") == (4, 16.0)
    assert resolve_rank_alpha(cfg, "model.layers.1.self_attn.v_proj") == (8, 16.0)


# ---------------------------------------------------------------------------------------------------------
# Hypothesis: random adapters survive write → read → write bit for bit, with scales preserved
# ---------------------------------------------------------------------------------------------------------


@st.composite
def random_module(draw, kind):
    dtype = draw(st.sampled_from(DTYPES))
    r = draw(st.integers(1, 6))
    out_f, in_f = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    alpha = draw(st.sampled_from([1.0, 2.0, 8.0, 16.0, 3.0, 0.5]))
    if kind == "lora":
        layout_kind = draw(st.sampled_from(["linear", "linear_fifo", "conv", "embedding"]))
        rslora = draw(st.booleans())
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if layout_kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            delta = LoRA(rnd(r, in_f, k, k), rnd(out_f, r, 1, 1))
            layout = Layout("conv", False, (out_f, in_f, k, k))
        elif layout_kind == "embedding":
            delta = LoRA(rnd(r, in_f), rnd(out_f, r))
            layout = Layout("embedding", False, (in_f, out_f))
        else:
            delta = LoRA(rnd(r, in_f), rnd(out_f, r))
            fifo = layout_kind == "linear_fifo"
            layout = Layout("linear", fifo, (in_f, out_f) if fifo else (out_f, in_f))
        mag = rnd(out_f).abs() + 0.1 if draw(st.booleans()) and layout_kind != "conv" else None
        return AdapterModule(delta, scale, layout, magnitude=mag, alpha=alpha, rslora=rslora), layout_kind
    if kind == "loha":
        d = LoHa(rnd(out_f, r), rnd(r, in_f), rnd(out_f, r), rnd(r, in_f))
        return AdapterModule(d, alpha / r, Layout("linear", False, (out_f, in_f)), alpha=alpha), "linear"
    # lokr with factored w2 (PEFT's default layout for small r)
    f1o, f1i = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    d = LoKr(w1=rnd(f1o, f1i), w2a=rnd(out_f, r), w2b=rnd(r, in_f))
    return AdapterModule(d, alpha / r, Layout("linear", False, None), alpha=alpha), "linear"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["lora", "loha", "lokr"]), st.data())
def test_random_adapter_round_trip(tmp_path_factory, kind, data):
    n = data.draw(st.integers(1, 4))
    modules = {}
    layouts = set()
    for i in range(n):
        m, lk = data.draw(random_module(kind))
        modules[f"model.layers.{i}.block.proj{i}"] = m
        layouts.add(lk)
    if kind == "lora":
        # one adapter can't mix fan_in_fan_out with plain linear, nor rsLoRA with plain scaling
        fifo = "linear_fifo" in layouts
        rs = next(iter(modules.values())).rslora
        for name, m in list(modules.items()):
            lay = m.layout
            if lay.kind == "linear" and lay.fan_in_fan_out != fifo:
                w = lay.weight_shape
                lay = Layout("linear", fifo, w[::-1])
            scale = m.alpha / math.sqrt(m.rank) if rs else m.alpha / m.rank
            modules[name] = m.replace(layout=lay, rslora=rs, scale=scale)
    adapter = Adapter(modules=modules, base_model="org/base")
    d = tmp_path_factory.mktemp("rt")
    save_adapter(adapter, d / "a")
    back = load_adapter(d / "a")
    assert set(back.modules) == set(modules)
    for name, m in modules.items():
        b = back[name]
        assert b.kind == m.kind
        assert math.isclose(b.scale, m.scale, rel_tol=1e-12)
        for (fn, t1), (_, t2) in zip(m.tensors(), b.tensors()):
            assert t1.dtype == t2.dtype and torch.equal(t1, t2), (name, fn)
        if m.magnitude is None:
            torch.testing.assert_close(b.delta_weight(), m.delta_weight(), rtol=0, atol=0)
    # Writing what we read gives the same bytes again.
    save_adapter(back, d / "b")
    _assert_same_files(d / "a" / "adapter_model.safetensors", d / "b" / "adapter_model.safetensors")
    assert (d / "a" / "adapter_config.json").read_text() == (d / "b" / "adapter_config.json").read_text()


def test_unknown_config_fields_are_kept(tmp_path):
    src = corpus_path("peft_gemma3_270m")
    cfg = json.loads((src / "adapter_config.json").read_text())
    a = load_adapter(src)
    # Change one module's scale: the writer must regenerate r/alpha but keep every unknown field.
    name = next(iter(a.modules))
    a.modules[name] = a.modules[name].replace(scale=a.modules[name].scale * 2)
    save_adapter(a, tmp_path / "o")
    out = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    for k in cfg:
        assert k in out, k
    back = load_adapter(tmp_path / "o")
    assert back[name].scale == a[name].scale
    assert back.scales() == a.scales()


def test_unknown_peft_type(tmp_path):
    src = corpus_path("peft_opt125m")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="unsupported peft_type 'IA3'"):
        load_adapter(d)


def test_rank_mismatch_between_config_and_tensors(tmp_path):
    src = corpus_path("peft_opt125m")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["r"] = 8
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="rank 8 but lora_A has 16"):
        load_adapter(d)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.sampled_from([None, 1, 3]),
       st.floats(-4, 4).filter(lambda x: abs(x) > 1e-3), st.integers(0, 2**16))
def test_delta_norm_from_factors_equals_dense(r, out_f, in_f, kernel, scale, seed):
    g = torch.Generator().manual_seed(seed)
    if kernel:
        m = AdapterModule(LoRA(torch.randn(r, in_f, kernel, kernel, generator=g),
                               torch.randn(out_f, r, 1, 1, generator=g)), scale,
                          Layout("conv", False, (out_f, in_f, kernel, kernel)))
    else:
        m = AdapterModule(LoRA(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)), scale)
    dense = float(torch.linalg.vector_norm(m.delta_weight().double()))
    assert math.isclose(m.delta_norm(), dense, rel_tol=1e-5, abs_tol=1e-9)
