"""SD adapter formats: diffusers (3 generations), kohya sd-scripts, LyCORIS; name tables and resolution.

Round trips are checked on ΔW (fp32, max relative error ≤ 1e-6) for every module, on random adapters whose
module names are real SD1.5 / SDXL names from the built-in tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from peft_surgery.adapter import Adapter, AdapterModule, FullDiff, Layout, LoHa, LoKr, LoRA
from peft_surgery.checkpoint import Checkpoint
from peft_surgery.errors import FormatError
from peft_surgery.formats import detect_format, load_adapter, save_adapter
from peft_surgery.formats.arch import builtin_tables, flatten, resolve_flat_names
from peft_surgery.formats.kohya import lokr_factorization, parse_kohya_module

TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def strip(name: str) -> str:
    return name.split(".", 1)[1]


def lookup(adapter: Adapter, name: str) -> AdapterModule:
    """Module by canonical name; PEFT output drops the component prefix."""
    return adapter.modules[name] if name in adapter.modules else adapter.modules[strip(name)]


def _identical(m: AdapterModule, o: AdapterModule) -> bool:
    """Same delta type, bit-identical tensors, same scale and same kernel shape: ΔW equal without computing it."""
    if m.kind != o.kind or not math.isclose(m.scale, o.scale, rel_tol=1e-12, abs_tol=0.0):
        return False
    if m.bias is not None and not (o.bias is not None and m.bias_scaled == o.bias_scaled):
        return False
    a, b = dict(m.tensors()), dict(o.tensors())
    if set(a) != set(b) or not all(torch.equal(a[k].reshape(-1), b[k].reshape(-1)) for k in a):
        return False
    ma, mb = m.layout.math_shape(), o.layout.math_shape()
    return ma is None or mb is None or math.prod(ma) == math.prod(mb)


def assert_same_delta(src: Adapter, dst: Adapter, *, seed: int = 0, dense: int | None = None) -> None:
    """ΔW of every module equal (rel ≤ 1e-6). With ``dense=N`` (large real files) modules whose tensors and
    scale are bit-identical count as equal and only the first N modules are also compared densely."""
    assert len(src.modules) == len(dst.modules)
    g = torch.Generator().manual_seed(seed)
    for i, (name, m) in enumerate(src.modules.items()):
        other = lookup(dst, name)
        if dense is not None and i >= dense and _identical(m, other):
            continue
        shape = m.layout.weight_shape or other.layout.weight_shape
        if m.is_dora:
            if m.magnitude_axis == "in":
                assert other.magnitude_axis == "in", name
            base = torch.randn(*shape, generator=g, dtype=torch.float64).float()
            a, b = m.delta_weight(base), other.delta_weight(base)
        else:
            a, b = m.delta_math(), other.delta_math()
        assert rel_err(b.reshape(a.shape), a) <= TOL, name
        if m.bias is not None:
            assert rel_err(other.bias_delta(), m.bias_delta()) <= TOL, name


# --------------------------------------------------------------------------------------------------------
# Architecture tables and resolution
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_unet_tables_match_diffusers_model(arch):
    """The generated tables list exactly the Linear/Conv2d modules (and shapes) of diffusers' UNet."""
    from diffusers import UNet2DConditionModel

    from peft_surgery.formats.arch import _table_from_module
    from peft_surgery.formats.arch import sd

    cfg = {k: v for k, v in (sd.SD15_UNET if arch == "sd1" else sd.SDXL_UNET).items() if k != "_class_name"}
    if arch == "sdxl":
        cfg["attention_head_dim"] = [5, 10, 20]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    ref = _table_from_module("unet", unet, "")
    mine = builtin_tables(arch)["unet"]
    assert mine.modules == ref.modules


def test_sgm_aliases_follow_block_structure():
    t = builtin_tables("sdxl")["unet"]
    al = t.aliases
    assert al["input_blocks.4.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert al["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert al["input_blocks.1.0.in_layers.2"] == "down_blocks.0.resnets.0.conv1"
    assert al["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert al["middle_block.1.proj_in"] == "mid_block.attentions.0.proj_in"
    assert al["label_emb.0.0"] == "add_embedding.linear_1"
    # SD1.x LDM naming: an up level without attention puts its upsampler at index 1
    sd1 = builtin_tables("sd1")["unet"].aliases
    assert sd1["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert len(set(al.values())) == len(al)  # the alias map is one-to-one


def test_resolver_forward_only_and_ambiguity():
    cands = ["down_blocks.0.attentions.0.proj_in", "mid_block.resnets.0.conv1"]
    res = resolve_flat_names(["down_blocks_0_attentions_0_proj_in", "nope_x"], cands)
    assert res.mapping == {"down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in"}
    assert res.unresolved == ["nope_x"]
    with pytest.raises(FormatError, match="matches several modules"):
        resolve_flat_names(["a_b_c"], ["a.b_c", "a_b.c"])


# --------------------------------------------------------------------------------------------------------
# Random adapters with real SD names
# --------------------------------------------------------------------------------------------------------

OUT, IN, R = 6, 4, 2


def _pick_names(arch: str, n: int, seed: int, *, kinds: tuple[str, ...] = ("linear", "conv")) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for comp, table in builtin_tables(arch).items():
        names = [k for k, v in table.modules.items() if v.kind in kinds]
        idx = torch.randperm(len(names), generator=g)[:n].tolist()
        out += [f"{comp}.{names[i]}" for i in idx]
    return out


def _module(kind: str, info, g: torch.Generator, *, alpha: float | None, dora: str | None, bias: bool
            ) -> AdapterModule:
    conv = info.kind == "conv"
    k = info.kernel if conv else ()
    kk = math.prod(k) if conv else 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    if kind == "lora":
        mid = None
        if conv and k != (1, 1) and dora is None and bool(torch.randint(0, 2, (1,), generator=g)):
            mid = rnd(R, R, *k)
            down = rnd(R, IN, 1, 1)
        else:
            down = rnd(R, IN, *k)
        delta = LoRA(down, rnd(OUT, R, *([1] * len(k))), mid)
    elif kind == "loha":
        if conv and k != (1, 1) and bool(torch.randint(0, 2, (1,), generator=g)):
            delta = LoHa(rnd(R, OUT), rnd(R, IN), rnd(R, OUT), rnd(R, IN), rnd(R, R, *k), rnd(R, R, *k))
        else:
            delta = LoHa(rnd(OUT, R), rnd(R, IN * kk), rnd(OUT, R), rnd(R, IN * kk))
    elif kind == "lokr":
        variant = int(torch.randint(0, 3, (1,), generator=g))
        if variant == 0:  # both full (LyCORIS scale 1)
            delta = LoKr(w1=rnd(2, 2), w2=rnd(3, 2 * kk))
        elif variant == 1:
            delta = LoKr(w1=rnd(2, 2), w2a=rnd(3, R), w2b=rnd(R, 2 * kk))
        else:
            delta = LoKr(w1a=rnd(2, 1), w1b=rnd(1, 2), w2a=rnd(3, R), w2b=rnd(R, 2 * kk))
    else:
        delta = FullDiff(rnd(OUT, IN, *k))
    shape = (OUT, IN, *k)
    layout = Layout("conv" if conv else "linear", False, shape)
    rank = delta.rank
    full = kind == "full" or (kind == "lokr" and rank == 0)
    scale = 1.0 if (full or alpha is None) else alpha / rank
    mag = None
    if dora is not None:
        mag = torch.rand(OUT if dora == "out" else IN, generator=g) + 0.5
    b = rnd(OUT) if bias else None
    return AdapterModule(delta, scale=scale, layout=layout, magnitude=mag, bias=b,
                         alpha=None if (full or alpha is None) else alpha, bias_scaled=kind != "full",
                         magnitude_axis=dora or "out")


def random_adapter(arch: str, kinds: list[str], seed: int, *, n: int = 3, dora: bool = False, bias: bool = False,
                   alphas: bool = True) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tables = builtin_tables(arch)
    mods = {}
    for i, name in enumerate(_pick_names(arch, n, seed)):
        comp, rest = name.split(".", 1)
        info = tables[comp].modules[rest]
        kind = kinds[i % len(kinds)]
        alpha = float(torch.randint(1, 9, (1,), generator=g)) if alphas and i % 4 else None
        d = None
        if dora and kind == "lora" and i % 2 == 0:
            d = "out" if i % 4 == 0 else "in"
        mods[name] = _module(kind, info, g, alpha=alpha, dora=d, bias=bias and kind in ("lora", "full"))
    return Adapter(modules=mods, source_format="kohya")


SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(arch=st.sampled_from(["sd1", "sdxl"]), seed=st.integers(0, 10_000),
       kinds=st.lists(st.sampled_from(["lora", "loha", "lokr", "full"]), min_size=1, max_size=4),
       fmt=st.sampled_from(["kohya", "lycoris"]), dora=st.booleans(), bias=st.booleans())
def test_kohya_lycoris_round_trip(tmp_path_factory, arch, seed, kinds, fmt, dora, bias):
    ad = random_adapter(arch, kinds, seed, dora=dora, bias=bias)
    out = tmp_path_factory.mktemp("k") / "lora.safetensors"
    save_adapter(ad, out, format=fmt)
    back = load_adapter(out)
    assert back.source_format == "kohya"
    assert set(back.modules) == set(ad.modules)
    assert_same_delta(ad, back, seed=seed)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    if arch == "sdxl":  # kohya names SDXL UNet modules in SGM naming
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_unet_mid_block"))
                       for k in unet_keys)
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_te2_") for k in keys)
    if fmt == "lycoris":
        assert meta["ss_network_module"] == "lycoris.kohya"


@SETTINGS
@given(arch=st.sampled_from(["sd1", "sdxl"]), seed=st.integers(0, 10_000), dora=st.booleans(),
       bias=st.booleans(), alphas=st.booleans(), fold=st.booleans())
def test_diffusers_round_trip_lora(tmp_path_factory, arch, seed, dora, bias, alphas, fold):
    ad = random_adapter(arch, ["lora"], seed, dora=False, bias=bias, alphas=alphas)
    if dora:  # diffusers/PEFT DoRA is per output row only
        g = torch.Generator().manual_seed(seed)
        ad.modules = {k: m.replace(magnitude=torch.rand(OUT, generator=g) + 0.5) for k, m in ad.modules.items()}
    out = tmp_path_factory.mktemp("d") / "pytorch_lora_weights.safetensors"
    save_adapter(ad, out, format="diffusers", fold_scale=fold)
    back = load_adapter(out)
    assert back.source_format == "diffusers"
    assert_same_delta(ad, back, seed=seed)
    if not fold:  # per-module alphas live in lora_adapter_metadata, factors are untouched
        for name, m in ad.modules.items():
            if m.delta.mid is None:
                assert torch.equal(back.modules[name].delta.up, m.delta.up)


@SETTINGS
@given(arch=st.sampled_from(["sd1", "sdxl"]), seed=st.integers(0, 10_000),
       kind=st.sampled_from(["lora", "loha", "lokr"]), via=st.sampled_from(["kohya", "diffusers", "none"]))
def test_peft_round_trip_through_other_formats(tmp_path_factory, arch, seed, kind, via):
    """canonical → (kohya | diffusers) → PEFT (one folder per component) → canonical, exact."""
    if via == "diffusers" and kind != "lora":
        kind = "lora"
    ad = random_adapter(arch, [kind], seed)
    if kind == "lora":  # PEFT LoRA has no Tucker core
        ad.modules = {k: m for k, m in ad.modules.items() if m.delta.mid is None}
    d = tmp_path_factory.mktemp("p")
    src = ad
    if via != "none":
        save_adapter(ad, d / "mid.safetensors", format=via)
        src = load_adapter(d / "mid.safetensors")
    notes = save_adapter(src, d / "peft", format="peft")
    comps = {n.split(".", 1)[0] for n in ad.modules}
    if len(comps) > 1:
        assert any("one PEFT adapter per component" in n for n in notes)
        assert sorted(p.name for p in (d / "peft").iterdir()) == sorted(comps)
    back = load_adapter(d / "peft")
    assert_same_delta(ad, back, seed=seed)


def test_rslora_and_per_module_alpha_survive_kohya(tmp_path):
    """PEFT rsLoRA (alpha/√r) → kohya (alpha tensor = scale·r, rs_lora flag) → PEFT keeps use_rslora."""
    ad = random_adapter("sd1", ["lora"], 3, n=4)
    mods = {}
    for i, (k, m) in enumerate(ad.modules.items()):
        if m.delta.mid is None:
            a = float(i + 3)
            mods[k] = m.replace(rslora=True, alpha=a, scale=a / math.sqrt(m.rank))
    ad.modules = mods
    save_adapter(ad, tmp_path / "rs.safetensors", format="kohya")
    meta = Checkpoint.open(tmp_path / "rs.safetensors").metadata
    assert json.loads(meta["ss_network_args"])["rs_lora"] == "True"
    back = load_adapter(tmp_path / "rs.safetensors")
    assert_same_delta(ad, back)
    assert all(m.rslora for m in back.modules.values())
    save_adapter(back, tmp_path / "peft", format="peft")
    for comp in {n.split(".")[0] for n in ad.modules}:
        folder = tmp_path / "peft" / comp if len({n.split(".")[0] for n in ad.modules}) > 1 else tmp_path / "peft"
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["use_rslora"] is True
    assert_same_delta(ad, load_adapter(tmp_path / "peft"))


# --------------------------------------------------------------------------------------------------------
# Scale semantics of single modules
# --------------------------------------------------------------------------------------------------------


def test_scale_semantics():
    t = {"lora_down.weight": torch.ones(4, 3), "lora_up.weight": torch.ones(5, 4)}
    assert parse_kohya_module(t).scale == 1.0  # missing alpha → 1
    assert parse_kohya_module({**t, "alpha": torch.tensor(2.0, dtype=torch.float16)}).scale == 0.5
    full = {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(3, 3), "alpha": torch.tensor(7.0)}
    assert parse_kohya_module(full).scale == 1.0  # LyCORIS full LoKr ignores alpha
    low = {"lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(3, 2), "lokr_w2_b": torch.ones(2, 3),
           "alpha": torch.tensor(1.0)}
    assert parse_kohya_module(low).scale == 0.5
    # dora_scale orientation comes from which axis is 1
    d_out = parse_kohya_module({**t, "dora_scale": torch.ones(5, 1)})
    d_in = parse_kohya_module({**t, "dora_scale": torch.ones(1, 3)})
    assert (d_out.magnitude_axis, d_in.magnitude_axis) == ("out", "in")
    with pytest.raises(FormatError, match="lora_down without lora_up"):
        parse_kohya_module({"lora_down.weight": torch.ones(4, 3)}, name="lora_unet_x")


def test_full_lokr_written_to_kohya_folds_scale(tmp_path):
    """A PEFT full LoKr with alpha/r ≠ 1 cannot keep its scale in LyCORIS (scale 1): folded into w2, noted."""
    m = AdapterModule(LoKr(w1=torch.randn(2, 2), w2=torch.randn(3, 2)), scale=0.25, layout=Layout("linear"),
                      alpha=1.0)
    ad = Adapter({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": m})
    notes = save_adapter(ad, tmp_path / "x.safetensors", format="kohya")
    assert any("folded scale 0.25 into lokr_w2" in n for n in notes)
    back = load_adapter(tmp_path / "x.safetensors", arch="sd1")
    assert_same_delta(ad, back)


def test_lokr_factorization_mirrors_peft():
    from peft.tuners.lokr.layer import factorization

    for dim in range(1, 300):
        for f in (-1, 1, 2, 3, 4, 8, 16):
            assert lokr_factorization(dim, f) == factorization(dim, f)


# --------------------------------------------------------------------------------------------------------
# Names: unresolved, skip, --base
# --------------------------------------------------------------------------------------------------------


def _kohya_file(path: Path, names: list[str]) -> Path:
    sd = {}
    for n in names:
        sd[f"{n}.lora_down.weight"] = torch.randn(2, 4)
        sd[f"{n}.lora_up.weight"] = torch.randn(6, 2)
        sd[f"{n}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))
    return path


def test_unresolved_names_error_or_skip(tmp_path):
    good = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    p = _kohya_file(tmp_path / "x.safetensors", [good, "lora_unet_made_up_block_proj"])
    with pytest.raises(FormatError, match="lora_unet_made_up_block_proj"):
        load_adapter(p)
    ad = load_adapter(p, skip_unresolved=True)
    assert list(ad.modules) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert any("dropped 1 unresolved" in n for n in ad.config["_notes"])


def test_base_checkpoint_resolves_custom_model(tmp_path):
    """--base: any checkpoint's keys are candidates (here a model that no built-in table knows)."""
    save_file({"blocks.0.attn_proj.weight": torch.zeros(6, 4), "blocks.0.attn.proj.weight": torch.zeros(6, 4)},
              str(tmp_path / "base.safetensors"))
    p = _kohya_file(tmp_path / "x.safetensors", ["lora_unet_blocks_0_attn_proj"])
    with pytest.raises(FormatError, match="matches several modules"):
        load_adapter(p, base=str(tmp_path / "base.safetensors"))
    save_file({"blocks.0.attn.proj.weight": torch.zeros(6, 4)}, str(tmp_path / "base2.safetensors"))
    ad = load_adapter(p, base=str(tmp_path / "base2.safetensors"))
    assert list(ad.modules) == ["unet.blocks.0.attn.proj"]


# --------------------------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------------------------


def test_corpus_peft_and_diffusers_pair_convert_exactly(corpus, tmp_path):
    root = corpus("sd15_peft_unet_adapter_plus_diffusers")
    peft_ad = load_adapter(root)
    diff_ad = load_adapter(root / "pytorch_lora_weights.safetensors")
    assert detect_format(Checkpoint.open(root / "pytorch_lora_weights.safetensors")).format == "diffusers"
    assert {m.scale for m in diff_ad.modules.values()} == {4.0}  # alpha 16 / r 4 from lora_adapter_metadata
    # diffusers → PEFT gives the PEFT adapter's tensors bit for bit
    save_adapter(diff_ad, tmp_path / "peft", format="peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(root / "adapter_model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert_same_delta(peft_ad, load_adapter(tmp_path / "peft"), dense=8)
    # PEFT → diffusers gives the diffusers file's tensors (under the unet. prefix) and the same scales
    save_adapter(peft_ad, tmp_path / "d.safetensors", format="diffusers")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as a, \
            safe_open(str(root / "pytorch_lora_weights.safetensors"), "pt") as b:
        assert {strip(k) for k in a.keys()} == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(strip(k))) for k in a.keys())
        meta = json.loads(a.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 16 and meta["unet.r"] == 4
    assert_same_delta(diff_ad, load_adapter(tmp_path / "d.safetensors"), dense=8)


@pytest.mark.parametrize("entry,variant", [("sd15_diffusers_unet_loradown", "0.2x"), ("sd15_catundchat", "legacy")])
def test_corpus_old_diffusers_formats_convert(corpus, tmp_path, entry, variant):
    path = corpus(entry)
    ad = load_adapter(path)
    assert ad.config["_variants"] == [variant]
    assert {m.scale for m in ad.modules.values()} == {1.0}  # no alpha → scale 1
    unet = builtin_tables("sd1")["unet"].modules
    assert all(n.startswith("unet.") and strip(n) in unet for n in ad.modules)
    assert sum(n.endswith("to_out.0") for n in ad.modules) == 32  # to_out_lora → to_out.0
    with safe_open(str(next(Path(path).glob("*.safetensors"))), "pt") as f:
        k = next(k for k in f.keys() if "to_out" in k and "down" in k)
        raw = f.get_tensor(k)
    name = next(n for n in ad.modules if n.endswith("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"))
    assert torch.equal(ad.modules[name].delta.down, raw) or "attn1" not in k
    for fmt, out in (("kohya", "k.safetensors"), ("diffusers", "d.safetensors"), ("peft", "p")):
        save_adapter(ad, tmp_path / out, format=fmt)
        assert_same_delta(ad, load_adapter(tmp_path / out), dense=6)


def test_corpus_lycoris_lokr_to_peft_lokr(corpus, tmp_path):
    src = corpus("lycoris_lokr_sd15_smart_falcon") / "smart_falcon_4_lokr.safetensors"
    ad = load_adapter(src)
    assert ad.module_types() == {"lokr": 350}
    assert sum(n.startswith("unet.") for n in ad.modules) == 278
    assert ad.modules["unet.down_blocks.1.resnets.0.conv1"].layout.weight_shape == (640, 320, 3, 3)
    # alpha 4 with rank 4 (both factors low rank) → scale 1
    assert {m.scale for m in ad.modules.values()} == {1.0}
    notes = save_adapter(ad, tmp_path / "peft", format="peft")
    assert any("per component" in n for n in notes)
    cfg = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LOKR" and "down_blocks.1.resnets.0.conv1" in cfg["target_modules"]
    te_cfg = json.loads((tmp_path / "peft" / "text_encoder" / "adapter_config.json").read_text())
    assert "text_model.encoder.layers.0.mlp.fc1" in te_cfg["target_modules"]
    back = load_adapter(tmp_path / "peft")
    assert_same_delta(ad, back, dense=6)
    # and the factor-shape limitation of PEFT's LoKr is reported, not hidden
    assert any("PEFT's LoKr layer cannot create" in n for n in ad.config["_notes"])
    # kohya → kohya is exact too
    save_adapter(ad, tmp_path / "k.safetensors", format="lycoris")
    assert_same_delta(ad, load_adapter(tmp_path / "k.safetensors"), dense=6)


def test_corpus_lycoris_lokr_to_lora_with_report(corpus):
    types = pytest.importorskip("peft_surgery.surgery.types")
    from peft_surgery.convert import ConvertReport

    ad = load_adapter(corpus("lycoris_lokr_sd15_smart_falcon") / "smart_falcon_4_lokr.safetensors")
    small = ad.copy(modules={k: ad.modules[k] for k in list(ad.modules)[:6]})
    report = ConvertReport()
    lora = types.convert_type(small, "lora", rank=8, report=report)
    assert len(report.rows) == 6 and {m.kind for m in lora.modules.values()} == {"lora"}
    for row in report.rows:
        a, b = small.modules[row["module"]].delta_math(), lora.modules[row["module"]].delta_math().reshape(-1)
        err = float(torch.linalg.vector_norm(a.reshape(-1) - b) / torch.linalg.vector_norm(a))
        assert abs(err - row["rel_error"]) <= 1e-4 + 1e-3 * err


def test_corpus_custom_vit_fails_precisely(corpus, tmp_path):
    from peft_surgery.cli.main import cli as main

    src = corpus("custom_lora_vit") / "lora.safetensors"
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", str(src), "--to", "peft", "-o", str(out)])
    assert res.exit_code == 2
    msg = res.output.strip()
    assert len(msg.splitlines()) == 1 and "lora.safetensors" in msg and "incomplete LoRA" in msg
    assert "w_a_000" in msg and "B (up)" in msg
    assert not out.exists() and not list(tmp_path.iterdir())
    res = CliRunner().invoke(main, ["inspect", str(src)])
    assert res.exit_code == 2 and "incomplete LoRA" in res.output


def test_cli_convert_and_inspect_kohya(corpus, tmp_path):
    from peft_surgery.cli.main import cli as main

    src = corpus("lycoris_lokr_sd15_smart_falcon") / "smart_falcon_4_lokr.safetensors"
    res = CliRunner().invoke(main, ["inspect", str(src)])
    assert res.exit_code == 0, res.output
    assert "format:      kohya" in res.output and "lokr ×350" in res.output
    res = CliRunner().invoke(main, ["convert", str(src), "--to", "peft", "-o", str(tmp_path / "o"), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["source_format"] == "kohya" and rep["num_modules"] == 350
    assert any("resolved against built-in sd1" in n for n in rep["notes"])


def test_llm_adapter_to_kohya_with_llm_base_is_refused(tmp_path):
    """kohya/diffusers naming is for diffusion components: an LLM base must not be treated as a UNet."""
    from click.testing import CliRunner

    from peft_surgery.cli.main import cli

    from .conftest import FIXTURES
    from .models import save, tiny_llama

    save(tiny_llama(seed=0), tmp_path / "base")
    out = tmp_path / "k.safetensors"
    r = CliRunner().invoke(cli, ["convert", str(FIXTURES / "tiny_peft_lora"), "--to", "kohya", "--base",
                                 str(tmp_path / "base"), "-o", str(out)])
    assert r.exit_code == 2
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "LlamaForCausalLM is not a diffusion-model component" in line
    assert "config.json" in line
    assert not out.exists()


def test_kohya_hashes_match_sd_scripts_and_are_recomputed_on_write(corpus, tmp_path):
    """sshs_model_hash / sshs_legacy_hash as sd-scripts computes them: reproduced on a real kohya-written file,
    and recomputed (not copied) for the tensors we write."""
    from safetensors import safe_open

    from peft_surgery.formats.kohya import kohya_hashes

    src = corpus("lycoris_lokr_sd15_smart_falcon") / "smart_falcon_4_lokr.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    got = kohya_hashes(tensors, meta)
    assert got["sshs_model_hash"] == meta["sshs_model_hash"]
    assert got["sshs_legacy_hash"] == meta["sshs_legacy_hash"]
    out = tmp_path / "resaved.safetensors"
    adapter = load_adapter(src)
    first = next(iter(adapter.modules))
    adapter.modules[first] = adapter.modules[first].replace(scale=adapter.modules[first].scale * 2)
    save_adapter(adapter, out, format="kohya")
    with safe_open(str(out), "pt") as f:
        meta2 = f.metadata()
        tensors2 = {k: f.get_tensor(k) for k in f.keys()}
    assert meta2["sshs_model_hash"] != meta["sshs_model_hash"]  # the tensors changed, so must the hash
    assert kohya_hashes(tensors2, meta2) == {k: meta2[k] for k in ("sshs_model_hash", "sshs_legacy_hash",
                                                                    "modelspec.hash_sha256")}
