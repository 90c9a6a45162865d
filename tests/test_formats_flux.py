"""Flux layouts (kohya / ComfyUI / xlabs / BFL / ai-toolkit) ↔ canonical diffusers names, fused ↔ split math."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from peft_surgery.adapter import Adapter, AdapterModule, Layout, LoHa, LoKr, LoRA
from peft_surgery.checkpoint import Checkpoint
from peft_surgery.errors import FormatError, SurgeryError
from peft_surgery.formats import detect_format, load_adapter, save_adapter
from peft_surgery.formats import flux as fluxfmt
from peft_surgery.formats.arch import flux as table
from peft_surgery.surgery.fuse import fuse_rows, split_rows, swap_halves

SETTINGS = settings(max_examples=20, deadline=None)
H, MLP = 8, 32  # tiny Flux: hidden 8, MLP 32 (real: 3072 / 12288), real module names
TOP_IN = {"x_embedder": 6, "context_embedder": 10, "time_text_embed.timestep_embedder.linear_1": 5,
          "time_text_embed.text_embedder.linear_1": 7, "time_text_embed.guidance_embedder.linear_1": 5}


def tiny_shape(path: str) -> tuple[int, int]:
    if path in TOP_IN:
        return (H, TOP_IN[path])
    if path == "proj_out":
        return (6, H)
    return table.diffusers_shape(path, table.FluxDims(hidden=H))


ALL_NAMES = sorted(n for n in table.iter_diffusers_names(table.FluxDims(hidden=H, num_double=2, num_single=2)))


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def lora(out, inn, r, scale, g, dtype=torch.float32):
    return AdapterModule(LoRA(torch.randn(r, inn, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype)),
                         scale=scale, layout=Layout("linear", False, (out, inn)))


@st.composite
def flux_adapters(draw, kinds=("lora",), te=True):
    g = torch.Generator().manual_seed(draw(st.integers(0, 100_000)))
    names = draw(st.lists(st.sampled_from(ALL_NAMES), min_size=1, max_size=12, unique=True))
    ranks = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    scales = draw(st.lists(st.sampled_from([1.0, 0.5, 2.0, 0.75, 16.0]), min_size=1, max_size=2))
    kind = draw(st.sampled_from(kinds))
    mods = {}
    for i, n in enumerate(names):
        out, inn = tiny_shape(n)
        r, s = ranks[i % len(ranks)], scales[i % len(scales)]
        if kind == "lora":
            m = lora(out, inn, r, s, g)
        else:
            m = AdapterModule(LoHa(torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g),
                                   torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)),
                              scale=s, layout=Layout("linear", False, (out, inn)))
        mods["transformer." + n] = m
    if te and draw(st.booleans()):
        mods["text_encoder.text_model.encoder.layers.3.self_attn.q_proj"] = lora(12, 12, 2, 0.5, g)
        mods["text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wo"] = lora(12, 20, 2, 1.0, g)
    return Adapter(modules=mods)


def probe(m: AdapterModule, x: torch.Tensor) -> torch.Tensor:
    """ΔW @ x without forming ΔW (LoRA), else densely: cheap at real Flux sizes."""
    d = m.delta
    if isinstance(d, LoRA) and d.mid is None:
        return m.scale * (d.up.double() @ (d.down.double() @ x))
    return m.delta_weight().double() @ x


def assert_same_deltas(a: Adapter, b: Adapter, tol=1e-6, dense: bool = True):
    """Every module's ΔW equal (dense for tiny shapes; on 4 random probe vectors for real sizes)."""
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    g = torch.Generator().manual_seed(0)
    for n in a:
        if dense:
            assert rel_err(b[n].delta_weight(), a[n].delta_weight()) <= tol, n
        else:
            x = torch.randn(a[n].layout.weight_shape[1], 4, generator=g, dtype=torch.float64)
            assert rel_err(probe(b[n], x), probe(a[n], x)) <= tol, n
        if a[n].bias is not None:
            assert rel_err(b[n].bias_delta(), a[n].bias_delta()) <= tol, n


@SETTINGS
@given(adapter=flux_adapters(), style=st.sampled_from(["kohya", "comfy", "diffusers"]))
def test_round_trip_every_style(tmp_path_factory, adapter, style):
    out = tmp_path_factory.mktemp("flux") / "lora.safetensors"
    save_adapter(adapter, out, format=f"flux-{style}")
    fmt = detect_format(Checkpoint.open(out)).format
    # the ai-toolkit/diffusers layout is diffusers' own format: either reader must give the same adapter
    assert fmt == "flux" or (style == "diffusers" and fmt == "diffusers")
    back = load_adapter(out)
    assert_same_deltas(adapter, back)


@SETTINGS
@given(adapter=flux_adapters(kinds=("loha",), te=False), style=st.sampled_from(["kohya", "comfy"]))
def test_loha_round_trip_through_fused_names(tmp_path_factory, adapter, style):
    out = tmp_path_factory.mktemp("flux") / "loha.safetensors"
    save_adapter(adapter, out, format=f"flux-{style}")
    back = load_adapter(out)
    assert_same_deltas(adapter, back)
    assert {m.kind for m in back.modules.values()} == {"loha"}


XLABS_NAMES = [n for n in ALL_NAMES if n.startswith("transformer_blocks.") and ".attn." in n] + \
              [n for n in ALL_NAMES if n.startswith("single_transformer_blocks.") and ".attn.to_" in n] + \
              [n for n in ALL_NAMES if n.startswith("single_transformer_blocks.") and n.endswith("proj_out")]


@SETTINGS
@given(seed=st.integers(0, 10_000), names=st.lists(st.sampled_from(XLABS_NAMES), min_size=1, max_size=8, unique=True),
       scale=st.sampled_from([1.0, 0.5, 4.0]))
def test_xlabs_round_trip(tmp_path_factory, seed, names, scale):
    g = torch.Generator().manual_seed(seed)
    a = Adapter(modules={"transformer." + n: lora(*tiny_shape(n), 3, scale, g) for n in names})
    out = tmp_path_factory.mktemp("x") / "xlabs.safetensors"
    save_adapter(a, out, format="flux-xlabs")
    keys = load_file(str(out)).keys()
    assert all(".processor." in k and k.endswith(("down.weight", "up.weight")) for k in keys)
    assert_same_deltas(a, load_adapter(out))


def test_xlabs_refuses_what_it_cannot_hold(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = Adapter(modules={"transformer.transformer_blocks.0.ff.net.2": lora(H, MLP, 2, 1.0, g)})
    with pytest.raises(SurgeryError, match="xlabs layout only holds"):
        save_adapter(a, tmp_path / "x.safetensors", format="flux-xlabs")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------------------------
# fused ↔ split math
# ------------------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 10_000), r=st.integers(1, 4), present=st.lists(st.booleans(), min_size=4, max_size=4),
       scales=st.lists(st.sampled_from([1.0, 0.5, 3.0]), min_size=4, max_size=4), equal_rank=st.booleans())
def test_fuse_then_split_is_exact(seed, r, present, scales, equal_rank):
    g = torch.Generator().manual_seed(seed)
    sizes = [H, H, H, MLP]
    if not any(present):
        present[0] = True
    parts = [lora(n, H, r if equal_rank else r + j, scales[j], g) if p else None
             for j, (n, p) in enumerate(zip(sizes, present))]
    fused, how = fuse_rows(parts, sizes)
    assert how == "lora-block-diagonal"
    dense = fused.delta_weight()
    rows = torch.split(dense, sizes)
    for p, block in zip(parts, rows):
        if p is None:
            assert not block.any()
        else:
            assert rel_err(block, p.delta_weight()) <= 1e-6
    back, how = split_rows(fused, sizes)
    assert how == ("chunk" if equal_rank and all(present) else "copy-down")
    for p, q in zip(parts, back):
        assert (p is None) == (q is None)
        if p is not None:
            assert rel_err(q.delta_weight(), p.delta_weight()) <= 1e-6


def test_kohya_alpha_after_fusing_keeps_scale():
    """split → fused: alpha = n·r keeps scale α/r (kohya's convert_flux_lora), not the sd-scripts #2204 bug."""
    g = torch.Generator().manual_seed(1)
    parts = [lora(H, H, 4, 1.0, g) for _ in range(3)]
    fused, _ = fuse_rows(parts, [H] * 3)
    from peft_surgery.formats.kohya import kohya_module_tensors

    t, _ = kohya_module_tensors(fused)
    assert t["lora_down.weight"].shape[0] == 12 and float(t["alpha"]) == 12.0


@SETTINGS
@given(seed=st.integers(0, 10_000), dense_b=st.booleans())
def test_split_then_fuse_is_exact_and_rank_preserving(seed, dense_b):
    g = torch.Generator().manual_seed(seed)
    sizes = [H, H, H]
    if dense_b:
        m = lora(3 * H, H, 3, 0.5, g)
    else:
        m, _ = fuse_rows([lora(H, H, 2, 0.5, g) for _ in sizes], sizes)
    parts, how = split_rows(m, sizes)
    assert how == ("copy-down" if dense_b else "chunk")
    fused, how2 = fuse_rows(parts, sizes)
    assert how2 == ("lora-shared-down" if dense_b else "lora-block-diagonal")
    assert fused.rank == m.rank
    assert torch.equal(fused.delta.up, m.delta.up) and torch.equal(fused.delta.down, m.delta.down)


def test_loha_and_lokr_split_rows():
    g = torch.Generator().manual_seed(2)
    loha = AdapterModule(LoHa(torch.randn(24, 2, generator=g), torch.randn(2, 8, generator=g),
                              torch.randn(24, 3, generator=g), torch.randn(3, 8, generator=g)), scale=2.0,
                         layout=Layout("linear", False, (24, 8)))
    lokr = AdapterModule(LoKr(w1=torch.randn(6, 2, generator=g), w2a=torch.randn(4, 2, generator=g),
                              w2b=torch.randn(2, 4, generator=g)), scale=0.5, layout=Layout("linear", False, (24, 8)))
    odd = AdapterModule(LoKr(w1=torch.randn(2, 2, generator=g), w2=torch.randn(12, 4, generator=g)), scale=1.0,
                        layout=Layout("linear", False, (24, 8)))
    for m, want in ((loha, "loha-rows"), (lokr, "lokr-w1-rows"), (odd, "full")):
        parts, how = split_rows(m, [8, 8, 8])
        assert how == want
        dense = m.delta_weight()
        for p, block in zip(parts, torch.split(dense, [8, 8, 8])):
            assert rel_err(p.delta_weight(), block) <= 1e-6


def test_swap_scale_shift_is_an_involution():
    g = torch.Generator().manual_seed(3)
    m = lora(2 * H, H, 2, 1.5, g)
    s, _ = swap_halves(m)
    d, e = m.delta_weight(), s.delta_weight()
    assert torch.equal(e[:H], d[H:]) and torch.equal(e[H:], d[:H])
    assert torch.equal(swap_halves(s)[0].delta_weight(), d)


# ------------------------------------------------------------------------------------------------------
# real layouts (key → shape lists of real Flux LoRAs), filled with random values
# ------------------------------------------------------------------------------------------------------

# layout → (style to write it back in, number of canonical modules for blocks 0–1)
LAYOUTS = {
    "flux_lora_kohya_format": ("kohya", 2 * 14 + 2 * 6),
    "flux_lora_kohya_with_te1_format": ("kohya", 2 * 14 + 2 * 6 + 2 * 6),
    "flux_lora_aitoolkit_format": ("comfy", 2 * 12 + 2 * 5),
    "flux_lora_diffusers_format": ("diffusers", 2 * 14 + 2 * 6),
    "flux_lora_diffusers_no_proj_mlp_format": ("diffusers", 2 * 12 + 2 * 3),  # no norm1 / proj_mlp
    "flux_lora_diffusers_base_model_format": ("diffusers", 2 * 10 + 2 * 5 + 1),  # + top-level proj_out
    "flux_lora_xlabs_format": ("xlabs", 2 * 8),
    "flux_control_lora_format": ("comfy", 2 * 14 + 2 * 6 + 10),
    "flux_dora_onetrainer_format": (None, 2 * 8 + 2 * 3 + 2 * 6 + 2 * 7),
    "flux_lokr_bfl_format": (None, None),
}


_BLOCK_RE = re.compile(r"(?:blocks|layers|block)[._](\d+)[._]")


def layout_file(corpus, name: str, tmp_path: Path, seed: int = 0) -> Path:
    """The layout's real keys and shapes with random values; only blocks 0–1 of each stack (keeps it fast)."""
    spec = json.loads((corpus("_layouts_invokeai") / f"{name}.json").read_text())["keys_to_shapes"]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in spec.items():
        m = _BLOCK_RE.search(k)
        if m and int(m.group(1)) > 1:
            continue
        if k.endswith(".alpha"):
            sd[k] = torch.tensor(float(8 + len(k) % 5))  # varied per-module alphas
        else:
            sd[k] = torch.randn(*shape, generator=g) * 0.02
    p = tmp_path / f"{name}.safetensors"
    save_file(sd, str(p))
    return p


def raw_probe(sd: dict, prefix: str, x: torch.Tensor, suffixes=("lora_down.weight", "lora_up.weight")) -> torch.Tensor:
    """The raw file's own ΔW @ x for one module: alpha/r · up @ (down @ x)."""
    down, up = sd[f"{prefix}.{suffixes[0]}"].double(), sd[f"{prefix}.{suffixes[1]}"].double()
    alpha = float(sd[f"{prefix}.alpha"]) if f"{prefix}.alpha" in sd else down.shape[0]
    return alpha / down.shape[0] * (up @ (down @ x))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_invokeai_layouts_read_or_fail_precisely(corpus, tmp_path, name):
    style, n_modules = LAYOUTS[name]
    p = layout_file(corpus, name, tmp_path)
    assert detect_format(Checkpoint.open(p)).format == "flux"
    if n_modules is None:
        with pytest.raises(FormatError) as e:
            load_adapter(p)
        msg = str(e.value)
        assert p.name in msg and "double_blocks.0.img_attn.qkv" in msg and "do not split" in msg
        return
    a = load_adapter(p)
    assert len(a) == n_modules
    if style is None:  # OneTrainer DoRA: column-wise magnitudes, readable but not fusable into linear1
        assert all(m.is_dora and m.magnitude_axis == "in" for m in a.modules.values())
        with pytest.raises(SurgeryError, match="column-wise"):
            save_adapter(a, tmp_path / "o.safetensors", format="flux-kohya")
        return
    # write the same layout family back and compare every fused/split ΔW against the raw file's own math
    out = tmp_path / "out.safetensors"
    save_adapter(a, out, format=f"flux-{style}")
    back = load_adapter(out)
    assert_same_deltas(a, back, dense=False)
    raw, new = load_file(str(p)), load_file(str(out))
    if style == "kohya":
        # fused → split (copy-down) → fused (shared down) is bit-exact on the file level
        assert raw.keys() == new.keys() and all(torch.equal(raw[k], new[k]) for k in raw)
    x = torch.randn(3072, 3, dtype=torch.float64)
    if name == "flux_lora_kohya_format":
        full = raw_probe(raw, "lora_unet_single_blocks_1_linear1", x)
        for j, part in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
            ours = probe(a[f"transformer.single_transformer_blocks.1.{part}"], x)
            assert rel_err(ours, full[j * 3072:(j + 1) * 3072]) <= 1e-9
        assert rel_err(probe(a["transformer.single_transformer_blocks.1.proj_mlp"], x), full[9216:]) <= 1e-9
    if name == "flux_control_lora_format":
        assert len(a.modules_to_save) == 2 * 4 + 2 * 2
        assert "transformer.transformer_blocks.0.attn.norm_added_q.weight" in a.modules_to_save
        # final modulation: BFL (shift, scale) rows come back swapped as diffusers (scale, shift)
        fin = raw_probe(raw, "final_layer.adaLN_modulation.1", x, ("lora_A.weight", "lora_B.weight"))
        ours = probe(a["transformer.norm_out.linear"], x)
        assert torch.allclose(ours[:3072], fin[3072:]) and torch.allclose(ours[3072:], fin[:3072])
        bias = raw["final_layer.adaLN_modulation.1.lora_B.bias"]
        assert torch.equal(a["transformer.norm_out.linear"].bias_delta()[:3072], bias[3072:])


def test_unresolved_names_fail_or_are_skipped(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(2, H, generator=g),
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(H, 2, generator=g),
          "lora_unet_double_blocks_0_img_attn_bogus.lora_down.weight": torch.randn(2, H, generator=g),
          "lora_unet_double_blocks_0_img_attn_bogus.lora_up.weight": torch.randn(H, 2, generator=g)}
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    with pytest.raises(FormatError, match="lora_unet_double_blocks_0_img_attn_bogus") as e:
        load_adapter(p)
    assert "bad.safetensors" in str(e.value)
    a = load_adapter(p, skip_unresolved=True)
    assert list(a) == ["transformer.transformer_blocks.0.attn.to_out.0"]
    assert "dropped 2 unresolved" in a.config["_notes"][0]


def test_cli_convert_kohya_flux_to_comfy_and_peft(tmp_path, corpus):
    from click.testing import CliRunner

    from peft_surgery.cli.main import cli

    p = layout_file(corpus, "flux_lora_xlabs_format", tmp_path)
    r = CliRunner().invoke(cli, ["convert", str(p), "--to", "flux-comfy", "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    keys = load_file(str(tmp_path / "c.safetensors")).keys()
    assert all(k.startswith("diffusion_model.double_blocks.") for k in keys)
    assert_same_deltas(load_adapter(p), load_adapter(tmp_path / "c.safetensors"), dense=False)
    r = CliRunner().invoke(cli, ["convert", str(tmp_path / "missing.safetensors"), "--to", "flux-kohya",
                                 "-o", str(tmp_path / "k.safetensors")])
    assert r.exit_code != 0 and not (tmp_path / "k.safetensors").exists()


def test_generic_targets_route_flux_adapters_to_flux_writers(tmp_path, corpus):
    """`--to kohya` / `--to diffusers` on a Flux adapter must give Flux's layouts, not SD-style flattened names."""
    from click.testing import CliRunner

    from peft_surgery.cli.main import cli

    src = layout_file(corpus, "flux_lora_diffusers_format", tmp_path)
    for to, prefix in (("kohya", "lora_unet_"), ("diffusers", "transformer.")):
        out = tmp_path / f"{to}.safetensors"
        r = CliRunner().invoke(cli, ["convert", str(src), "--to", to, "-o", str(out)])
        assert r.exit_code == 0, r.output
        keys = list(load_file(str(out)).keys())
        assert keys and all(k.startswith(prefix) for k in keys), keys[:3]
        if to == "kohya":
            assert any("double_blocks" in k for k in keys)
        assert_same_deltas(load_adapter(src), load_adapter(out), dense=False)
