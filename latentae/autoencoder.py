"""KL-regularised autoencoder (AutoencoderKL) with its diagonal Gaussian posterior."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .config import AutoencoderConfig, AutoencoderConfigError
from .encoder import Decoder, Encoder
from .presets import SHIPPED_WEIGHTS, get_preset

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sample_gaussian(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw of N(mean, exp(logvar)): ``mean + exp(logvar / 2) * eps``, eps standard normal of
    ``mean``'s shape and dtype, drawn on ``generator``'s device (which may differ from the tensors')."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents; tensors are float32, logvar clamped to [-30, 20]."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        """Split ``[B, 2C, h, w]`` encoder moments into mean and logvar (first and second half)."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean.contiguous(), logvar.contiguous())

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``mean + std * eps`` (see `sample_gaussian`)."""
        return sample_gaussian(self.mean, self.logvar, generator)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL divergence to ``other`` (standard normal when None), summed over C, h, w: shape [B]."""
        dims = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=dims,
        )


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's tensors (sorted names, dtype, shape, bytes): equal weights, equal digest,
    whatever file format they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class AutoencoderKL(nn.Module):
    """Encoder + diagonal Gaussian posterior + Decoder, with optional 1x1 quant convs.

    ``encode`` takes images in [-1, 1] and returns the posterior; ``decode`` maps latents (raw, i.e.
    unscaled) back to images. Diffusion models train on ``scale_latents(posterior.mean)``.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        common: dict[str, Any] = dict(
            ch=config.ch, out_ch=config.out_channels, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
            attn_resolutions=config.attn_resolutions, dropout=config.dropout, in_channels=config.in_channels,
            resolution=config.resolution, z_channels=config.z_channels, attn_type=config.attn_type,
            norm_num_groups=config.norm_num_groups,
        )
        self.encoder = Encoder(double_z=config.double_z, **common)
        self.decoder = Decoder(**common)
        z, e = config.z_channels, config.embed_dim
        self.quant_conv = nn.Conv2d(2 * z, 2 * e, kernel_size=1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(e, z, kernel_size=1) if config.use_post_quant_conv else None

        self.preset: str | None = None
        self.weights_sha256: str | None = None
        self.weights_source: str | None = None
        self._compute_dtype = torch.float32
        self._channels_last = False

    # ------------------------------------------------------------------ properties
    @property
    def scaling_factor(self) -> float:
        return float(self.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.config.shift_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.config.embed_dim)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def channels_last(self) -> bool:
        """Whether ``prepare`` put the model in channels_last memory format."""
        return self._channels_last

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype that ``encode``/``decode`` compute in (set by ``prepare``)."""
        return self._compute_dtype

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents -> diffusion-space latents: ``(z - shift) * scale``."""
        return (z - self.shift_factor) * self.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """Diffusion-space latents -> raw latents: ``z / scale + shift``."""
        return z / self.scaling_factor + self.shift_factor

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this model's latents: preset, config and weights digest (None = random)."""
        return {"preset": self.preset, "config": self.config.to_dict(), "weights_sha256": self.weights_sha256}

    # ------------------------------------------------------------------ compute
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _prepare_input(self, x: Tensor, compute_dtype: torch.dtype) -> Tensor:
        if not torch.is_floating_point(x):
            raise TypeError(f"expected a floating point tensor, got {x.dtype}")
        # With autocast, convs cast their input themselves; an extra fp32 copy would only cost memory.
        dtype = torch.float32 if compute_dtype == torch.float32 else x.dtype
        x = x.to(device=self._device(), dtype=dtype)
        # Inputs enter in the prepared layout whatever their strides (e.g. a posterior mean is a strided
        # view), so the same convolution kernels run every time.
        return x.contiguous(memory_format=torch.channels_last if self._channels_last else torch.contiguous_format)

    def _autocast(self, compute_dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device().type, dtype=compute_dtype)

    def encode(self, x: Tensor, *, dtype: str | torch.dtype | None = None) -> DiagonalGaussian:
        """Images ``[B, in_channels, H, W]`` in [-1, 1] (H, W divisible by ``downsample_factor``) ->
        posterior over ``[B, latent_channels, H/f, W/f]`` latents (float32).

        ``dtype`` ("fp32" | "fp16" | "bf16") computes this call in another dtype than the one
        ``prepare`` set, e.g. once more in fp32 for images whose fp16 posterior overflowed."""
        compute_dtype = self._compute_dtype if dtype is None else _compute_dtype(dtype)
        x = self._prepare_input(x, compute_dtype)
        with self._autocast(compute_dtype):
            moments = self.encoder(x)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.float())

    def decode(self, z: Tensor) -> Tensor:
        """Raw (unscaled) latents ``[B, latent_channels, h, w]`` -> images ``[B, out_channels, h*f, w*f]``
        (float32, roughly in [-1, 1])."""
        z = self._prepare_input(z, self._compute_dtype)
        with self._autocast(self._compute_dtype):
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            x = self.decoder(z)
        return x.float()

    def forward(
        self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction and posterior (for training): decode a sample (or the mode) of ``encode(x)``."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def prepare(
        self,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> AutoencoderKL:
        """Set up the inference path: eval mode, frozen weights on ``device``, autocast in ``dtype``
        ("fp32" | "fp16" | "bf16") with fp32 weights and float32 outputs, optional channels_last
        memory format and ``torch.compile`` of encoder and decoder. Returns self."""
        compute_dtype = _compute_dtype(dtype)
        self.eval().requires_grad_(False)
        self.to(device=torch.device(device))
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._compute_dtype = compute_dtype
        self._channels_last = channels_last
        if compile:
            # Module.compile keeps parameter names (state_dict keys) unchanged, unlike torch.compile(module).
            self.encoder.compile()
            self.decoder.compile()
        return self

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def from_preset(cls, name: str, weights: str | Path | None = None) -> AutoencoderKL:
        """Model of a named preset. ``weights`` loads a checkpoint with the preset's architecture; the
        ``tiny`` preset loads its shipped weights; otherwise weights are random (with a loud warning)."""
        if weights is not None:
            model = cls.from_pretrained(weights, preset=name)
            model.preset = name
            return model
        config = get_preset(name)
        shipped = SHIPPED_WEIGHTS.get(name)
        if shipped is not None and shipped.is_file():
            config = _apply_overrides(config, shipped.with_suffix(".json"))
            model = cls.from_pretrained(shipped, config=config)
        else:
            logger.warning(
                "RANDOM WEIGHTS: autoencoder preset %r is initialised randomly (no weights given%s); its "
                "latents are meaningless. Pass weights=PATH to load a checkpoint.",
                name, f", {shipped} missing" if shipped is not None else "",
            )
            model = cls(config)
        model.preset = name
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        preset: str | None = None,
        config: AutoencoderConfig | Mapping[str, Any] | None = None,
    ) -> AutoencoderKL:
        """Load a diffusers folder or a single ``.safetensors``/``.ckpt``/``.pt``/``.pth``/``.bin`` file.

        The architecture comes from ``config``, else ``preset``, else the checkpoint's own config, else
        the tensors. Tensors are copied exactly; missing/unexpected keys or shape mismatches raise
        ``latentae.checkpoint.CheckpointError`` subclasses naming them.
        """
        cfg, state, weights = checkpoint.resolve_checkpoint(path, preset=preset, config=config)
        model = cls(cfg)
        checkpoint.load_native_into(model, state, str(weights))
        model.preset = preset
        model.weights_sha256 = state_sha256(model)
        model.weights_source = str(weights)
        return model

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a diffusers ``AutoencoderKL`` folder (config.json + diffusion_pytorch_model.safetensors)."""
        return checkpoint.save_diffusers(self, self.config, folder)

    def save_compvis(self, path: str | Path, prefix: str = "") -> Path:
        """Write CompVis-named weights (``.safetensors`` or ``.ckpt``), config embedded; ``prefix`` e.g.
        ``"first_stage_model."`` mimics a full model checkpoint."""
        return checkpoint.save_native(self, self.config, path, prefix=prefix)


def _compute_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A compute dtype given by name ("fp32" | "fp16" | "bf16") or as a torch dtype, checked."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise AutoencoderConfigError(f"compute dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise AutoencoderConfigError(f"compute dtype must be one of {list(_DTYPES)}, got {dtype}")
    return dtype


def _apply_overrides(config: AutoencoderConfig, json_path: Path) -> AutoencoderConfig:
    """Apply the overrides of a shipped preset's ``.json`` side file.

    The file is a JSON object; its optional ``"config"`` object and any top-level key that is a config
    field (e.g. ``"scaling_factor"``) override the preset. Other keys are free-form metadata.
    """
    if not json_path.is_file():
        return config
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise AutoencoderConfigError(f"{json_path} must hold a JSON object")
    fields = set(AutoencoderConfig.field_names())
    overrides = {k: v for k, v in data.items() if k in fields}
    nested = data.get("config", {})
    if not isinstance(nested, dict):
        raise AutoencoderConfigError(f"{json_path}: key 'config' must be an object")
    overrides.update(nested)
    return config.replace(**overrides) if overrides else config
