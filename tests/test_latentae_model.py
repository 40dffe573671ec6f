"""Encoder/Decoder seed API, AutoencoderKL behaviour, presets and the posterior."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

import latentae
from latentae import (
    AutoencoderConfig,
    AutoencoderKL,
    Decoder,
    DiagonalGaussian,
    Encoder,
    get_preset,
    list_presets,
)
from latentae.config import AutoencoderConfigError
from latentae.encoder import AttnBlock, LinAttnBlock, Normalize, ResnetBlock

SEED_ARGS = dict(
    ch=64, out_ch=3, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=[16],
    in_channels=3, resolution=128, z_channels=16,
)

SMALL = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_exports():
    from latentae.encoder import Decoder as D
    from latentae.encoder import Encoder as E

    assert latentae.Encoder is E and latentae.Decoder is D
    for name in ("AutoencoderKL", "AutoencoderConfig", "DiagonalGaussian", "list_presets", "get_preset"):
        assert hasattr(latentae, name)


def test_seed_example_shapes():
    torch.manual_seed(0)
    enc = Encoder(**SEED_ARGS)
    dec = Decoder(**SEED_ARGS)
    z = enc(torch.randn(1, 3, 128, 128))
    assert z.shape == (1, 16, 8, 8)
    assert dec(torch.randn(1, 16, 8, 8)).shape == (1, 3, 128, 128)
    assert Encoder(**SEED_ARGS, double_z=True)(torch.randn(1, 3, 128, 128)).shape == (1, 32, 8, 8)


def test_compvis_module_names():
    enc = Encoder(**SEED_ARGS)
    dec = Decoder(**SEED_ARGS)
    names = set(enc.state_dict())
    for key in (
        "conv_in.weight", "down.0.block.0.norm1.weight", "down.0.block.1.conv2.bias", "down.0.downsample.conv.weight",
        "down.2.block.0.nin_shortcut.weight", "down.3.attn.1.q.weight", "down.3.attn.0.proj_out.bias",
        "mid.block_1.conv1.weight", "mid.attn_1.k.weight", "mid.block_2.norm2.bias", "norm_out.weight",
        "conv_out.weight",
    ):
        assert key in names, key
    assert not any(k.startswith("down.4.downsample") for k in names)
    assert not any(".attn." in k for k in names if k.startswith(("down.0.", "down.4.")))
    dnames = set(dec.state_dict())
    # Decoder up[i] is level i: up.4 is the first applied (ch*4 channels), up.0 has no upsample.
    assert dec.up[4].block[0].in_channels == 64 * 4
    assert "up.4.upsample.conv.weight" in dnames and not any(k.startswith("up.0.upsample") for k in dnames)
    assert "up.3.attn.2.v.weight" in dnames and "up.0.block.2.conv1.weight" in dnames


def test_blocks_semantics():
    torch.manual_seed(0)
    norm = Normalize(64)
    assert (norm.num_groups, norm.eps) == (32, 1e-6)
    rb = ResnetBlock(in_channels=32, out_channels=64)
    assert rb.nin_shortcut.kernel_size == (1, 1)
    rb3 = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True)
    assert rb3.conv_shortcut.kernel_size == (3, 3)
    # Downsample: right/bottom pad then stride 2; avg-pool without conv.
    enc = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, in_channels=3, resolution=32, z_channels=4,
                  resamp_with_conv=False)
    assert not hasattr(enc.down[0].downsample, "conv")
    x = torch.randn(1, 32, 8, 8)
    assert torch.allclose(enc.down[0].downsample(x), torch.nn.functional.avg_pool2d(x, 2))


def _reference_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The original single-head AttnBlock math, written out with bmm and an explicit softmax."""
    h_ = block.norm(x)
    q, k, v = block.q(h_), block.k(h_), block.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    w_ = torch.bmm(q, k.reshape(b, c, h * w)) * (int(c) ** (-0.5))
    w_ = torch.softmax(w_, dim=2)
    h_ = torch.bmm(v.reshape(b, c, h * w), w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + block.proj_out(h_)


def test_attention_matches_original_math_and_chunking(monkeypatch):
    torch.manual_seed(0)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 12, 10)
    ref = _reference_attention(block, x)
    assert torch.allclose(block(x), ref, atol=1e-5)
    # Query chunking (used for large token counts) gives the same result.
    monkeypatch.setattr("latentae.encoder._ATTN_QUERY_CHUNK", 16)
    assert torch.allclose(block(x), ref, atol=1e-5)


def test_linear_attention_semantics():
    torch.manual_seed(0)
    block = LinAttnBlock(32)
    assert set(block.state_dict()) == {"to_qkv.weight", "to_out.weight", "to_out.bias"}
    x = torch.randn(2, 32, 6, 5)
    q, k, v = block.to_qkv(x).reshape(2, 3, 32, 30).unbind(1)
    k = k.softmax(dim=-1)
    context = torch.einsum("bdn,ben->bde", k, v)
    out = torch.einsum("bde,bdn->ben", context, q).reshape(2, 32, 6, 5)
    assert torch.allclose(block(x), block.to_out(out), atol=1e-5)  # no residual, no norm
    enc = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, in_channels=3, resolution=16, z_channels=4,
                  attn_type="linear", attn_resolutions=[8])
    assert isinstance(enc.mid.attn_1, LinAttnBlock) and isinstance(enc.down[1].attn[0], LinAttnBlock)
    assert enc(torch.randn(1, 3, 16, 16)).shape == (1, 4, 8, 8)
    none = Encoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, in_channels=3, resolution=16, z_channels=4,
                   attn_type="none")
    assert isinstance(none.mid.attn_1, torch.nn.Identity)
    with pytest.raises(ValueError, match="attn_type"):
        Encoder(ch=32, ch_mult=(1,), num_res_blocks=1, in_channels=3, resolution=16, z_channels=4, attn_type="x")


def test_non_square_and_divisibility():
    ae = AutoencoderKL(SMALL)
    post = ae.encode(torch.rand(1, 3, 24, 40) * 2 - 1)
    assert post.mean.shape == (1, 4, 12, 20)
    assert ae.decode(post.mean).shape == (1, 3, 24, 40)
    with pytest.raises(ValueError, match="divisible by 2"):
        ae.encode(torch.rand(1, 3, 25, 40))


def test_autoencoder_api():
    torch.manual_seed(0)
    cfg = SMALL.replace(scaling_factor=0.5, shift_factor=0.25)
    ae = AutoencoderKL(cfg)
    assert (ae.latent_channels, ae.downsample_factor) == (4, 2)
    assert (ae.scaling_factor, ae.shift_factor) == (0.5, 0.25)
    z = torch.randn(2, 4, 3, 3)
    assert torch.allclose(ae.scale_latents(z), (z - 0.25) * 0.5)
    assert torch.allclose(ae.unscale_latents(ae.scale_latents(z)), z, atol=1e-6)
    fp = ae.fingerprint()
    assert fp["weights_sha256"] is None and fp["config"] == cfg.to_dict() and fp["preset"] is None
    recon, post = ae(torch.rand(1, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert recon.shape == (1, 3, 8, 8) and recon.dtype == torch.float32


def test_posterior():
    mean = torch.zeros(2, 4, 3, 3)
    post = DiagonalGaussian(mean, torch.full_like(mean, 50.0))
    assert post.logvar.max().item() == 20.0
    assert DiagonalGaussian(mean, torch.full_like(mean, -99.0)).logvar.min().item() == -30.0
    post = DiagonalGaussian.from_moments(torch.cat([torch.ones(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)], dim=1))
    assert torch.equal(post.mode(), torch.ones(2, 4, 3, 3))
    assert torch.allclose(post.std, torch.ones(1)) and torch.allclose(post.var, torch.ones(1))
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, post.mean)
    assert torch.allclose(post.kl(), torch.full((2,), 0.5 * 36))
    assert torch.allclose(post.kl(post), torch.zeros(2))


def test_config_roundtrip_and_errors():
    cfg = get_preset("sd3")
    assert AutoencoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(AutoencoderConfigError, match="bogus"):
        AutoencoderConfig.from_dict({"bogus": 1})
    with pytest.raises(AutoencoderConfigError, match="embed_dim"):
        AutoencoderConfig(z_channels=4, embed_dim=8, use_quant_conv=False)
    with pytest.raises(AutoencoderConfigError, match="'ch'"):
        AutoencoderConfig(ch=48)
    with pytest.raises(AutoencoderConfigError, match="unknown autoencoder preset 'nope'"):
        get_preset("nope")


def test_presets():
    names = list_presets()
    for name in ("sd", "sdxl", "sd3", "flux", "kl-f4", "kl-f16", "kl-f32", "seed-f16c16", "tiny"):
        assert name in names
    assert get_preset("sd").scaling_factor == 0.18215 and get_preset("sdxl").scaling_factor == 0.13025
    sd3, flux = get_preset("sd3"), get_preset("flux")
    assert (sd3.scaling_factor, sd3.shift_factor, sd3.z_channels, sd3.use_quant_conv) == (1.5305, 0.0609, 16, False)
    assert (flux.scaling_factor, flux.shift_factor, flux.embed_dim, flux.use_post_quant_conv) == (0.3611, 0.1159, 16, False)
    assert get_preset("kl-f4").downsample_factor == 4
    assert get_preset("kl-f16").attention_levels() == (4,)
    assert get_preset("kl-f32").attention_levels() == (4, 5) and get_preset("kl-f32").downsample_factor == 32
    seed = get_preset("seed-f16c16")
    assert (seed.ch, seed.ch_mult, seed.attn_resolutions, seed.resolution, seed.z_channels) == (
        64, (1, 1, 2, 2, 4), (16,), 128, 16)
    tiny = get_preset("tiny")
    assert (tiny.ch, tiny.ch_mult, tiny.num_res_blocks, tiny.z_channels, tiny.downsample_factor) == (32, (1, 2, 2, 4), 1, 8, 8)
    assert tiny.norm_num_groups == 8 and all(get_preset(n).norm_num_groups == 32 for n in ("sd", "sdxl", "flux"))


def test_norm_num_groups_reaches_every_norm_and_is_validated():
    ae = AutoencoderKL(SMALL.replace(norm_num_groups=8))
    norms = [m for m in ae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {8}
    # The group count changes the function, not the parameters: same tensors, different outputs.
    other = AutoencoderKL(SMALL)
    other.load_state_dict(ae.state_dict())
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(ae.encode(x).mean, other.encode(x).mean)
    assert SMALL.same_architecture(SMALL.replace(norm_num_groups=8))  # no tensor tells them apart
    with pytest.raises(AutoencoderConfigError, match="norm_num_groups"):
        SMALL.replace(norm_num_groups=64)  # 32 channels cannot form 64 groups
    with pytest.raises(AutoencoderConfigError, match="norm_num_groups"):
        SMALL.replace(norm_num_groups=0)


def test_from_preset_random_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="latentae"):
        ae = AutoencoderKL.from_preset("seed-f16c16")
    assert "RANDOM WEIGHTS" in caplog.text
    assert ae.preset == "seed-f16c16" and ae.weights_sha256 is None
    assert ae.encode(torch.rand(1, 3, 32, 32)).mean.shape == (1, 16, 2, 2)


def test_prepare_dtypes_and_channels_last():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ref = AutoencoderKL(SMALL)
    want = ref.encode(x).mean
    for dtype, tol in (("fp32", 1e-5), ("bf16", 0.1)):
        ae = AutoencoderKL(SMALL)
        ae.load_state_dict(ref.state_dict())
        ae.prepare("cpu", dtype=dtype, channels_last=True)
        post = ae.encode(x)
        assert post.mean.dtype == torch.float32 and ae.decode(post.mean).dtype == torch.float32
        assert (post.mean - want).abs().max().item() < tol, dtype
        assert not any(p.requires_grad for p in ae.parameters())
    with pytest.raises(AutoencoderConfigError, match="compute dtype"):
        AutoencoderKL(SMALL).prepare(dtype="fp8")


def test_normalize_half_precision_stays_half_and_accurate():
    torch.manual_seed(0)
    norm = Normalize(64)
    x = torch.randn(2, 64, 8, 8) * 50 + 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - norm(x)).abs().max().item() < 0.05


def test_training_mode_gradients():
    ae = AutoencoderKL(SMALL)
    with torch.enable_grad():
        recon, post = ae(torch.rand(1, 3, 8, 8))
        (recon.square().mean() + post.kl().mean()).backward()
    assert ae.encoder.conv_in.weight.grad is not None


_ATTN_MEMORY_PROBE = """
import resource, sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from latentae.encoder import AttnBlock
block = AttnBlock(32).eval()
x = torch.randn(1, 32, 128, 128)  # 16384 tokens, as in the mid block of an f8 model at 1024x1024
with torch.inference_mode():
    block(torch.randn(1, 32, 8, 8))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.argv[1] == "math":
        with sdpa_kernel(SDPBackend.MATH):
            block(x)
    else:
        block(x)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("backend,limit_mib", [("default", 256), ("math", 1024)])
def test_attention_memory_bounded_at_1024px(backend, limit_mib):
    """One N x N fp32 score matrix at 16384 tokens is 1 GiB; the peak stays below that on any backend
    (query chunking covers the unfused "math" one). Run in a fresh process to read its peak RSS."""
    out = subprocess.run([sys.executable, "-c", _ATTN_MEMORY_PROBE, backend], capture_output=True, text=True,
                         check=True, timeout=120)
    assert int(out.stdout.strip()) < limit_mib
