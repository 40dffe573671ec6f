"""Named configurations of well-known KL autoencoders.

Architectures follow the published configs (CompVis ``first_stage_models`` and the model cards);
scaling/shift factors are the ones the respective diffusion models were trained with.
"""

from __future__ import annotations

from pathlib import Path

from .config import AutoencoderConfig, AutoencoderConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# LDM kl-f4/f16/f32 were used with scale_by_std (computed per training run), so no canonical factor
# exists: 1.0 leaves latents as encoded. The tiny preset's factor comes from weights/tiny.json.
_PRESETS: dict[str, AutoencoderConfig] = {
    "sd": AutoencoderConfig(scaling_factor=0.18215),
    "sdxl": AutoencoderConfig(scaling_factor=0.13025),
    "sd3": AutoencoderConfig(
        z_channels=16, embed_dim=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609,
    ),
    "flux": AutoencoderConfig(
        z_channels=16, embed_dim=16, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159,
    ),
    "kl-f4": AutoencoderConfig(ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, scaling_factor=1.0),
    "kl-f16": AutoencoderConfig(
        ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), z_channels=16, embed_dim=16, scaling_factor=1.0,
    ),
    "kl-f32": AutoencoderConfig(
        ch_mult=(1, 1, 2, 2, 4, 4), attn_resolutions=(16, 8), z_channels=64, embed_dim=64, scaling_factor=1.0,
    ),
    # The seed README example: Encoder(ch=64, ch_mult=(1,1,2,2,4), num_res_blocks=2,
    # attn_resolutions=[16], resolution=128, z_channels=16) as a full autoencoder.
    "seed-f16c16": AutoencoderConfig(
        ch=64, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), resolution=128,
        z_channels=16, embed_dim=16, scaling_factor=1.0,
    ),
    # GroupNorm with 8 groups (4 channels each at the 32-channel levels): with 32 groups every channel is
    # normalised on its own, the decoder's last norm erases each image's per-channel mean and scale, and
    # training stalls on a wrong-colour plateau (~17.5 dB held out) that it leaves only by chance.
    "tiny": AutoencoderConfig(
        ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=8, embed_dim=8,
        norm_num_groups=8, scaling_factor=1.0,
    ),
}

# Presets whose weights ship inside the package: name -> safetensors file (config overrides in .json).
SHIPPED_WEIGHTS: dict[str, Path] = {"tiny": WEIGHTS_DIR / "tiny.safetensors"}


def list_presets() -> list[str]:
    """Names accepted by ``get_preset`` and ``AutoencoderKL.from_preset``."""
    return list(_PRESETS)


def get_preset(name: str) -> AutoencoderConfig:
    """A fresh copy of the named preset's config; unknown names raise AutoencoderConfigError listing the known ones."""
    try:
        cfg = _PRESETS[name]
    except KeyError:
        raise AutoencoderConfigError(f"unknown autoencoder preset {name!r}; known presets: {list_presets()}") from None
    return AutoencoderConfig.from_dict(cfg.to_dict())


def matching_presets(config: AutoencoderConfig) -> list[str]:
    """Presets whose architecture equals ``config``'s (scaling factors are not compared)."""
    return [name for name, cfg in _PRESETS.items() if cfg.same_architecture(config)]
