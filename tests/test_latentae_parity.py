"""Numerical parity with diffusers' AutoencoderKL on identical weights (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from latentae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

SHAPES = {
    # SD-shaped: 4 latent channels, quant convs, attention in the middle block only.
    "sd": dict(latent_channels=4),
    # FLUX/SD3-shaped: 16 latent channels, no quant convs.
    "flux": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                 shift_factor=0.1159),
    # Attention at the two lower levels too (kl-f16/f32 style).
    "attn-levels": dict(latent_channels=4,
                        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
    # Fewer GroupNorm groups (the tiny preset's 8): the group count changes the math but no tensor shape.
    "norm-groups-8": dict(latent_channels=8, norm_num_groups=8),
}


def _reference(kind: str):
    torch.manual_seed(0)
    args = dict(block_out_channels=(32, 64, 64), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    args.update(SHAPES[kind])
    model = diffusers.AutoencoderKL(**args).eval()
    with torch.no_grad():
        for p in model.parameters():  # perturb norms too, so that every tensor matters
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("kind", list(SHAPES))
def test_parity_with_diffusers(tmp_path, kind):
    ref = _reference(kind)
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    assert ours.latent_channels == ref.config.latent_channels
    assert ours.scaling_factor == ref.config.scaling_factor
    assert ours.shift_factor == (ref.config.shift_factor or 0.0)
    assert ours.config.norm_num_groups == ref.config.norm_num_groups
    assert {m.num_groups for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)} == {ref.config.norm_num_groups}
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode(x)
        assert (got.mean - want.mean).abs().max().item() <= TOL
        assert (got.logvar - want.logvar).abs().max().item() <= TOL
        z = want.mean.contiguous()
        assert (ours.decode(z) - ref.decode(z).sample).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["attn-levels", "norm-groups-8"])
def test_diffusers_loads_our_export(tmp_path, kind):
    ref = _reference(kind)
    ref.save_pretrained(tmp_path / "a")
    ours = AutoencoderKL.from_pretrained(tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "b").eval()
    mine, theirs = back.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back.encode(x).latent_dist.mean, ref.encode(x).latent_dist.mean)
