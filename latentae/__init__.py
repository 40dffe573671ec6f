"""latentae: the LDM-family KL autoencoder (Encoder, Decoder, AutoencoderKL), presets and checkpoint loading.

Pure PyTorch + safetensors. Typical use::

    from latentae import AutoencoderKL
    ae = AutoencoderKL.from_pretrained("path/to/vae").prepare("cuda", dtype="bf16")
    posterior = ae.encode(images)          # images in [-1, 1], [B, 3, H, W]
    latents = ae.scale_latents(posterior.mean)
"""

from .autoencoder import AutoencoderKL, DiagonalGaussian, sample_gaussian
from .checkpoint import CheckpointError
from .config import AutoencoderConfig, AutoencoderConfigError
from .encoder import Decoder, Encoder
from .presets import get_preset, list_presets

__all__ = [
    "AutoencoderConfig",
    "AutoencoderConfigError",
    "AutoencoderKL",
    "CheckpointError",
    "Decoder",
    "DiagonalGaussian",
    "Encoder",
    "get_preset",
    "list_presets",
    "sample_gaussian",
]
