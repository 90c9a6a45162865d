"""extract on a diffusers UNet, written as diffusers or kohya files: diffusers loads them into BASE and gives FT."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("diffusers")

from peft_surgery.cli.main import cli  # noqa: E402

SD1 = dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, cross_attention_dim=12,
           attention_head_dim=2, norm_num_groups=4, sample_size=8, in_channels=4, out_channels=4)


def _unet_out(unet):
    g = torch.Generator().manual_seed(5)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([3, 700]), enc).sample


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny SD1 UNet and a 'fine-tune' with exact rank-2 changes on attention linears and on one 3×3 conv."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd-extract")
    torch.manual_seed(0)
    base = UNet2DConditionModel(**SD1).eval()
    base.save_pretrained(root / "base")
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if n.endswith(("to_q.weight", "to_v.weight", "to_out.0.weight")):
                p.add_(0.1 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g))
            if n == "down_blocks.1.resnets.0.conv1.weight":
                flat = 0.1 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p[0].numel(), generator=g)
                p.add_(flat.reshape(p.shape))
    ft.save_pretrained(root / "ft")
    return root, base, ft


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_extracted_unet_lora_loads_in_diffusers_and_gives_ft(pair, fmt):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Mixin

    root, base, ft = pair
    out = root / f"lora-{fmt}.safetensors"
    r = CliRunner().invoke(cli, ["extract", str(root / "base"), str(root / "ft"), "--rank", "2", "--format", fmt,
                                 "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    sd, alphas, meta = Mixin.lora_state_dict(str(out), unet_config=base.config, return_lora_metadata=True)
    loaded = copy.deepcopy(base)
    Mixin.load_lora_into_unet(sd, alphas, loaded, metadata=meta)
    y_base, y_ft, y_lora = _unet_out(base), _unet_out(ft), _unet_out(loaded)
    assert float((y_ft - y_base).abs().max()) > 1e-3  # the fine-tune really changed the output
    assert torch.allclose(y_lora, y_ft, atol=1e-5, rtol=1e-4)
